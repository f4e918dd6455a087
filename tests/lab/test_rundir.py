"""The run directory: its file names, atomic writes, the config check, metrics.jsonl and TensorBoard, loading a run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attention_jax.data import CharTokenizer
from attention_jax.lab import rundir as rd
from attention_jax.lab.config import ConfigError
from attention_jax.lab.loop import train
from tests.helpers import ROOT, read_events


def read_event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of ``folder``'s event files, by tag: [(step, value)] in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for event in read_events(folder):
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_every_file_name_is_defined_once_in_rundir():
    names = [rd.CONFIG, rd.TOKENIZER, rd.DATASET, rd.METRICS, rd.TENSORBOARD, rd.CHECKPOINTS, rd.BEST, rd.SAMPLE,
             rd.SUMMARY, rd.SWEEP_POINT, rd.LOCK, rd.DAMAGED]  # fmt: skip
    assert len(set(names)) == len(names)
    root = Path(rd.__file__).parents[1]  # attention_jax/
    for path in root.rglob("*.py"):
        if path.name == "rundir.py":
            continue
        text = path.read_text()
        for name in ('"summary.json"', '"metrics.jsonl"', '"sweep_point.json"', '"tokenizer.json"', '"config.json"',
                     '"dataset.json"', '"train.lock"'):  # fmt: skip
            assert name not in text, f"{path} spells {name}: use attention_jax.lab.rundir"


def test_json_is_written_atomically_and_read_back(tmp_path):
    rd.write_json(tmp_path / "a.json", {"x": [1, 2.5], "y": None})
    assert rd.read_json(tmp_path / "a.json") == {"x": [1, 2.5], "y": None}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left behind
    run = rd.RunDir(tmp_path / "run")
    run.create()
    tok = CharTokenizer.from_text("hello world")
    run.write_tokenizer(tok)
    assert run.read_tokenizer() == tok
    run.write_summary({"steps": 3})
    assert run.has_summary() and run.read_summary() == {"steps": 3}
    run.remove_summary()
    assert not run.has_summary()
    assert run.read_point_record() is None
    (run / rd.SWEEP_POINT).write_text("{not json")
    assert run.read_point_record() is None  # unreadable is treated as absent


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert rd.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert rd.read_jsonl(tmp_path / "missing.jsonl") == []


def test_check_same_config_names_what_changed_and_allows_resumable_changes(tmp_path):
    run = rd.RunDir(tmp_path)
    run.check_same_config({"a": 1})  # no config yet: anything goes
    old = {"learning_rate": 1e-3, "max_iters": 10, "model": {"n_head": 2}}
    run.write_config(old)
    run.check_same_config({**old, "max_iters": 20, "steps_per_call": 5})  # may change on resume
    with pytest.raises(ConfigError, match=r"different config \(model\.n_head: 2 -> 4\)"):
        run.check_same_config({**old, "model": {"n_head": 4}})
    # A run written before a key existed resumes with the value that computes what it computed, only with that.
    run.check_same_config({**old, "z_loss": 0.0})
    with pytest.raises(ConfigError, match=r"different config \(z_loss: None -> 0\.0001\)"):
        run.check_same_config({**old, "z_loss": 1e-4})
    # the attention variants' keys likewise: their defaults compute what the run computed, anything else not
    same = {"qk_norm_gain": True, "sinks": False, "logn_learned": False, "softcap": None, "window": None,
            "logn_scale": None}  # fmt: skip
    run.check_same_config({**old, "model": {"n_head": 2, **same}})
    for key, value in (("sinks", True), ("qk_norm_gain", False), ("window", 16), ("logn_scale", 0.3)):
        with pytest.raises(ConfigError, match=rf"model\.{key}: None -> {value!r}"):
            run.check_same_config({**old, "model": {"n_head": 2, **same, key: value}})


def test_metrics_writer_keeps_rows_up_to_a_step_and_mirrors_them_to_tensorboard(tmp_path):
    run = rd.RunDir(tmp_path)
    run.create()
    first = run.metrics_writer(["seed_7", "seed_8"])
    first.write_many(
        [{"step": s, "member": m, "seed": 7 + m, "loss": float(s + (7 + m) / 10)} for s in (1, 2, 3) for m in (0, 1)]
    )
    first.write_many([{"step": 3, "member": 0, "seed": 7, "train_loss": 1.5, "val_loss": 1.25}])
    first.close()
    # Resumed from a checkpoint at step 2: rows after it are dropped, then the run continues.
    second = run.metrics_writer(["seed_7", "seed_8"], keep_up_to_step=2)
    second.write_many(
        [{"step": 3, "member": 0, "seed": 7, "loss": 30.0, "lr": 0.5, "grad_norm": 2.0, "tokens_per_s": 9.0}]
    )
    second.close()
    rows = run.read_metrics()
    assert [(r["step"], r["seed"]) for r in rows] == [(1, 7), (1, 8), (2, 7), (2, 8), (3, 7)]
    assert rows[-1]["loss"] == 30.0
    seed7 = read_event_scalars(tmp_path / rd.TENSORBOARD / "seed_7")
    # The event file keeps both sessions; TensorBoard purges the first session's steps >= 3 (purge_step).
    assert seed7["train/loss"][:3] == [(1, pytest.approx(1.7)), (2, pytest.approx(2.7)), (3, pytest.approx(3.7))]
    assert seed7["train/loss"][-1] == (3, 30.0)
    assert seed7["eval/val_loss"] == [(3, 1.25)]
    assert seed7["train/learning_rate"] == [(3, 0.5)] and seed7["train/grad_norm"] == [(3, 2.0)]
    # The resumed session starts with TensorBoard's purge marker at step 3 (for both seeds).
    for seed in (7, 8):
        starts = [e.step for e in read_events(tmp_path / rd.TENSORBOARD / f"seed_{seed}") if e.session_log.status == 1]
        assert starts == [0, 3], (seed, starts)  # SessionLog.START: a fresh run purges all, a resumed one from 3


def test_diagnostics_become_one_tensorboard_scalar_per_layer_and_head(tmp_path):
    run = rd.RunDir(tmp_path)
    run.create()
    writer = run.metrics_writer(["seed_0"])
    diagnostics = {"max_logit": [[1.0, 2.0], [3.0, None]], "log_z": 4.5, "per_layer": [0.5, 0.25]}
    writer.write_many([{"step": 5, "member": 0, "val_loss": 1.0, "diagnostics": diagnostics}])
    writer.close()
    assert run.read_metrics()[0]["diagnostics"] == diagnostics
    events = read_event_scalars(tmp_path / rd.TENSORBOARD / "seed_0")
    assert events["diagnostics/max_logit/layer_1/head_0"] == [(5, 3.0)] and events["diagnostics/log_z"] == [(5, 4.5)]
    assert events["diagnostics/per_layer/layer_1"] == [(5, 0.25)]
    assert "diagnostics/max_logit/layer_1/head_1" not in events  # null (a non-finite value): not written


@pytest.mark.slow
def test_training_writes_tensorboard_equal_to_metrics_jsonl(tmp_path, tiny_config, small_text):
    train(tiny_config(max_iters=10, eval_interval=5, log_interval=5, num_seeds=2), tmp_path, text=small_text(3000),
          progress=False)  # fmt: skip
    rows = rd.RunDir(tmp_path).read_metrics()
    for seed in (1337, 1338):
        events = read_event_scalars(tmp_path / rd.TENSORBOARD / f"seed_{seed}")
        for key, tag in (("loss", "train/loss"), ("val_loss", "eval/val_loss"), ("grad_norm", "train/grad_norm")):
            want = [(r["step"], r[key]) for r in rows if r["seed"] == seed and key in r]
            got = events[tag]
            assert [s for s, _ in got] == [s for s, _ in want] and len(want) >= 2
            np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)  # float32 in events
        # every evaluation row carries the stability diagnostics, per layer and head, mirrored to TensorBoard
        evals = [r for r in rows if r["seed"] == seed and "val_loss" in r]
        L, H = tiny_config().model.n_layer, tiny_config().model.n_head
        for r in evals:
            d = r["diagnostics"]
            assert {len(d[n]) for n in ("max_logit", "entropy", "q_norm", "k_norm")} == {L}
            assert {len(heads) for heads in d["entropy"]} == {H} and 0 < min(min(h) for h in d["entropy"]) <= 1
            assert d["log_z_max"] >= d["log_z"] > 0
        got = events[f"diagnostics/max_logit/layer_{L - 1}/head_{H - 1}"]
        np.testing.assert_allclose([v for _, v in got], [r["diagnostics"]["max_logit"][-1][-1] for r in evals], 1e-6)
        assert [s for s, _ in events["diagnostics/log_z"]] == [r["step"] for r in evals]


def test_load_run_errors_name_the_folder(tmp_path, tiny_config, small_text):
    with pytest.raises(FileNotFoundError, match=r"no run in .*config\.json is missing"):
        rd.load_run(tmp_path / "nothing")
    train(tiny_config(max_iters=4, checkpoint_every=4, eval_interval=4), tmp_path / "w", text=small_text(3000),
          progress=False)  # fmt: skip
    run = rd.load_run(tmp_path / "w")
    assert run.step() == 4 and run.num_members == 1 and run.tokenizer.vocab_size > 5
    with pytest.raises(ValueError, match=r"member index must be in \[0, 1\)"):
        run.params(1)
    best = rd.load_run(tmp_path / "w", which="best")
    summary = json.loads((tmp_path / "w" / rd.SUMMARY).read_text())
    assert best.step() == summary["best_step"][0]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="what is measured is an import of torch")
def test_the_metrics_writer_does_not_import_torch_and_torch_still_imports(tmp_path):
    """tensorboardX loads torch when it is installed (about 1 s and 200 MB per training process)."""
    script = f"""
