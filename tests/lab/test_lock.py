"""One trainer per workdir: the lock refuses a second holder, names the first, and survives kill -9."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from attention_jax.lab import rundir as rd
from tests.helpers import ROOT, SMOKE, assert_one_line_error_result, run_command, snapshot, start_holder


def wait_until_stopped(pid: int, timeout: float = 30) -> None:
    """Until process ``pid`` is stopped (state T in /proc): all its threads, mid-write or not, are frozen."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop")


def test_a_held_lock_is_refused_with_the_holder_named_and_nothing_touched(tmp_path):
    holder = start_holder(tmp_path / "w")
    try:
        (tmp_path / "w" / "config.json").write_text("{}")
        before = snapshot(tmp_path / "w")
        with pytest.raises(rd.WorkdirBusy) as info:
            with rd.RunDir(tmp_path / "w").lock():
                pass
        message = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in message
        assert "train.lock" in message and "\n" not in message
        assert snapshot(tmp_path / "w") == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not (tmp_path / "w" / rd.LOCK).exists()  # released: the file is removed
    with rd.RunDir(tmp_path / "w").lock():  # and free again
        assert json.loads((tmp_path / "w" / rd.LOCK).read_text())["pid"] == os.getpid()


def test_a_lock_left_by_kill_9_does_not_block_the_next_holder(tmp_path):
    holder = start_holder(tmp_path / "w")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    stale = json.loads((tmp_path / "w" / rd.LOCK).read_text())
    assert stale["pid"] == holder.pid  # the file stays, naming the dead process
    with rd.RunDir(tmp_path / "w").lock():  # the kernel released its flock with the process
        assert json.loads((tmp_path / "w" / rd.LOCK).read_text())["pid"] == os.getpid()


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    run = rd.RunDir(tmp_path / "w")
    with run.lock():
        with run.lock():  # the sweep runner holds it around train(), which takes it again
            assert (run / rd.LOCK).exists()
        assert (run / rd.LOCK).exists()  # still held by the outer block
    assert not (run / rd.LOCK).exists()


def test_without_flock_the_lock_is_an_exclusive_file_with_stale_detection(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = rd.RunDir(tmp_path / "w")
    run.create()
    lock = run / rd.LOCK
    host = socket.gethostname()

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live process on this host holds it: refused, nothing changed
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": host, "started": "then"}))
        before = snapshot(run.path)
        with pytest.raises(rd.WorkdirBusy, match=rf"pid {sleeper.pid} on host {host}, started then.*delete"):
            run.lock().__enter__()
        assert snapshot(run.path) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    with run.lock():  # the same process, now dead (and reaped): stale, taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()

    lock.write_text(json.dumps({"pid": sleeper.pid, "host": "elsewhere", "started": "then"}))
    with pytest.raises(rd.WorkdirBusy, match=r"on host elsewhere.*if it no longer runs, delete"):
        run.lock().__enter__()  # another host's process cannot be checked from here: refused


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_the_first_finishes_with_all_its_rows(tmp_path, text_file):
    """The issue's case: a second experiments.train on a live run's workdir used to truncate its metrics."""
    workdir = tmp_path / "w"
    args = ("--config", SMOKE, "--workdir", workdir, f"--config.data.dataset={text_file}", "--no-progress",
            "--config.max_iters=400", "--config.log_interval=5", "--config.eval_interval=100",
            "--config.checkpoint_every=50")  # fmt: skip
    first = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *map(str, args)], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while not (workdir / "metrics.jsonl").exists() and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        assert (workdir / "metrics.jsonl").exists(), "the first trainer did not start training"
        first.send_signal(signal.SIGSTOP)  # hold the first trainer mid-run, lock in hand
        wait_until_stopped(first.pid)
        before = snapshot(workdir)
        second = run_command("train", *args)  # in this process: the lock is held by another
        assert_one_line_error_result(
            second, rf"workdir .* is in use by a trainer \(pid {first.pid} on host {socket.gethostname()}, started "
        )
        assert snapshot(workdir) == before  # the second touched nothing
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    rows = rd.read_jsonl(workdir / "metrics.jsonl")
    train_steps = [r["step"] for r in rows if "loss" in r]
    eval_steps = [r["step"] for r in rows if "val_loss" in r]
    assert train_steps == list(range(5, 401, 5)) and eval_steps == [0, 100, 200, 300, 400]


def test_a_workdir_moved_and_recreated_under_the_lock_is_reported_as_vanished(tmp_path):
    """Orbax recreates missing folders while it saves: the path exists again, but it is not our workdir."""
    run = rd.RunDir(tmp_path / "w")
    with run.lock():
        with pytest.raises(FileNotFoundError):  # a missing file in our own workdir is just that
            with rd.storage_faults(run.path):
                (run / "nothing-here").read_text()
        run.path.rename(tmp_path / "elsewhere")
        (run / "checkpoints" / "100.orbax-checkpoint-tmp").mkdir(parents=True)  # as orbax would
        with pytest.raises(rd.StorageFault) as info:
            with rd.storage_faults(run.path):
                (run / "checkpoints" / "100.orbax-checkpoint-tmp" / "metadata").read_text()
    assert info.value.errno == errno.ENOENT
    assert (
        str(info.value)
        == f"the workdir {run.path}: no such file or directory; it was deleted, moved or unmounted while in use."
    )
