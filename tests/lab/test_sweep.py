"""attention_jax.sweep and experiments.sweep: expansion, names, selection, commands, the runner."""

from __future__ import annotations

import json
import shlex

import pytest

from attention_jax.lab import sweep as sw
from attention_jax.lab.config import ConfigError, apply_overrides, load_config, parse_override_args, to_dict
from attention_jax.lab.rundir import RunDir
from tests.helpers import assert_same_metrics, snapshot, start_holder

SPEC = "configs/ablate_scale.py:smoke"


def test_product_zip_unique():
    a = sw.sweep("model.attn_scale", ["none", "sqrt"])
    b = sw.sweep("model.n_head", [2, 4, 8])
    assert sw.product(a, b) == [{"model.attn_scale": s, "model.n_head": h} for s in ("none", "sqrt") for h in (2, 4, 8)]
    assert sw.zip_(sw.sweep("lr", [1, 2]), sw.sweep("min_lr", [0.1, 0.2])) == [
        {"lr": 1, "min_lr": 0.1},
        {"lr": 2, "min_lr": 0.2},
    ]
    with pytest.raises(ValueError, match="equal length"):
        sw.zip_(a, b)
    assert sw.unique([{"x": 1}, {"x": 2}, {"x": 1}]) == [{"x": 1}, {"x": 2}]
    assert sw.product() == [{}]


def test_point_names():
    assert sw.point_name({}) == "base"
    assert sw.point_name({"model.attn_scale": "none", "model.qk_norm": True, "learning_rate": 0.003}) == (
        "attn_scale=none,qk_norm=true,learning_rate=0.003"
    )
    # the same leaf under two parents: full keys; odd characters sanitized
    assert sw.point_name({"a.x": 1, "b.x": "p/q r"}) == "a.x=1,b.x=p_q_r"
    with pytest.raises(ConfigError, match="same workdir name"):
        sw.expand([{"x": 1}, {"x": 1}])


def test_select_indices():
    points = sw.expand([{"x": i} for i in range(6)])
    assert [p.index for p in sw.select(points, None)] == list(range(6))
    assert [p.index for p in sw.select(points, "3")] == [3]
    assert [p.index for p in sw.select(points, "0,2-4,2")] == [0, 2, 3, 4]
    for bad in ("6", "x", "4-2", "-1"):
        with pytest.raises(ConfigError):
            sw.select(points, bad)


def test_ablate_scale_cpu_sweep_shape_and_every_point_valid():
    points = sw.load_sweep("configs/ablate_scale.py:cpu")
    assert len(points) == 4 * 5 * 2 + 4 * 2  # arms x head sizes x designs + the learning-rate axis
    assert len({p.name for p in points}) == len(points)
    base = load_config("configs/ablate_scale.py:cpu")
    assert base.num_seeds == 3  # seeds are vmapped inside each point, not separate points
    sizes_a, sizes_b = set(), set()
    for p in points:
        c = sw.point_config("configs/ablate_scale.py:cpu", p)
        D = c.model.head_size or c.model.n_embd // c.model.n_head
        (sizes_b if c.model.head_size else sizes_a).add(D)
        if c.model.head_size is None:
            assert c.model.n_head * D == c.model.n_embd  # design (a): width fixed
    assert sizes_a == sizes_b == {8, 16, 32, 64, 128}


def test_printed_command_parses_back_to_the_same_config(tmp_path):
    points = sw.load_sweep("configs/ablate_scale.py:cpu")
    for p in (points[0], points[-1]):
        argv = shlex.split(sw.train_command("configs/ablate_scale.py:cpu", p, tmp_path))
        assert argv[:5] == ["python", "-m", "experiments.train", "--config", "configs/ablate_scale.py:cpu"]
        assert argv[argv.index("--workdir") + 1] == str(tmp_path / p.name)
        overrides = parse_override_args([a for a in argv if a.startswith("--config.")])
        config = apply_overrides(load_config("configs/ablate_scale.py:cpu"), overrides)
        assert to_dict(config) == to_dict(sw.point_config("configs/ablate_scale.py:cpu", p))