import sys
from attention_jax.lab.rundir import RunDir
writer = RunDir({str(tmp_path)!r}).metrics_writer(["seed_0"])
writer.write_many([{{"step": 1, "member": 0, "seed": 0, "loss": 2.5}}])
writer.close()
loaded = "torch" in sys.modules
import torch
print(loaded, torch.zeros(2).sum().item())
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "0.0"]
    scalars = [(v.tag, e.step, v.simple_value) for e in read_events(tmp_path / "tensorboard" / "seed_0")
               for v in e.summary.value]  # fmt: skip
    assert scalars == [("train/loss", 1, 2.5)]  # the writer still writes


def test_a_workdir_moved_during_a_save_leaves_no_checkpoint_under_the_old_name(tmp_path, monkeypatch):
    # The race behind a rare failure of test_system_faults' moved-workdir test: the workdir moved after the
    # check before a save and before orbax wrote, so orbax recreated the old path and finished a checkpoint
    # there. The save now stops with the same one-line fault and the stray folder no longer reads as a step.
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    workdir = tmp_path / "w"
    run = rd.RunDir(workdir)
    run.create()
    checkpoints = run.checkpoints()
    real_save = ocp.CheckpointManager.save

    def move_then_save(self, *args, **kwargs):
        if workdir.exists():
            workdir.rename(tmp_path / "elsewhere")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", move_then_save)
    try:
        with pytest.raises(rd.StorageFault) as info:
            checkpoints.save_latest(5, {"w": jnp.ones(3)}, {"best": {}})
    finally:
        checkpoints.close()
    assert f"the workdir {workdir}" in str(info.value)
    assert not any(p.name.isdigit() for p in workdir.rglob("*") if p.is_dir())
    # Where orbax finished the save in the recreated folder, it is kept under another name, not deleted; on a
    # loaded machine orbax sometimes fails on the vanished folder instead, and then there is nothing to keep.
    stray = {p.name for p in (workdir / rd.CHECKPOINTS).glob("5*") if "tmp" not in p.name}
    assert stray <= {"5.saved-after-the-workdir-moved"}
