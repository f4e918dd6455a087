"""What a sweep on Ray prints: no colour codes, no token-authentication warning, and every point's last line.

Ray wraps the "(task pid=...)" prefix of worker lines in ANSI colours unless
``RAY_COLOR_PREFIX=0``, deduplicates worker lines that differ only in numbers
(two points' "done in N s" lines) unless ``RAY_DEDUP_LOGS=0`` and may drop
what it held back at shutdown, and warns that it turned token authentication
on for a local instance unless ``RAY_AUTH_MODE`` is set. The unit tests check
the settings and the line split between worker and driver; the slow one runs a
two-point sweep on a Ray instance the sweep starts and stops itself, reads what it
printed, and checks that no process of that instance is left.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid

import pytest

from attention_jax.lab import ray_backend
from attention_jax.lab import sweep as sweep_lib
from tests.helpers import MARKER, ROOT, assert_none_left


def test_output_switches_are_set_unless_the_user_set_them(tmp_path):
    env = ray_backend.ray_environment("127.0.0.1:6379", environ={}, home=tmp_path)
    assert env == {"RAY_COLOR_PREFIX": "0", "RAY_DEDUP_LOGS": "0"}  # a cluster, and no token at hand: no auth mode
    mine = {"RAY_COLOR_PREFIX": "1", "RAY_DEDUP_LOGS": "1", "RAY_AUTH_MODE": "disabled"}
    assert ray_backend.ray_environment(None, environ=mine, home=tmp_path) == {}


def test_a_local_instance_gets_token_auth_with_a_fresh_token_and_nothing_written(tmp_path):
    a = ray_backend.ray_environment(None, environ={}, home=tmp_path)
    b = ray_backend.ray_environment(None, environ={}, home=tmp_path)
    assert a["RAY_AUTH_MODE"] == "token" and len(a["RAY_AUTH_TOKEN"]) == 64
    assert a["RAY_AUTH_TOKEN"] != b["RAY_AUTH_TOKEN"]  # one per instance
    assert not (tmp_path / ".ray").exists()
    # a token the user has is used, not replaced
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 64)
    assert "RAY_AUTH_TOKEN" not in ray_backend.ray_environment(None, environ={}, home=tmp_path)
    assert ray_backend.ray_environment(None, environ={"RAY_AUTH_TOKEN": "t"}, home=tmp_path / "none") == {
        **ray_backend.RAY_OUTPUT_ENV, "RAY_AUTH_MODE": "token"}  # fmt: skip
    # connecting to a cluster with a token at hand: token mode said explicitly (Ray would pick it and warn)
    assert ray_backend.ray_environment("10.0.0.1:6379", environ={}, home=tmp_path)["RAY_AUTH_MODE"] == "token"


def test_the_lines_held_back_for_the_driver_are_exactly_how_each_point_ended(tmp_path):
    """The worker holds back the lines sweep's own records print at a point's end, in their real wording."""
    points = [sweep_lib.Point(0, "lr=0.001", {"learning_rate": 1e-3}), sweep_lib.Point(1, "lr=0.002", {})]
    lines: list[str] = []
    for point, status in zip(points, ({"status": "done"}, {"status": "failed", "error": "ConfigError: bad"})):
        records = sweep_lib._PointRecords("configs/x.py", point, tmp_path, None, resumed=False)
        records.start()
        records.finish(status, lines.append)
    records = sweep_lib._PointRecords("configs/x.py", points[0], tmp_path, None, resumed=False)
    records.start()
    records.finish({"status": "diverged", "error": "loss is nan"}, lines.append)
    assert lines[0].startswith("[0] lr=0.001: done in ") and lines[1] == "[1] lr=0.002: failed: ConfigError: bad"
    assert all(ray_backend.is_final_line(line, points) for line in lines)
    others = [
        "[0] lr=0.001: starting",
        "[1] lr=0.002: resuming",
        "[0] lr=0.001: done, skipped",
        "[0, 1] 2 points in one program",
        "[2] lr=0.004: done in 3 s",
    ]  # fmt: skip  (the last: a point of another task)
    assert not any(ray_backend.is_final_line(line, points) for line in others)


SWEEP_CONFIG = """
from attention_jax.lab.config import base_config, smoke
from attention_jax.lab.sweep import sweep


def get_config(arg=None):
    c = smoke(base_config())
    c.data.dataset = {dataset!r}
    c.max_iters = 4
    c.lr_decay_iters = 4
    c.eval_interval = 4
    c.checkpoint_every = 4
    c.sample_tokens = 0
    return c


def get_sweep(arg=None):
    return sweep("learning_rate", [0.001, 0.002])
"""


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason='Ray is an optional extra: pip install "attention_jax[ray]"'
)
def test_a_ray_sweep_prints_no_colour_no_auth_warning_and_every_done_line(tmp_path, text_file):
    config = tmp_path / "ray_output.py"
    config.write_text(SWEEP_CONFIG.format(dataset=str(text_file)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # Ray's defaults, as a user has them
    marker = uuid.uuid4().hex  # in the environment of the driver and of the Ray instance it starts
    env.update(RAY_USAGE_STATS_ENABLED="0", HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), **{MARKER: marker})
    cmd = [sys.executable, "-m", "experiments.sweep", "--config", str(config), "--workdir", str(tmp_path / "sweep"),
           "--backend", "ray", "--no-group"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "\x1b[" not in output, output
    assert "Token authentication" not in output and "auth_token" not in output, output
    assert "repeated" not in output, output  # no deduplication notice
    assert not (tmp_path / "home" / ".ray" / "auth_token").exists()
    for name in ("learning_rate=0.001", "learning_rate=0.002"):
        done = [line for line in output.splitlines() if f"{name}: done in " in line]
        assert len(done) == 1 and done[0].startswith("["), output  # once, from the driver: no "(run_program pid=...)"
    # Without --address the sweep started its own Ray instance, and stopped it: no process of it is left.
    assert json.loads((tmp_path / "sweep" / "status.json").read_text())["counts"] == {"done": 2}
    assert_none_left(marker)
