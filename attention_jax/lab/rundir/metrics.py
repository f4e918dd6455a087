"""Metrics: metrics.jsonl and TensorBoard event files, the same rows."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from attention_jax.lab.rundir.faults import StorageFault, naming
from attention_jax.lab.rundir.rundir import METRICS, TENSORBOARD, json_safe, note, read_jsonl

if TYPE_CHECKING:
    from attention_jax.lab.rundir.workdir import RunDir

# metrics.jsonl key -> TensorBoard tag
TENSORBOARD_TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "train_loss": "eval/train_loss",
    "val_loss": "eval/val_loss",
}


def summary_writer_class() -> type:
    """tensorboardX's ``SummaryWriter``, imported without PyTorch.

    tensorboardX imports torch whenever it is installed, only to accept torch
    tensors; the run writes floats. That import costs every training process
    about 1 s and 200 MB (measured with ``python -X importtime``, torch 2.13 CPU).
    While tensorboardX loads, ``import torch`` fails as if torch were missing
    (tensorboardX expects that); torch imports normally afterwards. Where torch
    is already loaded, nothing is hidden.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # the import system's mark for "cannot be imported"
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends rows to metrics.jsonl and the same scalars to TensorBoard, one event folder per member.

    ``boards[i]`` names the TensorBoard folder of the rows whose ``member`` is i
    (``seed_1337``, or a population member's values). Rows after
    ``keep_up_to_step`` are dropped from metrics.jsonl when it opens (the file
    is rewritten atomically; a damaged row is dropped with a note naming its
    line), and TensorBoard is told to purge its events after that step. NaN and
    infinite values are written as null (strict JSON).
    """

    def __init__(self, run: RunDir, boards: list[str], keep_up_to_step: int = -1, enabled: bool = True):
        self._file = None
        self._boards: dict[int, Any] = {}
        if not enabled:  # a non-writing process of a multi-host run
            return
        path = run / METRICS
        damaged: list[int] = []
        kept = [r for r in read_jsonl(path, damaged) if _step_of(r) <= keep_up_to_step]
        if damaged:
            lines = ", ".join(map(str, damaged[:5])) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
            note(f"{path}: line {lines} not valid JSON (cut short by a crash, or damaged); dropped")
        tmp = path.with_name(f"{METRICS}.tmp{os.getpid()}")
        with naming(path):
            tmp.write_text("".join(_json_line(r) for r in kept), encoding="utf-8")
        tmp.replace(path)
        self._file = open(path, "a", encoding="utf-8")
        SummaryWriter = summary_writer_class()

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
        if os.fstat(self._file.fileno()).st_nlink == 0:  # deleted under us: the rows would go nowhere
            raise StorageFault(errno.ENOENT, self._file.name)
        with naming(self._file.name):
            self._write_many(rows)

    def _write_many(self, rows: list[dict]) -> None:
        for row in rows:
            self._file.write(_json_line(row))
            board = self._boards.get(row.get("member"))
            if board is not None:
                for key, tag in TENSORBOARD_TAGS.items():
                    if key in row:
                        board.add_scalar(tag, row[key], global_step=row["step"])
                for tag, value in _diagnostic_scalars(row.get("diagnostics", {})):
                    board.add_scalar(tag, value, global_step=row["step"])
        self._file.flush()
        for board in self._boards.values():
            board.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        for board in self._boards.values():
            board.close()


def _diagnostic_scalars(diagnostics: dict) -> list[tuple[str, float]]:
    """A row's stability diagnostics as TensorBoard scalars: ``diagnostics/max_logit/layer_0/head_1``, ...

    Each value is a number, a list per layer, or a list per layer of lists per head.
    """
    out = []

    def walk(tag: str, value, depth: int) -> None:
        if isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{tag}/{('layer', 'head')[min(depth, 1)]}_{i}", v, depth + 1)
        elif value is not None:
            out.append((tag, float(value)))

    for name, value in diagnostics.items():
        walk(f"diagnostics/{name}", value, 0)
    return out


def _json_line(row: dict) -> str:
    return json.dumps(json_safe(row), allow_nan=False) + "\n"


def _step_of(row: dict) -> int:
    step = row.get("step", -1)
    return step if isinstance(step, int) else -1
