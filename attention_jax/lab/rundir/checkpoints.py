"""Checkpoints: orbax, the latest (for resuming) and the best by val loss, each verified on restore."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from attention_jax.lab.errors import ConfigError
from attention_jax.lab.rundir.faults import DamagedFile, StorageFault, raise_if_system_fault
from attention_jax.lab.rundir.rundir import BEST, CHECKPOINTS, DAMAGED, json_safe, note

if TYPE_CHECKING:
    from attention_jax.lab.rundir.workdir import RunDir

# Latest checkpoints kept: the newest, and one to fall back to when the newest is damaged.
# Costs one more checkpoint of disk (params + AdamW moments: 12 bytes per parameter).
KEEP_LATEST = 2
READ_ATTEMPTS = 10  # listings of a folder a live trainer keeps replacing checkpoints in, before giving up


def to_host(tree: Any) -> Any:
    """Numpy values of a tree of arrays, also of arrays whose shards live in other processes.

    With several processes every one of them must call it (it gathers over them). It lives here,
    in the I/O layer, so that the run directory needs no training code; ``steps`` re-exports it.
    """
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence orbax's log lines (they go through absl's logger) for the ``with`` block."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def without_closed_loop_noise(hook: Callable) -> Callable:
    """``hook`` (a ``sys.unraisablehook``) minus the "Event loop is closed" errors that tensorstore's
    callbacks raise by the dozen when orbax gives up on a damaged checkpoint or a full disk."""

    def filtered(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
            hook(unraisable)

    return filtered


@contextlib.contextmanager
def _no_closed_loop_noise() -> Iterator[None]:
    previous = sys.unraisablehook
    sys.unraisablehook = without_closed_loop_noise(previous)
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _manager(path: Path, writable: bool, keep: int) -> ocp.CheckpointManager:
    if not writable:
        # Read-only: no folder is created, no temporary folder is cleaned up (a live
        # trainer's checkpoint in progress), nothing is deleted.
        options = ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0, enable_async_checkpointing=False
        )
        with _quiet_absl():  # orbax warns that the folder is read-only: that is the point
            return _listing(lambda: ocp.CheckpointManager(path, options=options), path)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        # Synchronous saves: a save returns only when the checkpoint is on disk,
        # so "the last good checkpoint" in messages is always true. Saves are rare
        # (every checkpoint_every steps), so the cost is small.
        enable_async_checkpointing=False,
        # Temporary folders are checkpoints a dead trainer left half-written; only
        # the lock holder opens checkpoints writable, so none of them is in progress.
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(path, options=options)


def _listing(read: Callable[[], Any], folder: Path) -> Any:
    """``read()``, a listing of ``folder``'s checkpoints (orbax reads each one's metadata as it lists them),
    tried again while a live trainer deletes a listed checkpoint before its metadata is read."""
    for _ in range(READ_ATTEMPTS):
        try:
            return read()
        except (FileNotFoundError, NotADirectoryError):  # orbax says either for a checkpoint deleted meanwhile
            if not folder.is_dir():  # the folder itself is gone: not a race
                raise
    raise _replaced_too_often(folder, "listed")


def _replaced_too_often(folder: Path, while_: str) -> DamagedFile:
    """A live trainer won every race of READ_ATTEMPTS: not the same as "no checkpoint yet"."""
    return DamagedFile(f"the checkpoints in {folder} were replaced {READ_ATTEMPTS} times while being {while_} "
                       "(a trainer saving very often); try again")  # fmt: skip


def state_layout(state: Any) -> list[list]:
    """[path, shape, dtype] of every leaf of a state (arrays or ShapeDtypeStructs)."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return [[jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype)] for path, leaf in leaves]


