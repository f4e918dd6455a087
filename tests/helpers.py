"""Helpers shared by the test folders (conftest.py exposes them as fixtures too)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the checkout: configs/, experiments/, benchmarks/
SMOKE = "configs/shakespeare_char.py:smoke"
TINY = {"model.block_size": 8, "model.n_embd": 16, "model.n_layer": 1, "sample_tokens": 0}  # the tiny_config fixture
# The uninterrupted reference run of the resume tests (tests/lab/conftest.py ``reference_run``): checkpoints every
# 5 steps, evaluations every 10, 60 steps. Its learning-rate schedule ends at lr_decay_iters (20 in the smoke
# config), not at max_iters, and the checkpoint interval changes no row, so its rows up to step N are exactly those
# of the same run trained to N (a multiple of 10): a resume compares with that prefix (``rows_up_to``).
REFERENCE = {"max_iters": 60, "checkpoint_every": 5, "eval_interval": 10, "log_interval": 5}
# A finished run with checkpoints at steps 10 and 20 (``source_run``), which resume and damage tests copy and continue.
SOURCE = {"max_iters": 20, "eval_interval": 10, "checkpoint_every": 10, "log_interval": 5}
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"  # tests/conftest.py: XLA:CPU compiles quickly in the tests
WORDS = ["the", "king", "queen", "shall", "not", "be", "my", "lord", "good", "night", "and", "to"]


def make_small_text(n_chars: int = 6000, seed: int = 0) -> str:
    """A deterministic pseudo-English text with some structure to learn (words, full stops, lines)."""
    rng = np.random.default_rng(seed)
    out = []
    while sum(len(w) + 1 for w in out) < n_chars:
        out.append(WORDS[rng.integers(len(WORDS))])
        if rng.random() < 0.1:
            out[-1] += ".\n"
    return " ".join(out)[:n_chars]


def with_devices(n: int, env: dict | None = None) -> dict:
    """``env`` (default: this process's environment) with ``n`` simulated CPU devices, the tests' XLA flags kept."""
    env = dict(os.environ if env is None else env)
    kept = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f)
    env["XLA_FLAGS"] = f"{kept} --xla_force_host_platform_device_count={n}".strip()
    return env


def script_result(script: str, *args, devices: int = 1) -> dict:
    """The JSON object on the last line a Python ``script`` (run with ``args``) prints, on ``devices`` CPU devices.

    In this process when it has that many devices (no interpreter start, no JAX import), else in a
    process of its own with ``devices`` simulated devices.
    """
    import jax

    argv = [str(a) for a in args]
    if devices == jax.device_count():
        out = io.StringIO()
        with mock.patch.object(sys, "argv", ["-c", *argv]), contextlib.redirect_stdout(out):
            exec(script, {"__name__": "__main__"})
        return json.loads(out.getvalue().strip().splitlines()[-1])
    result = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, env=with_devices(devices),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_entry_point(name: str, *args, env: dict | None = None, timeout: float = 300, cwd: Path = ROOT):
    """``python -m experiments.<name> ARGS`` as a user runs it, from the checkout."""
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{name}", *map(str, args)],
        cwd=cwd,
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_command(name: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """``attention_jax.lab.commands.<name>(ARGS)`` in this process, from the checkout, reported as ``run_entry_point``.

    The console scripts are ``sys.exit(commands.<name>())``: the status is the
    command's return value (an argparse usage error raises SystemExit with it).
    Costs no interpreter start and no JAX import; keep subprocesses for tests
    whose subject is the process (signals, kill -9, several processes, install).
    """
    from attention_jax.lab import commands

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        with mock.patch.dict(os.environ, env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = getattr(commands, name.replace("-", "_"))(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess([name, *argv], code, out.getvalue(), err.getvalue())


def tiny_args(workdir, text_file, overrides: dict | None = None) -> list[str]:
    """experiments.train flags for the ``tiny_config`` fixture's config (plus ``overrides``) on ``text_file``."""
    config = {**TINY, "data.dataset": text_file, **(overrides or {})}
    flags = [f"--config.{key}={value}" for key, value in config.items()]
    return ["--config", SMOKE, "--workdir", str(workdir), "--no-progress", *flags]


def assert_one_line_error_result(result, pattern: str, code: int = 2) -> None:
    """Exit ``code``, no traceback, exactly one ``error:`` line, and it matches ``pattern``."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def run_losses(exp, steps_per_call: int, calls: int):
    """Losses (calls * steps_per_call,) of seed 0 and the final state, from the jitted train program."""
    from attention_jax.lab import experiment as ex

    state = ex.init_state(exp)
    step = ex.train_steps(exp, steps_per_call)
    losses = []
    for _ in range(calls):
        state, out = step(state)
        losses.append(np.asarray(out["loss"]))
    return np.concatenate(losses)[:, 0], state


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under ``folder``: {relative path: (size, mtime_ns, sha256) or "dir"}.

    Two equal snapshots mean nothing was created, deleted, renamed or rewritten.
    """
    import hashlib

    out: dict[str, tuple] = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_dir():
            out[rel] = ("dir",)
        else:
            st = path.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


HOLDER = """
import sys
from attention_jax.lab.rundir import RunDir
with RunDir(sys.argv[1]).lock():
    print("locked", flush=True)
    sys.stdin.readline()
"""


def start_holder(workdir):
    """A process holding ``workdir``'s lock (``RunDir.lock``) until its stdin closes (or it is killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def signal_when(condition, proc: subprocess.Popen, sig: int, timeout: float = 300) -> None:
    """Send ``sig`` to ``proc`` as soon as ``condition()`` holds, checking it while ``proc`` is stopped.

    Each check freezes the process (SIGSTOP, then its state in /proc until it reads T), so it cannot run
    past the state it was found in: the signal is pending before it runs again (SIGCONT). A short run on a
    loaded machine cannot finish between a check and the signal, as it could with plain polling.
    """
    import signal
    import time

    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, "the process ended before the condition held"
        proc.send_signal(signal.SIGSTOP)
        while _state(proc.pid) not in ("T", "t", "Z", "X", None):
            time.sleep(0.001)
        held = condition()
        if held:
            proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        if held:
            return
        assert time.time() < deadline, "timed out waiting for the condition"
        time.sleep(0.02)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the live processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # it ended meanwhile
            continue
        if text in cmdline and state != "Z":  # a zombie has ended; only its exit status is left
            found.append(cmdline.strip())
    return found


# ---------------------------------------------------------------------------
# Trained runs: copies, their checkpoints, where a session started, their metrics
# ---------------------------------------------------------------------------


def copy_run(source: Path, workdir: Path) -> Path:
    """A copy of the run directory ``source`` at ``workdir`` (shared runs are copied before a test changes them)."""
    shutil.copytree(source, workdir, symlinks=True)
    return Path(workdir)


def checkpoint_steps(workdir) -> list[int]:
    """The steps of the finished latest-checkpoints in ``workdir`` (orbax renames a save into place when done)."""
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def training_starts(stderr: str) -> list[int]:
    """The step each training session in ``stderr`` started from: the loop's ``training from step N to M`` line.

    0 for a fresh start; a resumed session starts at the step of the checkpoint it restored.
    """
    return [int(n) for n in re.findall(r"training from step (\d+) to \d+", stderr)]


def read_events(folder: Path) -> list:
    """Every event of the TensorBoard event files of ``folder``, file by file (oldest session first).

    Written out independently of tensorboardX's writer: the TFRecord framing (length, crc,
    payload, crc) parsed by hand, each payload decoded as an ``Event`` protocol buffer.
    """
    import struct

    from tensorboardX.proto import event_pb2

    events = []

    def session(path):  # the name ends in the session's start in ns (rundir.MetricsWriter)
        last = path.name.rsplit(".", 1)[1]
        return (int(last) if last.isdigit() else 0, path.name)

    for path in sorted(Path(folder).glob("events.out.tfevents.*"), key=session):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def sessions_resumed_from(workdir, board: str | None = None) -> list[int]:
    """Per training session of a run, in order: the step it resumed from (-1: a fresh start).

    Read from the run's TensorBoard files: each session opens its event file
    with a START marker at its purge step, the restored checkpoint's step + 1.
    ``board``: one member's folder (default: the first).
    """
    boards = sorted((Path(workdir) / "tensorboard").iterdir())
    folder = Path(workdir) / "tensorboard" / board if board else boards[0]
    return [e.step - 1 for e in read_events(folder) if e.HasField("session_log") and e.session_log.status == 1]


METRIC_KEYS = ("loss", "grad_norm", "lr", "train_loss", "val_loss")


def rows_up_to(workdir, step: int) -> list[dict]:
    """The metrics rows of ``workdir`` up to ``step`` (of ``REFERENCE``: those of the same run trained to ``step``)."""
    from attention_jax.lab.rundir import read_jsonl

    return [r for r in read_jsonl(Path(workdir) / "metrics.jsonl") if r["step"] <= step]


def _rows(rows_or_run) -> list[dict]:
    if isinstance(rows_or_run, (str, os.PathLike)):
        from attention_jax.lab.rundir import read_jsonl

        return read_jsonl(Path(rows_or_run) / "metrics.jsonl")
    return list(rows_or_run)


def _missing(x) -> bool:  # null in metrics.jsonl (a NaN or Inf written as strict JSON), or NaN when read back
    return x is None or (isinstance(x, float) and math.isnan(x))


def assert_same_metrics(
    got, want, *, rel: float = 1e-6, abs: float = 0.0, ids=("step", "member", "seed"), keys=METRIC_KEYS,
    min_rows: int = 1,
) -> None:  # fmt: skip
    """Two runs' metrics agree: the same rows in the same order, each metric within ``rel``/``abs``.

    ``got``/``want``: lists of metrics rows, or run directories (their metrics.jsonl).
    Rows match on ``ids`` and on which of ``keys`` they hold; a metric missing
    (null, NaN) in one must be missing in the other. ``min_rows``: at least that
    many rows, so an empty comparison cannot pass.
    """
    import pytest

    a, b = _rows(got), _rows(want)

    def shape(rows):
        return [(tuple(r.get(k) for k in ids), tuple(k in r for k in keys)) for r in rows]

    assert shape(a) == shape(b), "the runs wrote different rows"
    assert len(b) >= min_rows, f"only {len(b)} rows to compare"
    for ra, rb in zip(a, b):
        for key in keys:
            if key in rb:
                x, y = ra[key], rb[key]
                assert _missing(x) == _missing(y), (key, ra, rb)
                if not _missing(y):
                    assert x == pytest.approx(y, rel=rel, abs=abs), (key, ra, rb)


MARKER = "ATTENTION_JAX_TEST_RAY"  # in the environment of every Ray process (and driver) a test starts


def marked_processes(marker: str) -> dict[int, str]:
    """The live processes whose environment has ``MARKER=marker``: pid -> command line."""
    found, needle = {}, f"{MARKER}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie has ended; only its exit status is left
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # not ours to read, or ended meanwhile
            continue
    return found


def assert_none_left(marker: str, grace: float = 30) -> None:
    """No process of ``marker`` is left after ``grace`` s (any that is gets killed, then the test fails)."""
    deadline = time.time() + grace
    while marked_processes(marker) and time.time() < deadline:
        time.sleep(0.5)
    left = marked_processes(marker)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert left == {}, f"processes left behind: {list(left.values())}"
