"""What a newcomer met (issue 16): shipped configs by name, --help on overrides, exit statuses, clearer refusals."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from attention_jax.data import CharTokenizer
from attention_jax.lab import cli, commands, distributed
from attention_jax.lab import sweep as sw
from attention_jax.lab.config import (
    ConfigError,
    apply_overrides,
    call_config_function,
    config_file,
    configs_dir,
    load_config,
    run_name,
    shipped_configs,
    to_dict,
    validate,
)
from attention_jax.lab.sampling import check_prompt, check_run_dir
from tests.helpers import ROOT, SMOKE, assert_one_line_error_result, free_port, start_holder

SHIPPED = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------
# Shipped configs, by name
# ---------------------------------------------------------------------------


def test_a_name_resolves_to_the_clone_configs_and_loads_what_the_path_loads():
    assert configs_dir() == ROOT / "configs" and shipped_configs() == SHIPPED
    assert config_file("shakespeare_char") == config_file("shakespeare_char.py") == ROOT / "configs/shakespeare_char.py"
    for name, path in [("shakespeare_char:cpu", "configs/shakespeare_char.py:cpu"), ("bigram", "configs/bigram.py")]:
        assert to_dict(load_config(name)) == to_dict(load_config(path))
        assert run_name(name) == run_name(path)  # the same default workdir either way
    by_name, by_path = sw.load_sweep("ablate_scale:smoke"), sw.load_sweep("configs/ablate_scale.py:smoke")
    assert [(p.name, p.overrides) for p in by_name] == [(p.name, p.overrides) for p in by_path]


def test_an_unknown_name_lists_every_shipped_config_in_one_line(capsys):
    with pytest.raises(ConfigError) as info:
        load_config("shakespeare:cpu")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("unknown config 'shakespeare'")
    assert sorted(msg.rsplit(": ", 1)[1].split(", ")) == SHIPPED
    # a path keeps saying the file is missing (it is not taken for a name)
    with pytest.raises(ConfigError, match=r"^config file not found: configs/nope\.py \(or give a shipped config"):
        load_config("configs/nope.py")
    assert commands.train(["--config", "nope:cpu", "--workdir", "unused"]) == cli.EXIT_BAD_INPUT
    assert one_error_line(capsys.readouterr().err).startswith("error: unknown config 'nope'")


def test_a_file_in_the_current_folder_wins_over_a_shipped_name(tmp_path, monkeypatch):
    (tmp_path / "bigram").write_text(
        "from attention_jax.lab.config import base_config\n"
        "def get_config(arg):\n    c = base_config()\n    c.max_iters = 7\n    return c\n"
    )
    monkeypatch.chdir(tmp_path)
    assert load_config("bigram").max_iters == 7
    assert load_config("bigram.py").model.type == "bigram"  # no such file here: the shipped one


@pytest.mark.slow  # about 10 s idle, 30 s at a load of 4: a wheel build and a fresh interpreter
def test_the_wheel_ships_the_configs_and_a_name_resolves_from_a_folder_without_configs(tmp_path):
    pytest.importorskip("setuptools")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp_path / "wheel")],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("attention_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith("attention_jax/lab/configs/")}
        z.extractall(tmp_path / "site")  # a pure-Python wheel: unpacked is installed, for imports
    assert shipped == {f"attention_jax/lab/configs/{name}.py" for name in SHIPPED}
    for name in SHIPPED:  # byte for byte the clone's files
        assert (tmp_path / "site/attention_jax/lab/configs" / f"{name}.py").read_bytes() == (
            ROOT / "configs" / f"{name}.py"
        ).read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import json, attention_jax\n"
        "from attention_jax.lab import commands, config, sweep\n"
        "c = config.load_config('shakespeare_char:cpu')\n"
        "points = sweep.load_sweep('ablate_scale:smoke')\n"
        "print(json.dumps({'package': attention_jax.__file__, 'file': str(config.config_file('shakespeare_char')),"
        " 'max_iters': c.max_iters, 'points': [p.name for p in points],"
        " 'unknown': commands.train(['--config', 'nope'])}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["package"].startswith(str(tmp_path / "site"))  # the unpacked wheel, not the checkout
    assert got["file"] == str(tmp_path / "site/attention_jax/lab/configs/shakespeare_char.py")
    assert got["max_iters"] == load_config("configs/shakespeare_char.py:cpu").max_iters
    assert got["points"] == [p.name for p in sw.load_sweep("configs/ablate_scale.py:smoke")]
    assert got["unknown"] == cli.EXIT_BAD_INPUT
    assert one_error_line(out.stderr).endswith(", ".join(SHIPPED))


# ---------------------------------------------------------------------------
# --help: overrides, and where the keys are
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [commands.train, commands.sweep])
def test_help_explains_overrides_and_where_the_keys_are(command, capsys):
    with pytest.raises(SystemExit) as info:
        command(["--help"])
    assert info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--config.KEY=VALUE" in help_text and "shakespeare_char:cpu" in help_text
    path = help_text.split("attention_jax/lab/config.py (", 1)[1].split(")", 1)[0]
    assert Path(path).is_file() and "def base_config()" in Path(path).read_text()
    # the examples it gives are real keys that take the values shown
    config = apply_overrides(load_config(SMOKE), {"learning_rate": "3e-4", "model.n_head": "8"})
    assert (config.learning_rate, config.model.n_head) == (3e-4, 8)
    for code in (0, 1, 2, 3, 4, 5, 6, 7, 130):
        assert f" {code} " in help_text


# ---------------------------------------------------------------------------
# Exit statuses of their own
# ---------------------------------------------------------------------------


def test_the_new_statuses_are_distinct_and_documented():
    codes = [cli.EXIT_INTERNAL, cli.EXIT_BAD_INPUT, cli.EXIT_DIVERGED, cli.EXIT_SYSTEM, cli.EXIT_JOIN_FAILED,
             cli.EXIT_PROCESS_LOST, cli.EXIT_SWEEP_LEFT_TO_OTHERS, cli.EXIT_INTERRUPTED]  # fmt: skip
    assert len(set(codes)) == len(codes)
    assert (cli.EXIT_JOIN_FAILED, cli.EXIT_PROCESS_LOST, cli.EXIT_SWEEP_LEFT_TO_OTHERS) == (5, 6, 7)
    assert distributed.EXIT_LOST == cli.EXIT_PROCESS_LOST
    table = (ROOT / "docs" / "training.md").read_text()
    for code in codes:
        assert f"\n    {code} " in cli.__doc__ and f"\n| {code} |" in table


def test_a_join_that_times_out_exits_5():
    """The join timer's end (in the process that joins): its line, and status 5 rather than 1."""
    port = free_port()  # nothing answers there
    script = (
        "from attention_jax.lab import distributed as d\n"
        f"d._join_failed(d.Settings('127.0.0.1:{port}', 2, 1, 3, 100))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_line_error_result(result, rf"process 1 of 2 could not join the run within 3 s: nothing answers at "
                                 rf"the coordinator address 127\.0\.0\.1:{port}", code=5)  # fmt: skip