def test_cli_print_commands_dry_run_and_bad_index(tmp_path, capsys):
    from attention_jax.lab.commands import sweep as main

    assert main(["--config", SPEC, "--print-commands", "--index", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    name = sw.load_sweep(SPEC)[1].name
    assert len(out) == 1 and out[0].endswith(f"--workdir {shlex.quote(str(tmp_path / name))} --no-progress")
    assert main(["--config", SPEC, "--dry-run", "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(sw.load_sweep(SPEC)) and "pending" in lines[0]
    assert main(["--config", SPEC, "--index", "99", "--dry-run"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["--config", "configs/shakespeare_char.py", "--dry-run"]) == 2
    assert "no get_sweep" in capsys.readouterr().err


def fake_train(fail_names=()):
    """A stand-in for train(): writes summary.json, raises for the named points; records calls."""
    calls = []

    def train_fn(config, workdir, text=None, progress=False):
        calls.append(workdir.name)
        if workdir.name in fail_names:
            raise RuntimeError("boom")
        (workdir / "summary.json").write_text(json.dumps({"final_val_loss": [1.0]}))
        return {"final_val_loss": [1.0]}

    return train_fn, calls


def test_runner_records_a_failure_goes_on_and_skips_finished_points(tmp_path):
    points = sw.load_sweep(SPEC)
    bad = points[1].name
    train_fn, calls = fake_train(fail_names={bad})
    status = sw.run_sweep(SPEC, points, tmp_path, train_fn=train_fn)
    assert calls == [p.name for p in points]  # the failure did not stop the sweep
    by_name = {r["name"]: r for r in status["points"]}
    assert by_name[bad]["status"] == "failed" and "RuntimeError: boom" in by_name[bad]["error"]
    assert status["counts"] == {"done": len(points) - 1, "failed": 1}
    assert json.loads((tmp_path / sw.STATUS_FILE).read_text())["counts"] == status["counts"]
    # second run: finished points are skipped, the failed one is retried
    train_fn2, calls2 = fake_train()
    status = sw.run_sweep(SPEC, points, tmp_path, train_fn=train_fn2)
    assert calls2 == [bad] and status["counts"] == {"done": len(points)}
    # --index: only the chosen point runs; status still covers every point
    (tmp_path / points[2].name / "summary.json").unlink()
    train_fn3, calls3 = fake_train()
    status = sw.run_sweep(SPEC, sw.select(points, "2"), tmp_path, all_points=points, train_fn=train_fn3)
    assert calls3 == [points[2].name] and len(status["points"]) == len(points)


@pytest.mark.slow
def test_interrupted_point_resumes_from_its_checkpoint(tmp_path, capsys, small_text):
    from attention_jax.lab.loop import train

    text = small_text(3000)
    point = sw.load_sweep(SPEC)[0]

    def interrupted(config, workdir, text=None, progress=False):
        config = apply_overrides(config.copy_and_resolve_references(), {"max_iters": 5})  # checkpoint at 5
        train(config, workdir, text=text, progress=False)
        (workdir / "summary.json").unlink()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sw.run_sweep(SPEC, [point], tmp_path, text=text, train_fn=interrupted)
    assert sw.read_point_status(tmp_path, point)["status"] == "interrupted"
    capsys.readouterr()
    status = sw.run_sweep(SPEC, [point], tmp_path, text=text)
    assert "training from step 5 to 10" in capsys.readouterr().err
    assert status["counts"] == {"done": 1}
    summary = json.loads((tmp_path / point.name / "summary.json").read_text())
    assert summary["steps"] == 10 and len(summary["final_val_loss"]) == 3


def test_points_that_differ_only_in_member_values_are_grouped():
    points = sw.load_sweep(SPEC)
    groups = sw.group_points(SPEC, points, "/nonexistent-sweep-dir")
    assert sorted(p.index for g in groups for p in g) == [p.index for p in points]  # each point once
    multi = [g for g in groups if len(g) > 1]
    # Points that differ in the attention scale, the learning rate and min_lr only share one program:
    # one per shape (the smoke sweep's qk_norm is off everywhere).
    lr_axis = ",learning_rate=0.003,min_lr=0.0003"
    name = "attn_scale={},qk_norm=false,{}".format
    assert [[p.name for p in g] for g in multi] == [
        [name(s, "n_head=8" + lr) for lr in ("", lr_axis) for s in ("none", "sqrt")],
        *(
            [name(s, shape) for s in ("none", "sqrt")]
            for shape in ("n_head=4", "n_head=2,head_size=4", "n_head=2,head_size=8")
        ),
    ]
    assert len(groups) == len(multi) == 4
    configs = [sw.point_config(SPEC, p) for p in multi[0]]
    group = sw.group_config(configs)
    assert [e["model.attn_scale"] for e in group.population] == ["none", "sqrt", "none", "sqrt"]
    assert [e["learning_rate"] for e in group.population] == [configs[0].learning_rate] * 2 + [3e-3] * 2
    assert [e["min_lr"] for e in group.population] == [configs[0].min_lr] * 2 + [pytest.approx(3e-4)] * 2
    assert group.model.to_dict() == configs[0].model.to_dict() and group.num_seeds == configs[0].num_seeds


def _tree(folder):
    """A run directory's files, with orbax's content-hashed data file names left out."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if "tensorboard" not in p.parts and "d" not in p.parts[:-1][-1:])  # fmt: skip


@pytest.mark.slow
def test_a_grouped_sweep_writes_what_one_program_per_point_writes(tmp_path, small_text):
    text = small_text(3000)
    points = [p for p in sw.load_sweep(SPEC) if "n_head=8" in p.name]  # one program of four points
    grouped = sw.run_sweep(SPEC, points, tmp_path / "grouped", text=text)
    alone = sw.run_sweep(SPEC, points, tmp_path / "alone", text=text, group=False)
    assert grouped["counts"] == alone["counts"] == {"done": 4}
    for p in points:
        a, b = tmp_path / "grouped" / p.name, tmp_path / "alone" / p.name
        assert _tree(a) == _tree(b)
        assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
        assert_same_metrics(RunDir(a).read_metrics(), RunDir(b).read_metrics(), rel=1e-6)
        sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
        assert sa["seeds"] == sb["seeds"] and sa["final_val_loss"] == pytest.approx(sb["final_val_loss"], rel=1e-6)


def test_a_point_trained_elsewhere_is_skipped_and_its_records_left_alone(tmp_path, capsys):
    """Two sweep runners on one sweep dir: the second leaves the point the first is training alone."""
    points = sw.load_sweep(SPEC)[:2]
    busy = tmp_path / points[0].name
    holder = start_holder(busy)  # another process trains this point
    try:
        (busy / "sweep_point.json").write_text(json.dumps({"status": "running", "started": 1.0}))
        before = snapshot(busy)
        train_fn, calls = fake_train()
        status = sw.run_sweep(SPEC, points, tmp_path, train_fn=train_fn)
        assert calls == [points[1].name]  # only the free point trained here
        assert snapshot(busy) == before  # no record written over the other runner's
        assert f"[0] {points[0].name}: skipped: workdir {busy} is in use" in capsys.readouterr().err
        assert {r["name"]: r["status"] for r in status["points"]} == {points[0].name: "running", points[1].name: "done"}
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
