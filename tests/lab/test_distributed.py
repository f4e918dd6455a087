"""Multi-process runs (attention_jax.lab.distributed): settings, the supervisor's relay, and real runs.

The real runs are what a user does on several hosts, done here with 2 local
processes x 2 simulated CPU devices each (gloo collectives over 127.0.0.1):
``experiments.train`` with the ``distributed`` keys, as subprocesses. Each
test starts its processes with a unique workdir in their command lines and
checks at the end that none of them is left.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from attention_jax.lab import distributed
from attention_jax.lab.cli import EXIT_JOIN_FAILED, EXIT_PROCESS_LOST
from attention_jax.lab.config import ConfigError, apply_overrides, load_config
from attention_jax.lab.rundir import read_jsonl
from tests.helpers import (
    ROOT,
    SMOKE,
    assert_one_line_error_result,
    assert_same_metrics,
    checkpoint_steps,
    free_port,
    processes_mentioning,
    run_command,
    training_starts,
    with_devices,
)

# The run every multi-process test trains: the smoke model, 8 sequences per step over 4 devices.
RUN = ["--config.batch_size=8", "--config.max_iters=12", "--config.eval_interval=4", "--config.log_interval=2",
       "--config.checkpoint_every=4", "--config.model.dropout=0.1", "--config.sample_tokens=20"]  # fmt: skip
LAST = 12  # the run's last step


def settings_of(**overrides):
    return distributed.settings(apply_overrides(load_config(SMOKE), {"distributed.enabled": True, **overrides}))


def test_settings_come_from_the_config_then_the_environment(monkeypatch):
    for name in distributed.ENV.values():
        monkeypatch.delenv(name, raising=False)
    assert distributed.settings(load_config(SMOKE)) is None  # not enabled: a single process, nothing to join
    s = settings_of()
    assert (s.coordinator_address, s.num_processes, s.process_id) == (None, None, None)  # left to JAX to detect
    assert (s.join_timeout_s, s.heartbeat_timeout_s) == (300, 100)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    s = settings_of()
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.2:1234", 4, 3)
    s = settings_of(**{"distributed.coordinator_address": "h:9", "distributed.process_id": 0})
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("h:9", 4, 0)  # the config wins


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"distributed.coordinator_address": "nohost"}, r"coordinator_address='nohost': expected host:port"),
        ({"distributed.coordinator_address": "h:99999"}, r"expected host:port"),
        ({"distributed.num_processes": 0}, r"num_processes=0: must be at least 1"),
        ({"distributed.num_processes": 2, "distributed.process_id": 2}, r"process_id=2: must be in \[0, num_"),
        ({"distributed.join_timeout_s": 0}, r"join_timeout_s=0: must be a positive number"),
    ],
)
def test_bad_settings_name_the_key(monkeypatch, overrides, pattern):
    for name in distributed.ENV.values():
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=pattern):
        settings_of(**overrides)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match=r"JAX_NUM_PROCESSES='two' is not a valid num_processes"):
        settings_of()


def test_the_old_true_false_key_points_at_the_group():
    with pytest.raises(ConfigError, match=r"unknown config key 'distributed'.*distributed\.enabled"):
        apply_overrides(load_config(SMOKE), {"distributed": "true"})


# What JAX prints when it aborts a process whose peer stopped (jax 0.10: one absl record, then a stack dump).
PRELUDE = (
    b"E1126 18:55:59.166129   29781 coordination_service.cc:1549] Use error polling to propagate the following "
    b"error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\n"
    b"The tasks have crashed.\n"
)
FATAL = (
    b"F1126 18:55:59.166738   29792 client.h:80] Terminating process because the JAX distributed service "
    b"detected fatal errors. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending "
    b"heartbeats):\n1\nThe tasks have crashed.\n\nRPC: /xla.coordination.CoordinationService/PollForError\n"
    b"*** Check failure stack trace: ***\n    @     0x7fa4da640634  absl::log_internal::LogMessage::SendToLog()\n"
)


def relay(*writes: bytes, pause: float = 0.0) -> tuple[bytes, bytes | None, list[str]]:
    """What ``_relay`` shows and returns for a child that writes ``writes`` (``pause`` s apart) and exits."""
    r, w = os.pipe()

    def child():  # writes, then closes its end (EOF)
        for chunk in writes:
            os.write(w, chunk)
            time.sleep(pause)
        os.close(w)

    writer = threading.Thread(target=child)
    writer.start()
    out = io.BytesIO()
    try:
        fatal, errors = distributed._relay(r, out)
    finally:
        writer.join()
        os.close(r)
    return out.getvalue(), fatal, errors


def test_the_relay_passes_output_through_and_holds_back_a_fatal_abort_and_error_lines():
    progress = b"step 6: train loss 2.84\n\r 10%|# | 4/40\r 20%|## | 8/40"
    error = b"error: JaxRuntimeError: UNKNOWN: Gloo AllGather failed: Connection closed by peer\n"
    shown, fatal, errors = relay(b"compiled in 1.0 s\n", progress, error, PRELUDE, FATAL)
    assert shown == b"compiled in 1.0 s\n" + progress  # the prelude and the abort are gone, the rest intact
    assert errors == [error.decode()]  # kept for the supervisor to decide on
    assert fatal.startswith(b"F1126") and b"Check failure" in fatal
    assert distributed.explain_fatal(fatal.decode()) == (
        "process 1 of the run stopped responding (killed, crashed or preempted)"
    )
    # A C++ warning with no abort after it is shown, once the hold expires (and also at EOF).
    warning = b"W1126 18:00:00.000001   1 some_file.cc:12] a warning\nits second line\n"
    shown, fatal, errors = relay(warning, b"done\n", pause=distributed._HOLD_S + 0.3)
    assert fatal is None and errors == [] and shown == warning + b"done\n"


def test_explained_aborts():
    lost_coordinator = b"F1126 18:58:25.325365 3160 client.h:80] Terminating process ... PollForError: Socket closed"
    one = distributed.Settings("127.0.0.1:1", 2, 1, 10, 10)
    assert "the coordinator (process 0) is gone" in distributed.explain_fatal(lost_coordinator.decode(), one)
    zero = distributed.Settings("127.0.0.1:1", 2, 0, 10, 10)
    assert "another process of the run stopped" in distributed.explain_fatal(lost_coordinator.decode(), zero)


# ---------------------------------------------------------------------------
# Real runs: 2 processes x 2 simulated CPU devices
# ---------------------------------------------------------------------------


def train_cmd(workdir, text_file, *extra) -> list[str]:
    return [sys.executable, "-m", "experiments.train", "--config", SMOKE, "--workdir", str(workdir),
            f"--config.data.dataset={text_file}", "--no-progress", *RUN, *extra]  # fmt: skip


def env_with_devices(n: int, port: int | None = None) -> dict:
    """``n`` simulated CPU devices; with ``port``, process 0 serves on 127.0.0.1 only (JAX: all interfaces)."""
    env = with_devices(n)
    return env if port is None else dict(env, JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")


def start_processes(workdir, text_file, *extra, heartbeat_s: int = 10) -> list[subprocess.Popen]:
    """Both processes of a 2 x 2 run, started as a user starts them on two hosts."""
    port = free_port()
    group = [f"--config.distributed.{k}={v}" for k, v in (("enabled", "true"), ("num_processes", 2),
             ("coordinator_address", f"127.0.0.1:{port}"), ("heartbeat_timeout_s", heartbeat_s))]  # fmt: skip
    return [
        subprocess.Popen(
            train_cmd(workdir, text_file, *group, f"--config.distributed.process_id={i}", *extra),
            cwd=ROOT,
            env=env_with_devices(2, port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Wait for every process (killing all of them past ``timeout``); their stderr."""
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=timeout)[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return errs


def run_two_processes(workdir, text_file, *extra) -> list[str]:
    errs = finish(start_processes(workdir, text_file, *extra))
    assert all("distributed: process" in e for e in errs), errs
    assert all("error" not in e for e in errs), errs
    return errs


def start_one_process(workdir, text_file, *extra) -> subprocess.Popen:
    """The same run as one process with 4 devices."""
    return subprocess.Popen(train_cmd(workdir, text_file, *extra), cwd=ROOT, env=env_with_devices(4),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip


def assert_no_process_left(workdir) -> None:
    deadline = time.time() + 60  # a supervisor's child dies with it, a moment later (longer on a loaded machine)
    while processes_mentioning(str(workdir)) and time.time() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(workdir)) == []


def assert_same_rows(rows_a: list[dict], rows_b: list[dict], rel: float) -> None:
    assert_same_metrics(rows_b, rows_a, rel=rel, abs=1e-6, keys=("loss", "grad_norm", "train_loss", "val_loss"))


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, text_file):
    """Per num_seeds (1 and 2): an uninterrupted 2 x 2 run and a 1 x 4 run of the same config."""
    root = tmp_path_factory.mktemp("distributed")
    runs = {}
    for seeds in (1, 2):  # the 1 x 4 run beside the 2 x 2 one: it fills the time the two processes wait on each other
        two, one = root / f"two_processes_{seeds}", root / f"one_process_{seeds}"
        single = start_one_process(one, text_file, f"--config.num_seeds={seeds}")
        try:
            run_two_processes(two, text_file, f"--config.num_seeds={seeds}")
        finally:
            (err,) = finish([single])
        assert single.returncode == 0, err
        assert_no_process_left(two)
        runs[seeds] = two, one
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [1, 2])
def test_two_processes_give_the_losses_of_one_process_with_four_devices(reference_runs, seeds):
    """The same losses to float32 reduction order (rel 2e-5, as 4 devices against 1), written once.

    With 1 seed the batch is split over the 4 devices of both processes; with 2
    seeds (the vmapped path) each process's 2 devices hold one seed's model.
    """
    two, one = reference_runs[seeds]
    rows_two, rows_one = read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert {r["member"] for r in rows_two} == set(range(seeds)) and len(rows_two) == len(rows_one)
    assert_same_rows(rows_one, rows_two, rel=2e-5)
    s_two, s_one = (json.loads((d / "summary.json").read_text()) for d in (two, one))
    assert s_two["full_val_loss"] == pytest.approx(s_one["full_val_loss"], rel=2e-5)
    # Only process 0 wrote the run's files: one TensorBoard event file per member, one sample per seed.
    for board in (two / "tensorboard").iterdir():
        assert len(list(board.iterdir())) == 1, board
    assert (two / "sample.txt").read_text().count("=== seed") == seeds
    # Every process wrote its part of each checkpoint (orbax: one folder of shards per process).
    state = two / "checkpoints" / str(LAST) / "state"
    assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir()


