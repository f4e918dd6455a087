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
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from attention_jax.data import CharTokenizer
from attention_jax.lab import population
from attention_jax.lab.config import ConfigError, build_model, from_dict, model_config
from attention_jax.lab.steps import TrainState, abstract_train_state, make_optimizer, to_host

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
DATASET = "dataset.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
BEST = "best"
SAMPLE = "sample.txt"
SUMMARY = "summary.json"
SWEEP_POINT = "sweep_point.json"
LOCK = "train.lock"
DAMAGED = "damaged"

# Keys that may differ between the config of a run and the config that resumes it.
RESUMABLE_CHANGES = frozenset({"max_iters", "checkpoint_every", "log_interval", "steps_per_call", "sample_tokens"})
# Where a run's processes run (each has its own process_id) and what a Ray task asks for are not
# what the run computes; "distributed" itself was one True/False key before it became a group.
DISTRIBUTED_KEYS = ("enabled", "coordinator_address", "num_processes", "process_id", "join_timeout_s",
                    "heartbeat_timeout_s")  # fmt: skip
RESUMABLE_CHANGES |= {"distributed", *(f"distributed.{key}" for key in DISTRIBUTED_KEYS)}
RESUMABLE_CHANGES |= {f"ray.{key}" for key in ("num_cpus", "num_gpus", "tpu_chips", "hosts", "max_retries")}

# Latest checkpoints kept: the newest, and one to fall back to when the newest is damaged.
# Costs one more checkpoint of disk (params + AdamW moments: 12 bytes per parameter).
KEEP_LATEST = 2


# ---------------------------------------------------------------------------
# Errors: each message is one line that names the file
# ---------------------------------------------------------------------------


class RunDirError(ValueError):
    """A run directory that cannot be used as it is: in use, damaged, or made from other data."""


class WorkdirBusy(RunDirError):
    """Another trainer holds the workdir's lock."""


class DamagedFile(RunDirError):
    """A file of a run that cannot be read back (not JSON, cut short, checksum mismatch)."""


# What the OS said, in words, and what to do about it.
_CAUSES = {
    errno.ENOSPC: ("no space left on device", "free some space, then rerun the same command"),
    errno.EDQUOT: ("disk quota exceeded", "free some space, then rerun the same command"),
    errno.EROFS: ("read-only file system", "remount it read-write or use another --workdir"),
    errno.EACCES: ("permission denied", "check its permissions for this user, or use another --workdir"),
    errno.EPERM: ("operation not permitted", "check its permissions for this user, or use another --workdir"),
    errno.EIO: ("input/output error", "the storage reported an error: check the disk, then rerun the same command"),
    errno.ENOENT: ("no such file or directory", "it was deleted, moved or unmounted while in use"),
}
SYSTEM_ERRNOS = frozenset(code for code in _CAUSES if code != errno.ENOENT)


class StorageFault(OSError):
    """The OS refused to read or write a run directory: disk full, read-only, permission denied, vanished.

    ``str()`` is one line: the path, the cause, what to do, and (``last_good``)
    where training can resume from.
    """

    def __init__(self, code: int, path: str | os.PathLike, last_good: str = ""):
        cause, self.advice = _CAUSES.get(code, (os.strerror(code).lower(), "rerun the same command"))
        super().__init__(code, cause, str(path))
        self.last_good = last_good

    def __str__(self) -> str:
        # After a vanished workdir there is no checkpoint left to point at.
        tail = (
            f" {self.last_good[0].upper()}{self.last_good[1:]}."
            if self.last_good and self.errno != errno.ENOENT
            else ""
        )
        return f"{self.filename}: {self.strerror}; {self.advice}.{tail}"


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError with a known errno behind ``exc``: itself, its causes, or (tensorstore) its text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _CAUSES:
            return exc
        text = str(exc)
        for code in SYSTEM_ERRNOS:
            if os.strerror(code) in text:  # "No space left on device" inside an orbax/tensorstore message
                return OSError(code, os.strerror(code))
        exc = exc.__cause__ if exc.__cause__ is not None else None if exc.__suppress_context__ else exc.__context__
    return None


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Give an OSError raised by a write (which names no file) the file it was writing."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