def state_digest(host_state: Any) -> str:
    """sha256 of every leaf's path, dtype, shape and bytes (host arrays): a checkpoint's checksum."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(host_state)[0]:
        leaf = np.ascontiguousarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|".encode())
        h.update(leaf.data)
    return h.hexdigest()


def nonfinite_seeds(params: Any) -> list[int]:
    """Indices (along the leading seed axis) of the seeds with a NaN or infinite parameter."""
    bad: set[int] = set()
    for leaf in jax.tree_util.tree_leaves(params):
        leaf = np.asarray(leaf)
        if leaf.dtype.kind == "f":
            bad.update(np.flatnonzero(~np.isfinite(leaf.reshape(leaf.shape[0], -1)).all(axis=1)).tolist())
    return sorted(bad)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


@dataclass
class Damaged:
    """A checkpoint that failed verification: where, and why."""

    folder: Path
    step: int
    why: str

    def __str__(self) -> str:
        return f"checkpoint step {self.step} in {self.folder} is damaged ({self.why})"


class Checkpoints:
    """The latest and best checkpoints of one workdir.

    Orbax writes each checkpoint to a temporary folder and renames it when
    complete, so a process killed mid-save leaves the previous checkpoint
    intact and no half-written one that a resume could pick up. Each
    checkpoint's meta also holds the sha256 and layout of its arrays; restore
    verifies both, and that the parameters of every seed that had not diverged
    are finite. A checkpoint that fails is skipped for the one before it (with
    a note; ``damaged`` lists them) or, when none is left, refused with one
    line naming it. ``writable=False`` opens both folders read-only.
    """

    def __init__(self, workdir: str | Path, writable: bool = True):
        workdir = Path(workdir).absolute()
        self.latest_dir = workdir / CHECKPOINTS
        self.best_dir = workdir / BEST
        self._latest = _manager(self.latest_dir, writable, KEEP_LATEST)
        self._best = _manager(self.best_dir, writable, 1)
        self.damaged: list[Damaged] = []
        self.saving = False  # True while a save is in progress (an interrupt must not start another)
        self.workdir = workdir
        # Orbax recreates missing folders when it saves: a workdir deleted or moved while training
        # would silently come back without its other files. Saves check it is still the same folder.
        self._identity = _identity(workdir) if writable else None

    def _check_workdir(self) -> None:
        if _identity(self.workdir) != self._identity:
            raise StorageFault(errno.ENOENT, f"the workdir {self.workdir}")

    def _save(self, manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
        if step in manager.all_steps():  # same step, same deterministic state: nothing to do
            return
        self._check_workdir()
        host = to_host(state)  # with several processes, every one of them computes the digest
        integrity = {"sha256": state_digest(host), "layout": state_layout(host)}
        meta = json_safe({**meta, "integrity": integrity})
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.saving = True
        try:
            manager.save(step, args=args)
            manager.wait_until_finished()
        except Exception as e:
            self._check_workdir()  # the workdir vanished mid-save: that is the cause, whatever orbax says
            raise_if_system_fault(e, Path(manager.directory) / str(step))
            raise
        finally:
            self.saving = False
        if _identity(self.workdir) != self._identity:
            # Moved or deleted after the check above and before orbax wrote: the save went into a folder
            # orbax recreated under the old name. Name it so that no run takes it for a checkpoint (it is
            # kept, not deleted), and stop as the check above would have.
            stray = Path(manager.directory) / str(step)
            with contextlib.suppress(OSError):
                stray.rename(stray.with_name(f"{step}.saved-after-the-workdir-moved"))
            self._check_workdir()

    def save_latest(self, step: int, state: Any, meta: dict) -> None:
        self._save(self._latest, step, state, meta)

    def save_best(self, step: int, state: Any, meta: dict) -> None:
        self._save(self._best, step, state, meta)

    def _restore(self, manager: ocp.CheckpointManager, folder: Path, abstract_state: Any):
        """(state, meta) of the newest checkpoint that verifies, or None when there is none."""
        damaged: list[Damaged] = []
        for _ in range(READ_ATTEMPTS):  # a live trainer may replace a checkpoint while we read it: then list again
            replaced = False
            for step in sorted(manager.all_steps(), reverse=True):
                try:
                    state, meta = self._restore_step(manager, folder, step, abstract_state)
                except DamagedFile as e:
                    if not (folder / str(step)).is_dir():
                        replaced = True
                        break
                    damaged.append(Damaged(folder, step, str(e)))
                    continue
                for d in damaged:
                    note(f"{d}; using step {step} instead")
                self.damaged += damaged
                return state, meta
            if not replaced:
                break
            _listing(manager.reload, folder)
        else:  # every listing was out of date before it could be read
            raise _replaced_too_often(folder, "read")
        if damaged:
            self.damaged += damaged
            each = "; ".join(f"step {d.step} is damaged ({d.why})" for d in damaged)
            raise DamagedFile(
                f"no usable checkpoint in {folder}: {each}; move it aside to start over, or use a new --workdir"
            )
        return None

    @staticmethod
    def _restore_step(manager: ocp.CheckpointManager, folder: Path, step: int, abstract_state: Any):
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            if not isinstance(meta, dict):
                raise ValueError("its meta is not a JSON object")
        except Exception as e:
            raise_if_system_fault(e, folder / str(step))
            raise DamagedFile(f"meta unreadable: {_first_line(e)}") from None
        integrity = meta.pop("integrity", None) or {}
        want = state_layout(abstract_state)
        if "layout" in integrity and integrity["layout"] != want:
            diff = next(((a, b) for a, b in zip(integrity["layout"], want) if a != b), None)
            detail = f"{diff[0][0]} is {diff[0][1]} there, {diff[1][1]} here" if diff else "different leaves"
            raise ConfigError(
                f"checkpoint step {step} in {folder} holds a model of another shape than this config ({detail}); "
                "use a new --workdir"
            )
        try:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            with _no_closed_loop_noise():
                state = manager.restore(step, args=args).state
        except Exception as e:
            raise_if_system_fault(e, folder / str(step))
            raise DamagedFile(f"arrays unreadable: {_first_line(e)}") from None
        host = to_host(state)  # with several processes, every one of them computes the digest
        if "sha256" in integrity and state_digest(host) != integrity["sha256"]:
            raise DamagedFile("its arrays do not match the sha256 saved with them")
        diverged = meta.get("diverged") or []
        expected = [i for i in nonfinite_seeds(host.params) if i >= len(diverged) or diverged[i] is None]
        if expected:
            raise DamagedFile(f"non-finite parameters in seed index {expected[0]}, which had not diverged")
        return state, meta

    def restore_latest(self, abstract_state: Any):
        """(state, meta) of the newest latest checkpoint that verifies, or None when there is none."""
        return self._restore(self._latest, self.latest_dir, abstract_state)

    def restore_best(self, abstract_state: Any):
        return self._restore(self._best, self.best_dir, abstract_state)

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def describe_latest(self) -> str:
        step = self._latest.latest_step()
        if step is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is step {step} in {self.latest_dir / str(step)}"

    def close(self) -> None:
        self._latest.close()
        self._best.close()


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, or None when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def set_aside(run: RunDir, damaged: list[Damaged]) -> None:
    """Move damaged checkpoints to ``damaged/`` (out of orbax's sight; kept for inspection), with a note each."""
    for d in damaged:
        source = d.folder / str(d.step)
        if not source.is_dir():
            continue
        target = run / DAMAGED / f"{d.folder.name}_{d.step}"
        n = 1
        while target.exists():
            n += 1
            target = run / DAMAGED / f"{d.folder.name}_{d.step}_{n}"
        target.parent.mkdir(exist_ok=True)
        source.rename(target)
        note(f"moved damaged checkpoint {source} to {target}")