@pytest.mark.slow
def test_train_whose_peers_never_come_exits_5(tmp_path, text_file):
    """End to end: process 1 of 2 with nothing at the coordinator's address, through the supervisor."""
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config", SMOKE, "--workdir", str(tmp_path / "w"),
         "--no-progress", f"--config.data.dataset={text_file}", "--config.distributed.enabled=true",
         f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
         "--config.distributed.process_id=1", "--config.distributed.join_timeout_s=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert_one_line_error_result(result, r"process 1 of 2 could not join the run within 3 s", code=5)


@pytest.mark.parametrize(
    "child, pattern",
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", r"ended by signal SIGKILL"),
        (
            "import sys; sys.stderr.write('error: RuntimeError: Gloo connectFullMesh failed: Connection reset by "
            "peer\\n'); sys.exit(1)",
            r"another process of the run stopped",
        ),
    ],
)
def test_a_run_that_lost_a_process_exits_6(child, pattern, monkeypatch, capfd):
    """The supervisor's verdict on a child that was killed, or whose peer went away: status 6 rather than 1."""
    monkeypatch.setattr(distributed, "_CHILD", child)
    settings = distributed.Settings("127.0.0.1:1", 2, 0, 30, 100)
    assert distributed.supervise("train", [], settings) == cli.EXIT_PROCESS_LOST
    line = one_error_line(capfd.readouterr().err)
    assert re.search(pattern, line) and "process 0 of 2 stopped" in line and "resumes" in line