@contextlib.contextmanager
def storage_faults(workdir: Path, last_good: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Turn the OS's refusals while working in ``workdir`` into one-line ``StorageFault`` errors."""
    try:
        yield
    except StorageFault as e:
        if not e.last_good:
            e.last_good = last_good()
        raise
    except (ConfigError, RunDirError):
        raise  # already one line about the input
    except Exception as e:
        err = os_error_in(e)
        if err is None:
            raise
        if err.errno == errno.ENOENT:
            if not _vanished(workdir):
                raise  # a missing file, not a vanished workdir: let it speak for itself
            raise StorageFault(errno.ENOENT, f"the workdir {workdir}") from e
        raise StorageFault(err.errno, err.filename or workdir, last_good()) from e


def _vanished(workdir: Path) -> bool:
    """Whether ``workdir`` is gone, or (orbax recreates folders as it saves) is no longer the folder
    whose lock this process holds (so call this inside the lock's ``with`` block)."""
    lock = workdir / LOCK
    return not workdir.exists() or (str(lock) in WorkdirLock._held and not lock.exists())


# ---------------------------------------------------------------------------
# JSON and JSONL: atomic writes, strict JSON (no NaN/Infinity), damaged files named
# ---------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, so that it is strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write strict JSON atomically (a temporary file, synced, then a rename): readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    text = json.dumps(json_safe(payload), indent=2, default=str, allow_nan=False)
    try:
        with naming(path), open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data (power loss)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; a file that is not JSON raises ``DamagedFile`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{path} is damaged: not valid JSON ({e})") from None


def read_jsonl(path: str | os.PathLike, damaged: list[int] | None = None) -> list[dict]:
    """Rows of a JSONL file. Lines that are not JSON objects (a torn last line after a crash,
    or damage) are skipped, and their line numbers appended to ``damaged``."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif damaged is not None:
            damaged.append(number)
    return rows


def note(message: str) -> None:
    """One line on stderr about something the user should know but that does not stop the command."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def dataset_fingerprint(dataset: str, text: str) -> dict:
    """What identifies a run's data: its name, length and the sha256 of its UTF-8 bytes
    (for a file, the same digest ``sha256sum`` prints)."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return {"dataset": str(dataset), "characters": len(text), "sha256": digest}


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


# ---------------------------------------------------------------------------
# The lock: one trainer per workdir
# ---------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(pid, 0) succeeded


class WorkdirLock:
    """An exclusive lock on a workdir, held by the process that trains in it.

    ``train.lock`` holds the holder's pid, host and start time. The lock itself
    is ``flock`` on that file: the kernel drops it when the process dies, even
    by ``kill -9``, so a lock left by a dead process never blocks the next run
    (the file stays, with the dead holder's details, and is taken over). On NFS
    Linux maps ``flock`` to NFS byte-range locks, which hold across machines
    when the server supports locking. Where ``flock`` is refused (ENOLCK,
    ENOTSUP: some network file systems), the lock is the file itself, created
    exclusively; a stale one is taken over only when its holder's host is this
    host and its pid is gone, else the message says which file to delete.
    Re-entrant within one process (the sweep runner holds it around ``train``).
    """

    _held: dict[str, int] = {}  # lock path -> depth, in this process

    def __init__(self, run: RunDir):
        self.run = run
        self.path = run / LOCK
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        key = str(self.path)
        if key in self._held:
            self._held[key] += 1
            return self
        try:
            self.run.create()
            self._fd = self._acquire()
        except OSError as e:
            if e.errno in SYSTEM_ERRNOS:  # a read-only, full or forbidden workdir: one line, exit 4
                raise StorageFault(e.errno, e.filename or self.path) from e
            raise
        self._held[key] = 1
        return self

    def __exit__(self, *exc) -> None:
        key = str(self.path)
        self._held[key] -= 1
        if self._held[key]:
            return
        del self._held[key]
        with contextlib.suppress(OSError):  # vanished workdir: nothing left to release
            self.path.unlink()  # before unlocking: a waiter that opened this file sees it is gone and retries
        os.close(self._fd)
        self._fd = None

    def _acquire(self) -> int:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise WorkdirBusy(self._busy_message(holder, "wait for it to finish or stop it")) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL):
                    return self._acquire_by_creation()
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    with naming(self.path):
                        _write_holder(fd)
                except OSError:  # disk full, say: leave no empty lock file behind
                    self.path.unlink(missing_ok=True)
                    os.close(fd)
                    raise
                return fd
            os.close(fd)  # released and unlinked between our open and flock: try the new file

    def _acquire_by_creation(self) -> int:
        """The lock as an exclusively created file, for file systems without flock."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                with open(self.path, "rb") as f:
                    holder = _parse_holder(f.read())
                if holder and holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid", -1)):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                if not holder:  # being written right now, or empty: look again shortly
                    time.sleep(0.2)
                    continue
                advice = f"wait for it to finish; if it no longer runs, delete {self.path}"
                raise WorkdirBusy(self._busy_message(holder, advice)) from None
            try:
                with naming(self.path):
                    _write_holder(fd)
            except OSError:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            return fd
        raise WorkdirBusy(self._busy_message({}, f"if no trainer runs there, delete {self.path}"))

    def _busy_message(self, holder: dict, advice: str) -> str:
        who = (
            f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
            if holder
            else "another process"
        )
        where = f"workdir {self.run.path} is in use by a trainer ({who}; lock {self.path})"
        return f"{where}; {advice}, or use another --workdir"


def _holder_info() -> bytes:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": " ".join(sys.argv)[:500]}
    return json.dumps(info).encode()


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_info(), 0)
    os.fsync(fd)


def _parse_holder(raw: bytes) -> dict:
    try:
        holder = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def lock_holder(workdir: str | os.PathLike) -> dict | None:
    """Which other process seems to hold ``workdir``'s lock (pid, host, started), read without locking;
    None when none does.

    A lock file left by a dead process on this host counts as none; one from
    another host cannot be checked from here and counts as held.
    """
    try:
        holder = _parse_holder((RunDir(workdir) / LOCK).read_bytes())
    except OSError:
        return None
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid", -1)
        if pid == os.getpid() or not _pid_alive(pid):
            return None
    return holder or None


def _read_holder(fd: int) -> dict:
    try:
        return _parse_holder(os.pread(fd, 4096, 0))
    except OSError:
        return {}


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
        self._file.flush()
        for board in self._boards.values():
            board.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        for board in self._boards.values():
            board.close()


def _json_line(row: dict) -> str:
    return json.dumps(json_safe(row), allow_nan=False) + "\n"


def _step_of(row: dict) -> int:
    step = row.get("step", -1)
    return step if isinstance(step, int) else -1


# ---------------------------------------------------------------------------
# Checkpoints: orbax, the latest (for resuming) and the best by val loss
# ---------------------------------------------------------------------------


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
            return ocp.CheckpointManager(path, options=options)
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
            _raise_if_system_fault(e, Path(manager.directory) / str(step))
            raise
        finally:
            self.saving = False

    def save_latest(self, step: int, state: Any, meta: dict) -> None:
        self._save(self._latest, step, state, meta)

    def save_best(self, step: int, state: Any, meta: dict) -> None:
        self._save(self._best, step, state, meta)

    def _restore(self, manager: ocp.CheckpointManager, folder: Path, abstract_state: Any):
        """(state, meta) of the newest checkpoint that verifies, or None when there is none."""
        damaged: list[Damaged] = []
        for _ in range(3):  # a live trainer may replace a checkpoint while we read it: then list again
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
            manager.reload()
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
            _raise_if_system_fault(e, folder / str(step))
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
            _raise_if_system_fault(e, folder / str(step))
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


def _raise_if_system_fault(e: BaseException, path: Path) -> None:
    """A read the OS refused (permission, I/O error) is a storage fault, not a damaged checkpoint."""
    err = os_error_in(e)
    if err is not None and err.errno in SYSTEM_ERRNOS:
        raise StorageFault(err.errno, path) from e


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
    diverged: list[int | None] = field(default_factory=list)  # per member: the step its loss became NaN/Inf

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

    def model_for(self, member: int = 0) -> nn.Module:
        """The model of one member: ``model``, with the member's attention scale where a population sets it."""
        pop = population.members(self.config)
        scales = population.attention_scales(self.config, pop, self.model.model_config.head_dim)
        if scales is None:
            return self.model
        return self.model.clone(model_config=self.model.model_config.replace(attn_scale=float(scales[member])))


def load_run(workdir: str | os.PathLike, which: str = "latest") -> Run:
    """The config, model, tokenizer and state of a run's latest or best checkpoint; reads only.

    Works on a run in progress: it reads the newest finished checkpoint.
    """
    run = RunDir(workdir)
    if not run.has_config():
        raise FileNotFoundError(f"no run in {run.path}: {CONFIG} is missing (train one with experiments.train)")
    config = from_dict(run.read_config())
    tokenizer = run.read_tokenizer()
    model = build_model(config, model_config(config, tokenizer.vocab_size))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    block_size, num_members = config.model.block_size, len(population.members(config))
    abstract = abstract_train_state(model, make_optimizer(config), block_size, num_members, sharding)
    restored = None
    if run.has_checkpoint(which):
        checkpoints = run.checkpoints(writable=False)
        try:
            restored = (checkpoints.restore_best if which == "best" else checkpoints.restore_latest)(abstract)
        finally:
            checkpoints.close()
    if restored is None:
        raise FileNotFoundError(f"no {which} checkpoint in {run.path} yet")
    state, _ = restored
    diverged = [int(d) or None for d in to_host(state.diverged_at)]
    return Run(config=config, model=model, tokenizer=tokenizer, state=state, diverged=diverged)
