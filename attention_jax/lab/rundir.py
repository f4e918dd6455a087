"""The run directory: every file name of a run, and the only code that reads or writes them.

A run's workdir holds::

    config.json        the resolved experiment config
    tokenizer.json     the characters of the vocabulary, in id order
    metrics.jsonl      one JSON object per line: training rows (step, member, seed, loss,
                       lr, grad_norm, tokens_per_s) and evaluation rows (step, member,
                       seed, train_loss, val_loss); member is the model's index in this run
    tensorboard/       the same scalars as TensorBoard event files, one folder per member
    checkpoints/<step> the latest orbax checkpoint (for resuming)
    best/<step>        the checkpoint of each seed's best val loss so far
    sample.txt         text sampled from each seed's final parameters
    summary.json       written last: the run finished
    sweep_point.json   in a sweep: the point's overrides and status

On resume, metrics rows past the restored checkpoint (written after it, then
lost with the process) are dropped, so the files of a resumed run equal those
of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from attention_jax.data import CharTokenizer
from attention_jax.lab import population
from attention_jax.lab.config import ConfigError, build_model, from_dict, model_config
from attention_jax.lab.steps import TrainState, abstract_train_state, make_optimizer

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
BEST = "best"
SAMPLE = "sample.txt"
SUMMARY = "summary.json"
SWEEP_POINT = "sweep_point.json"

# Keys that may differ between the config of a run and the config that resumes it.
RESUMABLE_CHANGES = frozenset({"max_iters", "checkpoint_every", "log_interval", "steps_per_call", "sample_tokens"})
# Where a run's processes run (each has its own process_id) and what a Ray task asks for are not
# what the run computes; "distributed" itself was one True/False key before it became a group.
DISTRIBUTED_KEYS = ("enabled", "coordinator_address", "num_processes", "process_id", "join_timeout_s",
                    "heartbeat_timeout_s")  # fmt: skip
RESUMABLE_CHANGES |= {"distributed", *(f"distributed.{key}" for key in DISTRIBUTED_KEYS)}
RESUMABLE_CHANGES |= {f"ray.{key}" for key in ("num_cpus", "num_gpus", "tpu_chips", "hosts", "max_retries")}


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON atomically (a temporary file, then a rename): readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file; a torn last line (process killed mid-write) is skipped."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunDir:
    """One run's workdir: its files by name, read and written only through here."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    # -- config -------------------------------------------------------------
    def has_config(self) -> bool:
        return (self / CONFIG).is_file()

    def read_config(self) -> dict:
        return read_json(self / CONFIG)

    def write_config(self, resolved: dict) -> None:
        write_json(self / CONFIG, resolved)

    def check_same_config(self, resolved: dict) -> None:
        """Refuse to resume a workdir that holds a run of a different config."""
        if not self.has_config():
            return
        old = self.read_config()
        diffs = []

        def walk(a, b, prefix=""):
            for key in sorted(set(a) | set(b)):
                full = prefix + key
                if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                    walk(a[key], b[key], full + ".")
                elif a.get(key) != b.get(key) and full not in RESUMABLE_CHANGES:
                    diffs.append(f"{full}: {a.get(key)!r} -> {b.get(key)!r}")

        walk(old, resolved)
        if diffs:
            raise ConfigError(
                f"workdir {self.path} holds a run with a different config ({'; '.join(diffs[:3])}); "
                "use a new --workdir, or delete this one to start over"
            )

    # -- tokenizer, samples, summary ------------------------------------------
    def read_tokenizer(self) -> CharTokenizer:
        return CharTokenizer.load(self / TOKENIZER)

    def write_tokenizer(self, tokenizer: CharTokenizer) -> None:
        tokenizer.save(self / TOKENIZER)

    def write_samples(self, seeds: list[int], texts: list[str]) -> None:
        body = "".join(f"=== seed {seed} ===\n{text}\n" for seed, text in zip(seeds, texts))
        tmp = self / f"{SAMPLE}.tmp{os.getpid()}"
        tmp.write_text(body, encoding="utf-8")
        tmp.replace(self / SAMPLE)

    def has_summary(self) -> bool:
        return (self / SUMMARY).is_file()

    def read_summary(self) -> dict:
        return read_json(self / SUMMARY)

    def write_summary(self, summary: dict) -> None:
        write_json(self / SUMMARY, summary)

    def remove_summary(self) -> None:
        (self / SUMMARY).unlink(missing_ok=True)

    # -- metrics -------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        return read_jsonl(self / METRICS)

    def metrics_writer(self, boards: list[str], keep_up_to_step: int = -1, enabled: bool = True) -> MetricsWriter:
        return MetricsWriter(self, boards, keep_up_to_step=keep_up_to_step, enabled=enabled)

    # -- checkpoints and sweep records ----------------------------------------
    def checkpoints(self) -> Checkpoints:
        return Checkpoints(self.path)

    def has_checkpoint(self, which: str = "latest") -> bool:
        return (self / (BEST if which == "best" else CHECKPOINTS)).is_dir()

    def latest_checkpoint_step(self) -> int:
        """The step of the latest finished checkpoint (0 without one), read from folder names only."""
        folder = self / CHECKPOINTS
        steps = [int(d.name) for d in folder.iterdir() if d.name.isdigit()] if folder.is_dir() else []
        return max(steps, default=0)

    def read_point_record(self) -> dict | None:
        """The sweep record of this point, or None (absent or unreadable)."""
        try:
            return read_json(self / SWEEP_POINT)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_point_record(self, record: dict) -> None:
        write_json(self / SWEEP_POINT, record)


