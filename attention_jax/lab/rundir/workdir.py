"""``RunDir``: one run's workdir, its files by name, read and written only through here.

It ties the other modules together: the files' names and JSON (``rundir.py``),
the lock (``lock.py``), metrics (``metrics.py``), checkpoints
(``checkpoints.py``), and the faults they raise (``faults.py``).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

from attention_jax.data import CharTokenizer
from attention_jax.lab.errors import ConfigError
from attention_jax.lab.rundir.checkpoints import Checkpoints
from attention_jax.lab.rundir.faults import DamagedFile, RunDirError
from attention_jax.lab.rundir.lock import WorkdirLock
from attention_jax.lab.rundir.metrics import TENSORBOARD_TAGS, MetricsWriter
from attention_jax.lab.rundir.rundir import (
    BEST,
    CHECKPOINTS,
    CONFIG,
    DATASET,
    METRICS,
    SAMPLE,
    SUMMARY,
    SWEEP_POINT,
    TOKENIZER,
    json_safe,
    note,
    read_json,
    read_jsonl,
    write_json,
)

# Keys that may differ between the config of a run and the config that resumes it.
RESUMABLE_CHANGES = frozenset({"max_iters", "checkpoint_every", "log_interval", "steps_per_call", "sample_tokens"})
# Where a run's processes run (each has its own process_id) and what a Ray task asks for are not
# what the run computes; "distributed" itself was one True/False key before it became a group.
DISTRIBUTED_KEYS = ("enabled", "coordinator_address", "num_processes", "process_id", "join_timeout_s",
                    "heartbeat_timeout_s")  # fmt: skip
RESUMABLE_CHANGES |= {"distributed", *(f"distributed.{key}" for key in DISTRIBUTED_KEYS)}
RESUMABLE_CHANGES |= {f"ray.{key}" for key in ("num_cpus", "num_gpus", "tpu_chips", "hosts", "max_retries")}
# Keys added after runs were written, with the value that computes what those runs computed: a run whose
# config lacks one resumes with that value, and is refused with any other.
# (Keys whose value was None then, such as model.softcap or model.window, need no entry: a missing key reads None.)
ADDED_KEYS = {"z_loss": 0.0, "model.qk_norm_gain": True, "model.sinks": False, "model.logn_learned": False,
              "model.qkv_bias": False, "model.activation": "gelu_tanh", "model.norm_epsilon": 1e-5,
              "model.attn_scale_by_layer": False, "model.scan_layers": False}  # fmt: skip


class RunDir:
    """One run's workdir: its files by name, read and written only through here."""

    def __init__(self, path: str | os.PathLike):
        # absolute(), not resolve(): a workdir reached through a symlink (or /proc/<pid>/root) stays that path
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
        config = read_json(self / CONFIG)
        if not isinstance(config, dict):
            raise DamagedFile(f"{self / CONFIG} is damaged: it holds {type(config).__name__}, not a config")
        return config

    def write_config(self, resolved: dict) -> None:
        write_json(self / CONFIG, resolved)

    def check_same_config(self, resolved: dict) -> None:
        """Refuse to resume a workdir that holds a run of a different config."""
        if not self.has_config():
            return
        try:
            old = self.read_config()
        except DamagedFile as e:
            raise DamagedFile(f"{e}; restore it from a copy, or use a new --workdir") from None
        diffs = []

        def walk(a, b, prefix=""):
            for key in sorted(set(a) | set(b)):
                full = prefix + key
                if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                    walk(a[key], b[key], full + ".")
                elif key not in a and full in ADDED_KEYS and b.get(key) == ADDED_KEYS[full]:
                    continue
                elif a.get(key) != b.get(key) and full not in RESUMABLE_CHANGES:
                    diffs.append(f"{full}: {a.get(key)!r} -> {b.get(key)!r}")

        walk(old, json_safe(resolved))
        if diffs:
            raise ConfigError(
                f"workdir {self.path} holds a run with a different config ({'; '.join(diffs[:3])}); "
                "use a new --workdir, or delete this one to start over"
            )

    def check_resumable(self, resolved: dict, tokenizer: CharTokenizer, fingerprint: dict) -> None:
        """Refuse, before anything is written, to resume a run with another config, dataset or vocabulary.

        Reads config.json, tokenizer.json and dataset.json where they exist; a
        workdir with checkpoints but no config.json is refused too (nothing
        says what they were trained on).
        """
        self.check_same_config(resolved)
        if not self.has_config() and (self.has_checkpoint("latest") or self.has_checkpoint("best")):
            raise RunDirError(
                f"workdir {self.path} holds checkpoints but no {CONFIG}, so nothing says what they were trained on; "
                f"restore {CONFIG} from a copy, or use a new --workdir"
            )
        new_start = "use a new --workdir to train on it, or restore the original data to resume this run"
        if (self / TOKENIZER).is_file():
            old = self.read_tokenizer()
            if old != tokenizer:
                added = "".join(sorted(set(tokenizer.chars) - set(old.chars)))
                removed = "".join(sorted(set(old.chars) - set(tokenizer.chars)))
                change = ", ".join(x for x in (added and f"added {added!r}", removed and f"removed {removed!r}") if x)
                raise RunDirError(
                    f"the dataset's vocabulary differs from the run's in {self.path} "
                    f"({change or 'same characters, other order'}; {old.vocab_size} -> {tokenizer.vocab_size} "
                    f"characters), so token ids would change meaning; {new_start}"
                )
        if (self / DATASET).is_file():
            old = read_json(self / DATASET)
            if not isinstance(old, dict) or "sha256" not in old:
                raise DamagedFile(f"{self / DATASET} is damaged: no sha256; restore it from a copy, or delete it")
            if old["sha256"] != fingerprint["sha256"]:
                raise RunDirError(
                    f"data.dataset={fingerprint['dataset']!r} differs from the data the run in {self.path} was "
                    f"trained on ({old['characters']} -> {fingerprint['characters']} characters, sha256 "
                    f"{old['sha256'][:12]}... -> {fingerprint['sha256'][:12]}...), so the batches would differ; "
                    f"{new_start}"
                )

    def write_start(self, resolved: dict, tokenizer: CharTokenizer, fingerprint: dict) -> None:
        """The files that describe a run: config.json, tokenizer.json, dataset.json."""
        self.create()
        self.write_config(resolved)
        self.write_tokenizer(tokenizer)
        write_json(self / DATASET, fingerprint)

    # -- the lock --------------------------------------------------------------
    def lock(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        """Hold this workdir's ``train.lock`` for the ``with`` block (see :class:`WorkdirLock`)."""
        return WorkdirLock(self) if enabled else contextlib.nullcontext()

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

    def read_summary(self) -> dict | None:
        """The summary of a finished run; None (with a note) when summary.json is damaged: it is rebuilt."""
        try:
            summary = read_json(self / SUMMARY)
        except DamagedFile as e:
            note(f"{e}; writing it again")
            return None
        return summary if isinstance(summary, dict) else None

    def write_summary(self, summary: dict) -> None:
        write_json(self / SUMMARY, summary)

    def remove_summary(self) -> None:
        (self / SUMMARY).unlink(missing_ok=True)

    # -- metrics -------------------------------------------------------------
    def read_metrics(self, damaged: list[int] | None = None) -> list[dict]:
        """The rows of metrics.jsonl, with null values read back as NaN."""
        rows = read_jsonl(self / METRICS, damaged)
        for row in rows:
            for key in TENSORBOARD_TAGS:
                if key in row and row[key] is None:
                    row[key] = math.nan
        return rows

    def metrics_writer(self, boards: list[str], keep_up_to_step: int = -1, enabled: bool = True) -> MetricsWriter:
        return MetricsWriter(self, boards, keep_up_to_step=keep_up_to_step, enabled=enabled)

    # -- checkpoints and sweep records ----------------------------------------
    def checkpoints(self, writable: bool = True) -> Checkpoints:
        """The run's checkpoints; ``writable=False`` opens them read-only (readers: nothing is created or deleted)."""
        return Checkpoints(self.path, writable=writable)

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
            record = read_json(self / SWEEP_POINT)
        except (FileNotFoundError, DamagedFile):
            return None
        return record if isinstance(record, dict) else None

    def write_point_record(self, record: dict) -> None:
        write_json(self / SWEEP_POINT, record)
