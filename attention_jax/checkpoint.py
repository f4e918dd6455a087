"""Orbax checkpoints of a run: the latest (for resuming) and the best by val loss.

Layout in the workdir: ``checkpoints/<step>/`` (latest only) and
``best/<step>/``. Orbax writes each checkpoint to a temporary folder and
renames it when complete, so a process killed mid-save leaves the previous
checkpoint intact and no half-written one that a resume could pick up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


def _manager(path: Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1,
        # Synchronous saves: a save returns only when the checkpoint is on disk,
        # so "the last good checkpoint" in messages is always true. Saves are rare
        # (every checkpoint_every steps), so the cost is small.
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(path, options=options)


class Checkpoints:
    """The latest and best checkpoints of one workdir."""

    def __init__(self, workdir: str | Path):
        workdir = Path(workdir).absolute()
        self.latest_dir = workdir / "checkpoints"
        self.best_dir = workdir / "best"
        self._latest = _manager(self.latest_dir)
        self._best = _manager(self.best_dir)

    @staticmethod
    def _save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
        if step in manager.all_steps():  # same step, same deterministic state: nothing to do
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        manager.save(step, args=args)
        manager.wait_until_finished()

    def save_latest(self, step: int, state: Any, meta: dict) -> None:
        self._save(self._latest, step, state, meta)

    def save_best(self, step: int, state: Any, meta: dict) -> None:
        self._save(self._best, step, state, meta)

    @staticmethod
    def _restore(manager: ocp.CheckpointManager, abstract_state: Any):
        step = manager.latest_step()
        if step is None:
            return None
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        restored = manager.restore(step, args=args)
        return restored.state, restored.meta

    def restore_latest(self, abstract_state: Any):
        """(state, meta) of the latest checkpoint, or None when there is none."""
        return self._restore(self._latest, abstract_state)

    def restore_best(self, abstract_state: Any):
        return self._restore(self._best, abstract_state)

    def describe_latest(self) -> str:
        step = self._latest.latest_step()
        if step is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is step {step} in {self.latest_dir / str(step)}"

    def close(self) -> None:
        self._latest.close()
        self._best.close()