# ---------------------------------------------------------------------------
# Metrics: metrics.jsonl and TensorBoard event files, the same rows
# ---------------------------------------------------------------------------

# metrics.jsonl key -> TensorBoard tag
TENSORBOARD_TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "train_loss": "eval/train_loss",
    "val_loss": "eval/val_loss",
}


class MetricsWriter:
    """Appends rows to metrics.jsonl and the same scalars to TensorBoard, one event folder per member.

    ``boards[i]`` names the TensorBoard folder of the rows whose ``member`` is i
    (``seed_1337``, or a population member's values). Rows after
    ``keep_up_to_step`` are dropped from metrics.jsonl when it opens, and
    TensorBoard is told to purge its events after that step.
    """

    def __init__(self, run: RunDir, boards: list[str], keep_up_to_step: int = -1, enabled: bool = True):
        self._file = None
        self._boards: dict[int, Any] = {}
        if not enabled:  # a non-writing process of a multi-host run
            return
        path = run / METRICS
        kept = [r for r in read_jsonl(path) if r.get("step", -1) <= keep_up_to_step]
        tmp = path.with_name(METRICS + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(path)
        self._file = open(path, "a", encoding="utf-8")
        from tensorboardX import SummaryWriter

        session = f".{time.time_ns()}"  # event file names hold the time in seconds: a resumed run must not clobber
        for i, name in enumerate(boards):
            # purge_step: TensorBoard discards events of earlier sessions from this step on.
            self._boards[i] = SummaryWriter(
                str(run / TENSORBOARD / name),
                purge_step=keep_up_to_step + 1,
                flush_secs=10,
                filename_suffix=session,
            )

    def write_many(self, rows: list[dict]) -> None:
        if self._file is None:
            return
        for row in rows:
            self._file.write(json.dumps(row) + "\n")
            board = self._boards.get(row.get("member"))
            if board is not None:
                for key, tag in TENSORBOARD_TAGS.items():
                    if key in row:
                        board.add_scalar(tag, row[key], global_step=row["step"])
        self._file.flush()
        for board in self._boards.values():
            board.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        for board in self._boards.values():
            board.close()


# ---------------------------------------------------------------------------
# Checkpoints: orbax, the latest (for resuming) and the best by val loss
# ---------------------------------------------------------------------------


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
    """The latest and best checkpoints of one workdir.

    Orbax writes each checkpoint to a temporary folder and renames it when
    complete, so a process killed mid-save leaves the previous checkpoint
    intact and no half-written one that a resume could pick up.
    """

    def __init__(self, workdir: str | Path):
        workdir = Path(workdir).absolute()
        self.latest_dir = workdir / CHECKPOINTS
        self.best_dir = workdir / BEST
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


# ---------------------------------------------------------------------------
# Loading a finished (or running) run: for sampling and reports
# ---------------------------------------------------------------------------


@dataclass
class Run:
    """A run loaded from its workdir; ``state`` has a leading member axis (its seeds, or its population)."""

    config: ml_collections.ConfigDict
    model: nn.Module
    tokenizer: CharTokenizer
    state: TrainState

    @property
    def num_members(self) -> int:
        return int(self.state.step.shape[0])

    def params(self, member: int = 0) -> Any:
        """The parameters of one member (its index in the run: metrics rows' ``member``)."""
        if not 0 <= member < self.num_members:
            raise ValueError(f"member index must be in [0, {self.num_members}), got {member}")
        return jax.tree_util.tree_map(lambda a: a[member], self.state.params)

    def step(self, member: int = 0) -> int:
        return int(self.state.step[member])


def load_run(workdir: str | os.PathLike, which: str = "latest") -> Run:
    """The config, model, tokenizer and state of a run's latest or best checkpoint."""
    run = RunDir(workdir)
    if not run.has_config():
        raise FileNotFoundError(f"no run in {run.path}: {CONFIG} is missing (train one with experiments.train)")
    config = from_dict(run.read_config())
    tokenizer = run.read_tokenizer()
    model = build_model(config, model_config(config, tokenizer.vocab_size))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    block_size, num_members = config.model.block_size, len(population.members(config))
    abstract = abstract_train_state(model, make_optimizer(config), block_size, num_members, sharding)
    checkpoints = run.checkpoints()
    try:
        restored = (checkpoints.restore_best if which == "best" else checkpoints.restore_latest)(abstract)
    finally:
        checkpoints.close()
    if restored is None:
        raise FileNotFoundError(f"no {which} checkpoint in {run.path} yet")
    return Run(config=config, model=model, tokenizer=tokenizer, state=restored[0])
