"""Faults of the machine, as a user meets them: a full disk, a read-only or vanished workdir, permission
denied, Ctrl-C, a reader beside a live trainer. The command meeting the fault runs as a subprocess (its
exit status, its signals); the runs that set a case up, and the resumes after it, run in this process.
Each case checks one ``error:`` line with its documented exit code, the files left intact, and exact
resumes that start from the checkpoint the fault left."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from attention_jax.lab.cli import EXIT_INTERRUPTED, EXIT_SYSTEM
from attention_jax.lab.rundir import load_run, read_jsonl
from tests.helpers import (
    REFERENCE,
    ROOT,
    assert_one_line_error_result,
    assert_same_metrics,
    checkpoint_steps,
    run_command,
    run_entry_point,
    signal_when,
    snapshot,
    tiny_args,
    training_starts,
)

pytestmark = pytest.mark.slow


@dataclass
class Tmpfs:
    holder: subprocess.Popen  # the process whose private mount namespace holds the tmpfs
    mountpoint: Path  # as that process sees it
    root: Path  # the same folder as every other process reaches it: /proc/<holder>/root/<mountpoint>

    def remount(self, mode: str) -> None:
        nsenter = shutil.which("nsenter")
        if nsenter is None:
            pytest.skip("nsenter not found: cannot remount the private tmpfs")
        subprocess.run([nsenter, "-t", str(self.holder.pid), "-U", "-m", "--preserve-credentials", "mount", "-o",
                        f"remount,{mode}", str(self.mountpoint)], check=True, capture_output=True)  # fmt: skip

    def fill(self, leave: int = 0) -> Path:
        """Take all free space but ``leave`` bytes with one file; returns it (delete it to free the space)."""
        st = os.statvfs(self.root)
        filler = self.root / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
        return filler


@pytest.fixture
def tmpfs(tmp_path):
    """A private 3 MB tmpfs (a user and mount namespace of its own: no root needed, nothing left mounted)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare not found: cannot mount a private tmpfs")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    script = f"mount -t tmpfs -o size=3m tmpfs {mountpoint} && echo ready && exec sleep 3600"
    holder = subprocess.Popen([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    if holder.stdout.readline().strip() != "ready":
        holder.wait()
        pytest.skip(f"mount -t tmpfs is not permitted here: {holder.stderr.read().strip()[:200]}")
    try:
        yield Tmpfs(holder, mountpoint, Path(f"/proc/{holder.pid}/root") / mountpoint.relative_to("/"))
    finally:
        holder.kill()
        holder.wait()


CHECKPOINTS = REFERENCE  # the shared reference_run (tests/lab/conftest.py) is this run, uninterrupted


def test_a_full_disk_is_one_line_and_the_run_resumes_exactly_after_freeing_space(tmpfs, text_file, reference_run):
    workdir = tmpfs.root / "w"
    filler = tmpfs.fill(leave=600_000)  # room for about three checkpoints of the tiny model
    full = run_entry_point("train", *tiny_args(workdir, text_file, CHECKPOINTS))
    assert_one_line_error_result(
        full, r"no space left on device; free some space, then rerun the same command\. The last good checkpoint is "
        r"step (\d+)", code=EXIT_SYSTEM,
    )  # fmt: skip
    named = int(full.stderr.split("The last good checkpoint is step ")[1].split()[0])
    assert load_run(workdir).step() == named  # the checkpoint it names is intact and verifies
    assert named > 0 and checkpoint_steps(workdir)[-1] >= named

    filler.unlink()
    filler = tmpfs.fill()  # not a byte left: even the resume cannot start
    before = snapshot(workdir)
    again = run_entry_point("train", *tiny_args(workdir, text_file, CHECKPOINTS))
    assert_one_line_error_result(  # the lock is the first write: it fails before the checkpoints are read
        again, r"train\.lock: no space left on device; free some space, then rerun the same command", code=EXIT_SYSTEM
    )
    assert snapshot(workdir) == before

    filler.unlink()
    resumed = run_command("train", *tiny_args(workdir, text_file, CHECKPOINTS))
    assert resumed.returncode == 0, resumed.stderr
    assert training_starts(resumed.stderr) == [named]  # from the checkpoint the error named
    assert_same_metrics(workdir, reference_run, min_rows=10)


def test_a_read_only_workdir_refuses_training_in_one_line_and_can_still_be_sampled(tmpfs, text_file):
    workdir = tmpfs.root / "w"
    first = run_command("train", *tiny_args(workdir, text_file, {"max_iters": 10, "eval_interval": 10}))
    assert first.returncode == 0, first.stderr
    tmpfs.remount("ro")
    more = run_entry_point("train", *tiny_args(workdir, text_file, {"max_iters": 20, "eval_interval": 10}))
    assert_one_line_error_result(more, r"train\.lock: read-only file system; remount it read-write", code=EXIT_SYSTEM)
    sample = run_command("sample", "--workdir", workdir, "--prompt", "the", "--max_new_tokens", 10)
    assert sample.returncode == 0, sample.stderr  # a reader writes nothing, so read-only is no obstacle
    assert sample.stdout.startswith("the") and len(sample.stdout.rstrip("\n")) == 13


def test_permission_denied_is_one_line_and_changes_nothing(text_file):
    """A workdir this user may read but not write (as root: the trainer runs as nobody)."""
    folder = Path(tempfile.mkdtemp(prefix="attention_jax_perm_"))
    try:
        os.chmod(folder, 0o755)  # others may look in: the data file and the run
        data = folder / "data.txt"
        shutil.copy(text_file, data)
        workdir = folder / "w"
        first = run_command("train", *tiny_args(workdir, data, {"max_iters": 10, "eval_interval": 10}))
        assert first.returncode == 0, first.stderr
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root and setpriv not found: cannot take away the permission")
            prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        else:
            prefix = []
            os.chmod(workdir, 0o555)
        before = snapshot(workdir)
        args = tiny_args(workdir, data, {"max_iters": 20, "eval_interval": 10})
        result = subprocess.run(
            [*prefix, sys.executable, "-m", "experiments.train", *args], cwd=ROOT, capture_output=True, text=True,
            env=dict(os.environ, ATTENTION_JAX_CACHE_DIR="off"), timeout=300,
        )  # fmt: skip
        assert_one_line_error_result(result, r"train\.lock: permission denied; check its permissions", code=EXIT_SYSTEM)
        assert snapshot(workdir) == before
    finally:
        os.chmod(folder, 0o755)
        for path in folder.rglob("*"):
            if path.is_dir():
                os.chmod(path, 0o755)
        shutil.rmtree(folder)


def as_in_a_terminal() -> None:
    """Ctrl-C as a terminal delivers it: a shell starts background jobs with SIGINT ignored, and an ignored
    signal stays ignored across exec (the trainer then leaves it so: ``loop.stop_at_safe_point``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_training(workdir, text_file, overrides):
    args = tiny_args(workdir, text_file, overrides)
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True, preexec_fn=as_in_a_terminal)  # fmt: skip


def wait_for(condition, proc, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_workdir_moved_away_while_training_stops_the_trainer_in_one_line(text_file, tmp_path):
    workdir = tmp_path / "w"
    trainer = start_training(workdir, text_file, {"max_iters": 100_000, "checkpoint_every": 50, "eval_interval": 1000})
    wait_for(lambda: (workdir / "checkpoints" / "50").is_dir(), trainer)
    workdir.rename(tmp_path / "elsewhere")  # as rm -rf or an unmount would, but atomically
    _, err = trainer.communicate(timeout=120)
    assert trainer.returncode == EXIT_SYSTEM, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"the workdir {workdir}: no such file or directory; it was deleted, moved or unmounted" in lines[0]
    # It stopped: no checkpoint was finished in a folder recreated under the old name (orbax recreates
    # missing folders; a save in flight at the rename may have left some empty ones).
    assert not workdir.exists() or not any(p.name.isdigit() for p in workdir.rglob("*") if p.is_dir())


def test_sampling_a_live_run_leaves_the_trainer_running_and_ctrl_c_saves_a_checkpoint(text_file, tmp_path):
    """The issue's case: a sampler used to delete the trainer's checkpoint in progress, killing it."""
    workdir = tmp_path / "w"
    trainer = start_training(workdir, text_file, {"max_iters": 100_000, "checkpoint_every": 5, "eval_interval": 1000})
    try:
        wait_for(lambda: checkpoint_steps(workdir), trainer)  # a finished one: a save in flight is only a tmp folder
        for seed in (1, 2):  # each sample races dozens of saves, each deleting the oldest checkpoint
            sample = run_command("sample", "--workdir", workdir, "--prompt", "the", "--max_new_tokens", 10,
                                     "--seed", seed)  # fmt: skip
            assert sample.returncode == 0, sample.stderr
            assert sample.stdout.startswith("the") and len(sample.stdout.rstrip("\n")) == 13
            assert trainer.poll() is None  # still training
        rows_before = len(read_jsonl(workdir / "metrics.jsonl"))
        trainer.send_signal(signal.SIGINT)
        t0 = time.time()
        _, err = trainer.communicate(timeout=300)
        # About 1-2 s on an idle 2-core machine; the bound only tells stopping from training on (100,000 steps
        # with a checkpoint every 5 take far longer), with room for a machine loaded many times over.
        assert time.time() - t0 < 120, "Ctrl-C took too long"
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == EXIT_INTERRUPTED, err
    assert "interrupted" in err and "Traceback" not in err
    rows = read_jsonl(workdir / "metrics.jsonl")
    assert len(rows) >= rows_before
    last_step = max(r["step"] for r in rows)
    run = load_run(workdir)  # the trainer's checkpoints are intact and verify
    assert run.step() >= last_step - 5  # saved at the step it stopped, or at most one interval before


def test_ctrl_c_stops_training_at_a_checkpoint_and_the_resume_equals_an_uninterrupted_run(text_file, tmp_path, trained):
    steps = {"max_iters": 120, "checkpoint_every": 5, "eval_interval": 50, "log_interval": 5, "model.dropout": 0.1}
    clean = trained(**steps)
    workdir = tmp_path / "w"
    trainer = start_training(workdir, text_file, steps)
    # At step 20 (5 rows), checkpoints 5 to 15 saved; checked while the trainer is stopped, so the Ctrl-C
    # lands long before its 120 steps are done, however loaded the machine.
    signal_when(lambda: len(read_jsonl(workdir / "metrics.jsonl")) >= 5, trainer, signal.SIGINT)
    _, err = trainer.communicate(timeout=300)
    assert trainer.returncode == EXIT_INTERRUPTED, err
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    # The checkpoint it stopped at: saved on Ctrl-C, or (Ctrl-C right after a save) the one saved just before.
    saved = checkpoint_steps(workdir)
    assert saved and saved[-1] >= 20, (saved, err)
    if "interrupted: saved a checkpoint at step" in err:
        assert int(err.split("saved a checkpoint at step ")[1].split()[0]) == saved[-1]
    assert "summary.json" not in os.listdir(workdir)
    resumed = run_command("train", *tiny_args(workdir, text_file, steps))
    assert resumed.returncode == 0, resumed.stderr
    assert training_starts(resumed.stderr) == [saved[-1]]  # from that checkpoint, not from step 0
    assert_same_metrics(workdir, clean, min_rows=20)


# experiments.sample, saying when its compiled decoding loop is running: generate returns once the loop is
# compiled and dispatched (JAX dispatches asynchronously), then the command waits for its tokens. The word goes
# to a file, so that the command's own stdout and stderr stay as a user sees them.
SAMPLER = """
import sys
from attention_jax.lab import commands, sampling

generate = sampling.generate


def generate_and_say_so(*args, **kwargs):
    out = generate(*args, **kwargs)
    with open(sys.argv[1], "w") as f:
        f.write("decoding")
    return out


sampling.generate = generate_and_say_so
sys.exit(commands.sample(sys.argv[2:]))
"""


def test_ctrl_c_stops_sampling_at_once(tmp_path, text_file):
    workdir = tmp_path / "w"
    # A model large enough that a million cached decode steps take minutes (the tiny one decodes them in seconds).
    big = {"max_iters": 2, "eval_interval": 2, "model.n_embd": 256, "model.n_layer": 4, "model.block_size": 64}
    first = run_command("train", *tiny_args(workdir, text_file, big))
    assert first.returncode == 0, first.stderr
    decoding = tmp_path / "decoding"
    sampler = subprocess.Popen(
        [sys.executable, "-c", SAMPLER, str(decoding), "--workdir", str(workdir), "--max_new_tokens", "1000000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_in_a_terminal,
    )  # fmt: skip
    try:
        wait_for(decoding.exists, sampler)  # inside the compiled decoding loop now
        sampler.send_signal(signal.SIGINT)
        t0 = time.time()
        out, err = sampler.communicate(timeout=300)
        # Decoding the million tokens takes minutes; stopping at once takes well under a second on an idle
        # machine. The bound tells the two apart with room for a machine loaded many times over.
        assert time.time() - t0 < 30, "Ctrl-C waited for the decoding to finish"
    finally:
        if sampler.poll() is None:
            sampler.kill()
    assert sampler.returncode == EXIT_INTERRUPTED and err.strip().splitlines() == ["interrupted"], err
    assert out == ""