def test_a_sweep_whose_points_are_trained_elsewhere_exits_7(tmp_path, capsys):
    spec = "configs/ablate_scale.py:smoke"
    points = sw.load_sweep(spec)
    holder = start_holder(tmp_path / points[0].name)  # another runner trains point 0
    try:
        assert commands.sweep(["--config", spec, "--index", "0", "--workdir", str(tmp_path)]) == 7
        assert f"[0] {points[0].name}: skipped" in capsys.readouterr().err
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # the verdict over the points' states: failures come first, then points left to others
    chosen = points[:3]

    def status(*states):
        return {"points": [{"index": p.index, "status": s} for p, s in zip(chosen, states)]}

    assert commands.sweep_exit_status(status("done", "done", "done"), chosen) == 0
    assert commands.sweep_exit_status(status("done", "running", "done"), chosen) == 7
    assert commands.sweep_exit_status(status("failed", "running", "done"), chosen) == 1
    assert commands.sweep_exit_status(status("diverged", "done", "done"), chosen) == 1
    assert commands.sweep_exit_status(status("done", "failed", "running"), chosen[:1]) == 0  # only the chosen count


# ---------------------------------------------------------------------------
# Values and sweeps
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", float("nan")])
def test_a_non_finite_float_is_refused_as_such(value, capsys):
    with pytest.raises(ConfigError) as info:
        apply_overrides(load_config(SMOKE), {"learning_rate": value})
    assert str(info.value) == f"learning_rate={float(value)!r}: must be a finite number"
    assert commands.train(["--config", SMOKE, f"--config.learning_rate={value}"]) == cli.EXIT_BAD_INPUT
    assert one_error_line(capsys.readouterr().err) == f"error: learning_rate={float(value)!r}: must be a finite number"
    assert math.isfinite(apply_overrides(load_config(SMOKE), {"learning_rate": "1e-3"}).learning_rate)


def test_a_python_infinity_is_refused_by_validation_in_the_same_words():
    config = apply_overrides(load_config(SMOKE), {"weight_decay": float("inf")})  # a sweep's value
    with pytest.raises(ConfigError, match=r"^weight_decay=inf: must be a finite number$"):
        validate(config)


EMPTY_SWEEP = """from attention_jax.lab.config import base_config
from attention_jax.lab.sweep import product, sweep

def get_config(arg):
    return base_config()

def get_sweep(arg):
    return [p for p in product(sweep("model.n_head", [2, 4])) if p["model.n_head"] > 8]  # a filter that took all
"""


@pytest.mark.parametrize("flags", [[], ["--dry-run"], ["--print-commands"]])
def test_an_empty_sweep_is_refused(flags, tmp_path, capsys):
    spec = tmp_path / "empty.py"
    spec.write_text(EMPTY_SWEEP)
    assert commands.sweep(["--config", str(spec), "--workdir", str(tmp_path / "sw"), *flags]) == cli.EXIT_BAD_INPUT
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: {spec}: get_sweep returned no points, so there is nothing to run"
    assert not (tmp_path / "sw").exists()


def test_distinct_values_get_distinct_workdir_names():
    names = [p.name for p in sw.expand(sw.sweep("learning_rate", [0.001, 0.0010000001, 0.003]))]
    assert names == ["learning_rate=0.001", "learning_rate=0.0010000001", "learning_rate=0.003"]
    # the point the short name spells exactly keeps it, wherever it stands
    assert [p.name for p in sw.expand(sw.sweep("lr", [0.0010000001, 0.001]))] == ["lr=0.0010000001", "lr=0.001"]
    # values that no spelling tells apart (characters replaced in a name) get a hash suffix
    a, b = (p.name for p in sw.expand(sw.sweep("x", ["p_q", "p/q"])))
    assert a == "x=p_q" and b.startswith("x=p_q+h") and len(b) == len("x=p_q+h") + 8
    assert b == next(p.name for p in sw.expand(sw.sweep("x", ["p/q", "p_q"])) if p.overrides == {"x": "p/q"})
    # the same values twice still collide, and unique() is the fix the message names
    with pytest.raises(ConfigError, match=r"same workdir name: lr=0\.001 \(the same values repeated.*unique\(\)"):
        sw.expand(sw.sweep("lr", [0.001, 0.0010000001, 0.001]))
    assert [p.name for p in sw.expand(sw.unique(sw.sweep("lr", [0.001, 0.0010000001, 0.001])))] == [
        "lr=0.001",
        "lr=0.0010000001",
    ]


