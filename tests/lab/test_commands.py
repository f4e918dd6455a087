"""The command-line entry points: their output and exit status, and kill -9 at any moment.

The commands run in this process (``run_command``: the console scripts are
``sys.exit(command())``), except where the process is the subject: the console
script's exit status itself, kill -9, and simulated device counts (fixed when
a process starts).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from attention_jax.lab.rundir import read_jsonl
from tests.helpers import (
    ROOT,
    SMOKE,
    assert_one_line_error_result,
    assert_same_metrics,
    checkpoint_steps,
    run_command,
    run_entry_point,
    signal_when,
    training_starts,
    with_devices,
)

run = run_command
assert_one_line_error = assert_one_line_error_result


def train_args(workdir, text_file, *extra):
    return ("--config", SMOKE, "--workdir", workdir, f"--config.data.dataset={text_file}", "--no-progress", *extra)


@pytest.mark.slow
def test_train_then_sample_end_to_end(tmp_path, text_file):
    result = run("train", *train_args(tmp_path / "w", text_file))
    assert result.returncode == 0, result.stderr
    assert "20 steps, final val loss" in result.stderr
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["steps"] == 20 and np.isfinite(summary["final_val_loss"][0])

    result = run("sample", "--workdir", tmp_path / "w", "--prompt", "the king", "--max_new_tokens", 30, "--seed", 1)
    assert result.returncode == 0, result.stderr
    out = result.stdout.rstrip("\n")
    assert out.startswith("the king") and len(out) == len("the king") + 30
    again = run("sample", "--workdir", tmp_path / "w", "--prompt", "the king", "--max_new_tokens", 30, "--seed", 1)
    assert again.stdout == result.stdout  # deterministic for a seed

    bad = run("sample", "--workdir", tmp_path / "w", "--prompt", "Zebra")
    assert bad.returncode == 2 and "character 'Z' is not in the tokenizer" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run("sample", "--workdir", tmp_path / "nowhere")
    assert missing.returncode == 2 and "no run in" in missing.stderr


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--config.model.n_heads=4"], r"unknown config key 'model\.n_heads'.*did you mean model\.n_head"),
        (["--config.lerning_rate=1e-3"], r"did you mean learning_rate"),
        (["--config.batch_size=big"], r"'batch_size' expects int"),
        (["--config.model.n_head=3"], r"model\.head_size.*not divisible by n_head=3"),
        (["--config.learning_rate=-0.1"], r"learning_rate=-0\.1: must be positive"),
        (["--config.model.attn_scale=huge"], r"model\.attn_scale.*valid choices"),
        (["--config.model.block_size=100000"], r"model\.block_size=100000 is too long"),
        (["--bogus"], r"unrecognized argument '--bogus'"),
        (["--config.weight_decay=inf"], r"weight_decay=inf: must be a finite number"),
        (["--config.model.attention_impl=cudnn"], r"model\.attention_impl='cudnn': needs an NVIDIA GPU with cuDNN"),
    ],
)
def test_bad_input_gets_one_clear_line_and_exit_2(tmp_path, text_file, extra, pattern):
    result = run("train", *train_args(tmp_path / "w", text_file, *extra))
    assert_one_line_error(result, pattern)
    assert not (tmp_path / "w" / "checkpoints").exists()  # failed before any compute


@pytest.mark.parametrize("extra", [["--config.model.n_head=3"], ["--bogus"]])  # a config error; argparse's
def test_the_console_script_exits_with_the_status_and_line_of_the_command(tmp_path, text_file, extra):
    """What ``run_command`` reports is what a user of ``python -m experiments.train`` gets."""
    args = train_args(tmp_path / "w", text_file, *extra)
    script, in_process = run_entry_point("train", *args), run_command("train", *args)
    assert script.returncode == in_process.returncode == 2
    assert script.stderr.strip().splitlines()[-1:] == in_process.stderr.strip().splitlines() and script.stdout == ""


def test_missing_data_file_says_how_to_provide_it(tmp_path, monkeypatch):
    result = run("train", "--config", SMOKE, "--workdir", tmp_path / "w", "--config.data.dataset=/no/such.txt")
    assert_one_line_error(
        result, r"data\.dataset='/no/such\.txt': data file not found: /no/such\.txt \(give the path of a UTF-8 text "
        r"file, or 'tinyshakespeare' to read or download a named dataset\)"
    )  # fmt: skip
    env = {"ATTENTION_JAX_DATA_DIR": str(tmp_path / "empty"), "HOME": str(tmp_path / "home")}

    # Offline (the download fails as urllib fails without a network), tinyshakespeare explains where to put the file.
    def offline(*args, **kwargs):
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    result = run("train", "--config", SMOKE, "--workdir", tmp_path / "w2", env=env)
    assert_one_line_error(result, r"tinyshakespeare\.txt not found.*ATTENTION_JAX_DATA_DIR")


def test_missing_config_file(tmp_path):
    result = run("train", "--config", "configs/nope.py", "--workdir", tmp_path)
    assert_one_line_error(result, r"config file not found: configs/nope\.py")
    result = run("train", "--config", "configs/shakespeare_char.py:tpu", "--workdir", tmp_path)
    assert_one_line_error(result, r"unknown variant 'tpu'")


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_equals_uninterrupted(tmp_path, text_file):
    """Kill -9 a run mid-training (twice, at different moments), resume, compare with a clean run."""
    extra = ["--config.max_iters=40", "--config.checkpoint_every=5", "--config.eval_interval=10"]
    clean = run("train", *train_args(tmp_path / "clean", text_file, *extra))
    assert clean.returncode == 0, clean.stderr

    workdir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "experiments.train", *map(str, train_args(workdir, text_file, *extra))]
    for target_rows in (3, 8):  # kill after the log has this many rows: early, then later
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Checked while the process is stopped: killed at that moment, not some steps (or the end) later.
        signal_when(lambda: len(read_jsonl(workdir / "metrics.jsonl")) >= target_rows, proc, signal.SIGKILL)
        proc.wait()
        assert not (workdir / "summary.json").exists(), "the run finished before it could be killed"
        assert json.loads((workdir / "train.lock").read_text())["pid"] == proc.pid  # a stale lock: no obstacle
    saved = checkpoint_steps(workdir)  # what the killed process left
    assert saved and saved[-1] > 0, "killed before its first checkpoint: the resume below would prove nothing"
    resumed = run("train", *train_args(workdir, text_file, *extra))
    assert resumed.returncode == 0, resumed.stderr
    assert training_starts(resumed.stderr) == [saved[-1]]  # it restored the last checkpoint, not step 0

    assert_same_metrics(workdir, tmp_path / "clean", min_rows=10)
    sa = json.loads((tmp_path / "clean" / "summary.json").read_text())
    sb = json.loads((workdir / "summary.json").read_text())
    assert sb["final_val_loss"] == pytest.approx(sa["final_val_loss"], rel=1e-6)


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path, text_file):
    env = with_devices(3)  # a process of its own: 3 devices
    result = run_entry_point("train", *train_args(tmp_path / "w", text_file, "--config.batch_size=4"), env=env)
    assert_one_line_error(result, r"batch_size=4: must be divisible by the 3 devices")
