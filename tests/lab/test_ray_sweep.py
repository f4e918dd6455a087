"""Sweeps on Ray (``experiments.sweep --backend ray``), on a Ray cluster these tests start themselves.

The cluster is a head and a worker node on this machine (CPU only, one CPU
each), started with ``ray start --block`` as a user starts one, and stopped
at the end of the module. Every process of it (and of the drivers the tests
run) carries an environment marker, so the module can check that none is
left behind. The cluster serves on 127.0.0.1 only, and the module checks
that no process of it listens anywhere else: Ray replaces a loopback
--node-ip-address by the machine's network address unless its
single-machine switch is off (``ray_backend.RAY_LOOPBACK_ENV``), and a
worker node refuses to start with that switch off, so the worker node is
started through ``ray start`` with the replacement turned off in its
process (``LOOPBACK_RAY``). No dashboard is started.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from attention_jax.lab.ray_backend import RAY_LOOPBACK_ENV
from attention_jax.lab.rundir import RunDir, read_json
from tests.helpers import (
    MARKER,
    ROOT,
    TEST_XLA_FLAGS,
    assert_none_left,
    assert_same_metrics,
    free_port,
    marked_processes,
    run_command,
    sessions_resumed_from,
    with_devices,
)

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None or shutil.which("ray") is None,
    reason='Ray is an optional extra: pip install "attention_jax[ray]"',
)


def ray_env(marker: str) -> dict:
    """The environment of a test's Ray processes: the marker, and token authentication with a fresh token.

    Ray serves on every interface of this machine, so the test cluster wants a
    token; given here, Ray writes none into ~/.ray (a local ray.init() would).
    """
    env = dict(os.environ, **{MARKER: marker, "RAY_USAGE_STATS_ENABLED": "0"})
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env["XLA_FLAGS"] = TEST_XLA_FLAGS  # no simulated devices
    env.pop(RAY_LOOPBACK_ENV, None)
    return env


# `ray start` keeping a loopback --node-ip-address (for the worker node, which cannot use RAY_LOOPBACK_ENV).
LOOPBACK_RAY = """
import sys
import ray._private.services as services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
main()
"""


def listening_off_loopback(marker: str) -> list[str]:
    """``pid address:port`` of every TCP socket that a process of ``marker`` listens on outside loopback."""
    inodes = {}
    for pid in marked_processes(marker):
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:  # ended meanwhile
            continue
    found = []
    for table, loopback in (("tcp", ("0100007F",)), ("tcp6", ("00000000000000000000000001000000",
                                                             "0000000000000000FFFF00000100007F"))):  # fmt: skip
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and fields[9] in inodes and address not in loopback:  # 0A: LISTEN
                found.append(f"{inodes[fields[9]]} {address}:{int(port, 16)}")
    return found


SWEEP_CONFIG = """
from attention_jax.lab.config import base_config, smoke
from attention_jax.lab.sweep import sweep, zip_


def get_config(arg=None):
    c = smoke(base_config())
    c.data.dataset = {dataset!r}
    c.max_iters = 10
    c.lr_decay_iters = 10
    c.checkpoint_every = 5
    c.sample_tokens = 0
    return c


def get_sweep(arg=None):
    points = zip_(sweep("model.pos_encoding", ["learned", "rope"]), sweep("model.n_head", [1, 2]))  # 2 points
    if arg == "with_bad_point":  # n_embd = 32 is not divisible by 3: the run refuses it, the sweep goes on
        points.append({{"model.n_head": 3}})
    return points