@pytest.mark.parametrize("variant", ["", ":cpu", ":smoke", ":tuned", ":tuned_cpu", ":tuned_smoke"])
def test_existing_sweeps_keep_every_point_name(variant):
    """Names that were distinct are not respelled, so old sweep dirs resume: the plain point_name of each."""
    spec = f"configs/ablate_scale.py{variant}"
    overrides = call_config_function(spec, "get_sweep")
    assert [p.name for p in sw.load_sweep(spec)] == [sw.point_name(o) for o in overrides]


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [("0", None), ("none", None), ("None", None), ("off", None), ("7", 7), ("1", 1)],
)
def test_top_k_zero_or_none_switches_it_off(text, want, tmp_path, monkeypatch):
    seen = {}
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr("attention_jax.lab.runs.load_run", lambda workdir, which: SimpleNamespace(
        num_members=1, diverged=[None]))  # fmt: skip
    monkeypatch.setattr("attention_jax.lab.sampling.sample_text", lambda run, prompt, **kw: seen.update(kw) or "x")
    assert commands.sample(["--workdir", str(tmp_path), "--top_k", text]) == 0
    assert seen["top_k"] == want
    assert commands.sample(["--workdir", str(tmp_path)]) == 0 and seen["top_k"] is None  # off by default


@pytest.mark.parametrize("text", ["-1", "two"])
def test_a_bad_top_k_is_one_line(text, capsys):
    with pytest.raises(SystemExit) as info:
        commands.sample(["--workdir", "w", "--top_k", text])
    assert info.value.code == cli.EXIT_BAD_INPUT
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: argument --top_k: ") and "0 or none for off" in line


def test_sampling_says_what_the_workdir_is(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("not a run")
    sweep_dir = tmp_path / "sweep"
    for name in ("lr=0.001", "lr=0.002", "lr=0.004", "lr=0.008"):
        (sweep_dir / name).mkdir(parents=True)
        (sweep_dir / name / "config.json").write_text("{}")
    (sweep_dir / "status.json").write_text("{}")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "sweep.json").write_text("{}")
    cases = {
        tmp_path / "nowhere": "no such directory",
        tmp_path / "file.txt": "it is a file, not a run directory",
        sweep_dir: f"it is a sweep directory; pass one of its points: {sweep_dir}/lr=0.001, {sweep_dir}/lr=0.002, "
        f"{sweep_dir}/lr=0.004 (and 1 more)",
        fresh: "it is a sweep directory, and none of its points has started",
    }
    for workdir, what in cases.items():
        assert commands.sample(["--workdir", str(workdir)]) == cli.EXIT_BAD_INPUT
        assert one_error_line(capsys.readouterr().err) == f"error: no run in {workdir}: {what}"
    check_run_dir(sweep_dir / "lr=0.001")  # a point is a run directory
    empty = tmp_path / "empty"
    empty.mkdir()
    check_run_dir(empty)  # an empty folder: load_run's own message (config.json is missing)


def test_an_out_of_vocabulary_prompt_names_every_bad_character_once():
    run = SimpleNamespace(tokenizer=CharTokenizer.from_text("abc "))
    with pytest.raises(ValueError) as info:
        check_prompt(run, "aZb QZ!a!")
    assert str(info.value) == "characters 'Z', 'Q', '!' are not in the tokenizer's vocabulary of 4"
    with pytest.raises(ValueError, match=r"^character 'Z' is not in the tokenizer's vocabulary of 4$"):
        check_prompt(run, "aZZ")
    with pytest.raises(ValueError, match="--prompt must not be empty"):
        check_prompt(run, "")
    check_prompt(run, "abc cab")


# ---------------------------------------------------------------------------
# ATTENTION_JAX_DATA_DIR, through the command
# ---------------------------------------------------------------------------


def test_a_wrong_data_dir_is_named_in_the_training_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTENTION_JAX_DATA_DIR", str(tmp_path))  # a folder without the file
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    status = commands.train(["--config", SMOKE, "--workdir", str(tmp_path / "w"), "--no-progress"])
    assert status == cli.EXIT_BAD_INPUT
    line = one_error_line(capsys.readouterr().err)
    assert f"ATTENTION_JAX_DATA_DIR={tmp_path} is a folder without tinyshakespeare.txt" in line
    assert not (tmp_path / "w" / "checkpoints").exists()