@pytest.mark.slow
def test_four_simulated_devices_give_the_losses_of_one(reference_runs, tmp_path, text_file):
    """The 1 x 4 reference against the same run on this process's one device (rel 2e-5: reduction order)."""
    import jax

    assert jax.device_count() == 1
    result = run_command("train", *train_cmd(tmp_path / "one_device", text_file, "--config.num_seeds=1")[3:])
    assert result.returncode == 0, result.stderr
    four = reference_runs[1][1]
    assert_same_rows(read_jsonl(tmp_path / "one_device" / "metrics.jsonl"), read_jsonl(four / "metrics.jsonl"), 2e-5)


@pytest.mark.slow
def test_sigkill_of_one_process_stops_the_other_then_both_resume_to_the_uninterrupted_result(
    reference_runs, tmp_path, text_file
):
    """Kill -9 process 1 (its peer notices after the heartbeat timeout), then process 0 (noticed at once)."""
    workdir = tmp_path / "killed"
    for victim, at_step in ((1, 4), (0, 8)):  # each a step before the run's end (LAST)
        procs = start_processes(workdir, text_file, "--config.num_seeds=2")
        deadline = time.time() + 240
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if max((r["step"] for r in read_jsonl(workdir / "metrics.jsonl")), default=-1) >= at_step:
                break
            time.sleep(0.05)
        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.time()
        errs = finish(procs, timeout=150)
        survivor = procs[1 - victim]
        print(f"process {1 - victim} exited {time.time() - t0:.1f} s after process {victim} was killed")
        assert time.time() - t0 < 120
        error = subprocess.CompletedProcess([], survivor.returncode, "", errs[1 - victim])
        assert_one_line_error_result(
            error, r"distributed: .*stopped.*resumes from the last checkpoint", code=EXIT_PROCESS_LOST
        )
        assert "Check failure" not in error.stderr and "F1126" not in error.stderr
        assert_no_process_left(workdir)
    assert not (workdir / "summary.json").exists(), "the run finished before it could be killed"
    saved = checkpoint_steps(workdir)  # what the killed processes left
    assert saved and saved[-1] > 0, "killed before the first checkpoint: the resume below would prove nothing"
    errs = run_two_processes(workdir, text_file, "--config.num_seeds=2")  # the same command again: resumes
    assert [training_starts(e) for e in errs] == [[saved[-1]]] * 2  # both processes restored that checkpoint
    assert_no_process_left(workdir)
    uninterrupted = reference_runs[2][0]
    assert_same_rows(read_jsonl(uninterrupted / "metrics.jsonl"), read_jsonl(workdir / "metrics.jsonl"), rel=1e-6)
    s_ref, s_resumed = (json.loads((d / "summary.json").read_text()) for d in (uninterrupted, workdir))
    assert s_resumed["final_val_loss"] == pytest.approx(s_ref["final_val_loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("process_id, pattern", [
    (1, r"process 1 of 2 could not join the run within 3 s: nothing answers at the coordinator address"),
    (0, r"process 0 of 2 could not join the run within 3 s: not all 2 processes reached the coordinator"),
])  # fmt: skip
def test_a_run_that_cannot_form_fails_within_the_timeout_with_one_line(tmp_path, text_file, process_id, pattern):
    """Process 1 with no coordinator; process 0 whose peer never comes."""
    port = free_port()
    args = ["--config.distributed.enabled=true", "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={process_id}", "--config.distributed.join_timeout_s=3",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}"]  # fmt: skip
    t0 = time.time()
    result = subprocess.run(train_cmd(tmp_path / "w", text_file, *args), cwd=ROOT, env=env_with_devices(1, port),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    elapsed = time.time() - t0
    assert_one_line_error_result(result, pattern, code=EXIT_JOIN_FAILED)
    # The 3 s timeout, plus starting Python and importing JAX twice (about 5 s idle; several times that on a
    # loaded machine). Bounded well below the default timeout (300 s), which a run ignoring the setting waits.
    assert elapsed < 3 + 90, elapsed
    assert_no_process_left(tmp_path / "w")


def test_a_loopback_coordinator_listens_on_loopback_only(monkeypatch):
    """JAX's coordinator listens on every interface unless told; a loopback address keeps it on loopback."""
    monkeypatch.delenv("JAX_COORDINATOR_BIND_ADDRESS", raising=False)
    for address in ("127.0.0.1:1234", "localhost:1234", "[::1]:1234"):
        assert distributed.loopback_bind_address(address) == address
    for address in ("10.0.0.5:1234", "tpu-host-0:1234", None):
        assert distributed.loopback_bind_address(address) is None  # other hosts must reach it: JAX decides
    monkeypatch.setenv("JAX_COORDINATOR_BIND_ADDRESS", "127.0.0.1:99")  # the user's choice wins
    assert distributed.loopback_bind_address("127.0.0.1:1234") is None