"""


def wait_for_line(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = path.read_text() if path.exists() else ""
        if text in log:
            return log
        assert proc.poll() is None, log
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and a worker node; yields (address, marker, env). Stopped, and checked gone, at the end."""
    root = tmp_path_factory.mktemp("ray")
    # Ray's session folder holds its sockets, whose paths may not exceed 107 bytes: a short folder of its own
    # (pytest's, under an xdist worker's, is too long), removed with the cluster.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    marker = uuid.uuid4().hex
    env = ray_env(marker)
    common = ["--block", "--num-cpus=1", "--object-store-memory=80000000", "--disable-usage-stats"]
    nodes = []
    try:
        port = free_port()
        head = ["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                f"--temp-dir={ray_tmp}", *common]  # fmt: skip
        head_env = dict(env, **{RAY_LOOPBACK_ENV: "0"})
        log = open(root / "head.log", "w")
        nodes.append(subprocess.Popen(head, env=head_env, stdout=log, stderr=subprocess.STDOUT))
        wait_for_line(root / "head.log", "Ray runtime started", nodes[0])
        address = f"127.0.0.1:{port}"
        worker = [sys.executable, "-c", LOOPBACK_RAY, "start", f"--address={address}", "--node-ip-address=127.0.0.1",
                  *common]  # fmt: skip
        nodes.append(subprocess.Popen(worker, env=env, stdout=open(root / "worker.log", "w"), stderr=subprocess.STDOUT))
        wait_for_line(root / "worker.log", "Ray runtime started", nodes[1])
        assert listening_off_loopback(marker) == []
        yield address, marker, env
        assert listening_off_loopback(marker) == []  # the idle workers the tests left too
    finally:
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        for node in reversed(nodes):
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        assert_none_left(marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def sweep_config(tmp_path_factory, text_file) -> str:
    path = tmp_path_factory.mktemp("configs") / "ray_smoke.py"
    path.write_text(SWEEP_CONFIG.format(dataset=str(text_file)))
    return str(path)


def run_sweep(env, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "experiments.sweep", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def kill_the_worker_running(point: Path, driver: subprocess.Popen, at_step: int, timeout: float = 300) -> int | None:
    """SIGKILL the process that runs ``point`` (its sweep_point.json says which) once it reached ``at_step``."""
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None:
        record = RunDir(point).read_point_record() or {}
        steps = [r["step"] for r in RunDir(point).read_metrics()]
        if record.get("status") == "running" and max(steps, default=0) >= at_step:
            os.kill(record["pid"], signal.SIGKILL)
            return record["pid"]
        time.sleep(0.05)
    return None


KEYS = ("loss", "val_loss")  # the metrics compared between a point's runs
TIMING = ("started", "seconds", "host", "pid")  # what differs between two runs of the same point


@pytest.mark.slow
@needs_ray
def test_a_sweep_on_ray_records_and_trains_what_the_local_backend_does(cluster, sweep_config, tmp_path):
    """2 points and one whose config the run refuses: the same status.json, records, files and metrics."""
    address, marker, env = cluster
    spec = f"{sweep_config}:with_bad_point"
    local = run_command("sweep", "--config", spec, "--workdir", tmp_path / "local")  # in this process
    on_ray = run_sweep(env, "--config", spec, "--workdir", tmp_path / "ray", "--backend", "ray", "--address", address)
    assert local.returncode == on_ray.returncode == 1, on_ray.stderr  # 1: a point failed
    status = {name: read_json(tmp_path / name / "status.json") for name in ("local", "ray")}
    assert status["local"]["counts"] == status["ray"]["counts"] == {"done": 2, "failed": 1}

    def comparable(record: dict, sweep_dir: Path) -> dict:  # its own sweep dir in its command; no timing
        text = json.dumps({k: v for k, v in record.items() if k not in TIMING}).replace(str(sweep_dir), "DIR")
        return json.loads(text)

    for a, b in zip(status["local"]["points"], status["ray"]["points"]):
        assert comparable(a, tmp_path / "local") == comparable(b, tmp_path / "ray")
    failed = next(r for r in status["ray"]["points"] if r["status"] == "failed")
    assert failed["name"] == "n_head=3" and "not divisible by n_head=3" in failed["error"]
    assert read_json(tmp_path / "local" / "sweep.json") == read_json(tmp_path / "ray" / "sweep.json")
    for record in status["local"]["points"][:2]:
        a, b = tmp_path / "local" / record["name"], tmp_path / "ray" / record["name"]
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        assert_same_metrics(b, a, keys=KEYS)
        summary_a, summary_b = (read_json(d / "summary.json") for d in (a, b))
        assert summary_b["final_val_loss"] == pytest.approx(summary_a["final_val_loss"], rel=1e-6)


@pytest.mark.slow
@needs_ray
def test_a_killed_worker_is_retried_and_its_point_resumes_to_the_uninterrupted_result(cluster, sweep_config, tmp_path):
    address, marker, env = cluster
    longer = ["--config.max_iters=100", "--config.checkpoint_every=20", "--config.eval_interval=50"]
    reference = run_command("sweep", "--config", sweep_config, "--workdir", tmp_path / "local", "--index", "0", *longer)
    assert reference.returncode == 0, reference.stderr
    cmd = [sys.executable, "-m", "experiments.sweep", "--config", sweep_config, "--workdir", str(tmp_path / "ray"),
           "--index", "0", "--backend", "ray", "--address", address, *longer]  # fmt: skip
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        point = tmp_path / "ray" / json.loads((tmp_path / "local" / "status.json").read_text())["points"][0]["name"]
        killed = kill_the_worker_running(point, driver, at_step=40)  # the Ray worker process running the point
        out, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert killed is not None, "the point ended before its worker could be killed"
    assert driver.returncode == 0, err
    assert "resuming" in err  # the sweep's record says so (it does whether or not a checkpoint is restored)
    (first, retry) = sessions_resumed_from(point)  # what the run itself records of its two sessions
    assert first == -1 and retry >= 20 and retry % 20 == 0, (first, retry)  # a checkpoint (every 20 steps)
    record = RunDir(point).read_point_record()
    assert record["status"] == "done"
    assert_same_metrics(point, tmp_path / "local" / point.name, keys=KEYS)


@pytest.mark.slow
@needs_ray
def test_a_point_on_two_hosts_trains_as_one_four_device_run_and_survives_losing_a_host(cluster, sweep_config, tmp_path):
    """``ray.hosts=2``: a task on each node, 2 simulated devices each, joined by jax.distributed.

    Process 0's worker is killed mid-run: process 1 stops too, the driver runs both again, and
    they resume. The losses are those of one process with 4 devices (rel 2e-5: reduction order).
    """
    address, marker, env = cluster
    run = ["--index", "1", "--config.batch_size=8", "--config.max_iters=100", "--config.checkpoint_every=20",
           "--config.eval_interval=50", "--config.log_interval=10"]  # fmt: skip
    four_devices = with_devices(4, env)
    reference = run_sweep(four_devices, "--config", sweep_config, "--workdir", tmp_path / "local", *run)
    assert reference.returncode == 0, reference.stderr
    name = read_json(tmp_path / "local" / "status.json")["points"][1]["name"]
    two_hosts = with_devices(2, env)  # XLA_FLAGS is forwarded to the tasks
    cmd = [sys.executable, "-m", "experiments.sweep", "--config", sweep_config, "--workdir", str(tmp_path / "ray"),
           *run, "--config.ray.hosts=2", "--backend", "ray", "--address", address]  # fmt: skip
    driver = subprocess.Popen(cmd, cwd=ROOT, env=two_hosts, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed = kill_the_worker_running(tmp_path / "ray" / name, driver, at_step=40)
        _, err = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert killed is not None, "the point ended before a host could be killed"
    assert driver.returncode == 0, err
    assert "process 1 of 2, 4 devices in all (2 here)" in err
    assert "a host failed" in err and "(attempt 2)" in err and "resuming" in err
    (first, retry) = sessions_resumed_from(tmp_path / "ray" / name)  # the run's own record: the retry restored
    assert first == -1 and retry >= 20 and retry % 20 == 0, (first, retry)  # a checkpoint (every 20 steps)
    state = tmp_path / "ray" / name / "checkpoints" / "100" / "state"
    assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir()
    assert_same_metrics(tmp_path / "ray" / name, tmp_path / "local" / name, rel=2e-5, abs=1e-6, keys=KEYS)


def test_without_ray_installed_the_backend_says_how_to_get_it(monkeypatch, capsys, tmp_path):
    from attention_jax.lab.commands import sweep as main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    spec = "configs/ablate_scale.py:smoke"
    assert main(["--config", spec, "--workdir", str(tmp_path), "--index", "0", "--backend", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: --backend ray needs Ray: pip install "attention_jax[ray]"']
    with pytest.raises(SystemExit) as exit_:
        main(["--config", spec, "--address", "127.0.0.1:1", "--dry-run"])
    assert exit_.value.code == 2 and "--address needs --backend ray" in capsys.readouterr().err


@needs_ray
def test_an_address_where_no_cluster_answers_is_one_line_not_a_wait(tmp_path, capsys):
    from attention_jax.lab.commands import sweep as main

    args = ["--config", "configs/ablate_scale.py:smoke", "--workdir", str(tmp_path), "--index", "0"]
    assert main([*args, "--backend", "ray", "--address", f"127.0.0.1:{free_port()}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"error: --address 127\.0\.0\.1:\d+: no Ray cluster answers there .*", line)


def test_task_resources_come_from_the_ray_group():
    from attention_jax.lab.config import ConfigError, apply_overrides, load_config
    from attention_jax.lab.ray_backend import resources_of

    config = load_config("configs/ablate_scale.py:smoke")
    assert resources_of(config) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {}}
    apply_overrides(config, {"ray.tpu_chips": 4, "ray.num_cpus": 8})
    assert resources_of(config) == {"num_cpus": 8.0, "num_gpus": 0.0, "resources": {"TPU": 4}}
    for key, value in (("ray.num_gpus", -1), ("ray.hosts", 0)):
        with pytest.raises(ConfigError, match=rf"{key}=-?\d+(\.0)?: must be"):
            resources_of(apply_overrides(load_config("configs/ablate_scale.py:smoke"), {key: value}))
