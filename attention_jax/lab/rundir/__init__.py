"""The run directory: every file name of a run, and the only code that reads or writes them.

A run's workdir holds::

    config.json        the resolved experiment config
    tokenizer.json     the characters of the vocabulary, in id order
    dataset.json       the dataset's name, size and sha256: resume refuses other data
    metrics.jsonl      one JSON object per line: training rows (step, member, seed, loss,
                       lr, grad_norm, tokens_per_s) and evaluation rows (step, member,
                       seed, train_loss, val_loss); member is the model's index in this run;
                       null stands for a NaN or infinite value
    tensorboard/       the same scalars as TensorBoard event files, one folder per member
    checkpoints/<step> the two latest orbax checkpoints (for resuming)
    best/<step>        the checkpoint of each seed's best val loss so far
    sample.txt         text sampled from each seed's final parameters
    summary.json       written last: the run finished
    sweep_point.json   in a sweep: the point's overrides and status
    train.lock         while a trainer works here: who it is (pid, host, start time)
    damaged/           checkpoints found damaged on resume, moved out of the way

Safety, in short: one trainer per workdir (``train.lock``); readers
(sampling, reports) open checkpoints read-only and never create, rename or
delete anything; every JSON file is written to a temporary file and renamed;
every checkpoint carries the sha256 of its arrays and is verified on restore,
falling back to the previous one when damaged. The README's "What survives
what" lists each fault and the test that shows it.

On resume, metrics rows past the restored checkpoint (written after it, then
lost with the process) are dropped, so the files of a resumed run equal those
of an uninterrupted one.

One concern per module: ``rundir.py`` (the file names, strict JSON),
``workdir.py`` (``RunDir``), ``lock.py`` (``train.lock``), ``metrics.py``
(metrics.jsonl and TensorBoard), ``checkpoints.py`` (verified orbax
checkpoints), ``faults.py`` (one-line errors, the OS's refusals). None of them
imports model or training code: loading a run with its model is
``attention_jax.lab.runs.load_run``.
"""

from __future__ import annotations

from typing import Any

from attention_jax.lab.rundir.checkpoints import (
    KEEP_LATEST,
    Checkpoints,
    Damaged,
    nonfinite_seeds,
    set_aside,
    state_digest,
    state_layout,
    to_host,
    without_closed_loop_noise,
)
from attention_jax.lab.rundir.faults import (
    SYSTEM_ERRNOS,
    DamagedFile,
    RunDirError,
    StorageFault,
    WorkdirBusy,
    naming,
    os_error_in,
    storage_faults,
)
from attention_jax.lab.rundir.lock import WorkdirLock, lock_holder
from attention_jax.lab.rundir.metrics import TENSORBOARD_TAGS, MetricsWriter
from attention_jax.lab.rundir.rundir import (
    BEST,
    CHECKPOINTS,
    CONFIG,
    DAMAGED,
    DATASET,
    LOCK,
    METRICS,
    SAMPLE,
    SUMMARY,
    SWEEP_POINT,
    TENSORBOARD,
    TOKENIZER,
    dataset_fingerprint,
    json_safe,
    note,
    read_json,
    read_jsonl,
    write_json,
)
from attention_jax.lab.rundir.workdir import DISTRIBUTED_KEYS, RESUMABLE_CHANGES, RunDir

__all__ = [
    "BEST", "CHECKPOINTS", "CONFIG", "DAMAGED", "DATASET", "DISTRIBUTED_KEYS", "KEEP_LATEST", "LOCK", "METRICS",
    "RESUMABLE_CHANGES", "SAMPLE", "SUMMARY", "SWEEP_POINT", "SYSTEM_ERRNOS", "TENSORBOARD", "TENSORBOARD_TAGS",
    "TOKENIZER", "Checkpoints", "Damaged", "DamagedFile", "MetricsWriter", "RunDir", "RunDirError", "StorageFault",
    "WorkdirBusy", "WorkdirLock", "dataset_fingerprint", "json_safe", "lock_holder", "naming", "nonfinite_seeds",
    "note", "os_error_in", "read_json", "read_jsonl", "set_aside", "state_digest", "state_layout", "storage_faults",
    "to_host", "without_closed_loop_noise", "write_json",
]  # fmt: skip

# Moved to attention_jax.lab.runs (they build models); still found here, imported only when asked for.
_MOVED_TO_RUNS = ("Run", "load_run")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_RUNS:  # deprecated here: import it from attention_jax.lab.runs
        from attention_jax.lab import runs

        return getattr(runs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
