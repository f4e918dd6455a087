"""The training loop: it learns, writes its run directory, resumes exactly, stops on divergence."""

from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax.lab.config import ConfigError
from attention_jax.lab.experiment import Experiment
from attention_jax.lab.loop import TrainingDiverged, health_program, merge_members, train
from attention_jax.lab.rundir import load_run, read_jsonl
from attention_jax.lab.steps import TrainState
from tests.helpers import (
    SOURCE,
    assert_same_metrics,
    checkpoint_steps,
    copy_run,
    rows_up_to,
    snapshot,
    training_starts,
)


def losses_of(workdir):
    rows = read_jsonl(workdir / "metrics.jsonl")
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], [
        (r["step"], r["val_loss"]) for r in rows if "val_loss" in r
    ]


@pytest.mark.slow
def test_training_learns_and_writes_workdir(tmp_path, tiny_config, small_text):
    config = tiny_config(max_iters=60, eval_interval=30, checkpoint_every=30, learning_rate=1e-2, sample_tokens=20)
    summary = train(config, tmp_path, text=small_text(), progress=False)
    for name in ("config.json", "metrics.jsonl", "tokenizer.json", "sample.txt", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "checkpoints" / "60").is_dir() and (tmp_path / "best").is_dir()
    _, val = losses_of(tmp_path)
    assert [s for s, _ in val] == [0, 30, 60]
    assert val[0][1] == pytest.approx(math.log(summary_vocab(tmp_path)), rel=0.05)  # uniform at init
    assert val[-1][1] < val[0][1] - 0.4  # it learns
    assert json.loads((tmp_path / "config.json").read_text())["max_iters"] == 60
    assert summary["final_val_loss"][0] == pytest.approx(val[-1][1])


def summary_vocab(workdir):
    return len(json.loads((workdir / "tokenizer.json").read_text())["chars"])


def test_resume_continues_exactly(source_run, reference_run, tiny_config, text_file, tmp_path, capsys):
    """A copy of the 20-step run (checkpoints at 10 and 20) trained on to 30 equals the uninterrupted run."""
    workdir = copy_run(source_run, tmp_path / "b")
    assert checkpoint_steps(workdir) == [10, 20]
    config = tiny_config(**{**SOURCE, "max_iters": 30, "data.dataset": str(text_file)})
    capsys.readouterr()
    resumed = train(config, workdir, progress=False)
    assert training_starts(capsys.readouterr().err) == [20]  # it restored step 20, and trained 20 -> 30 only
    straight = rows_up_to(reference_run, 30)
    assert_same_metrics(workdir, straight, min_rows=9)  # train and val losses, step by step
    np.testing.assert_allclose(resumed["final_val_loss"], [straight[-1]["val_loss"]], rtol=1e-6)
    # Finished runs are not trained again: no program compiled, no file written, the stored summary returned.
    before = snapshot(workdir)
    again = train(config, workdir, progress=False)
    err = capsys.readouterr().err
    assert "already finished: 30 steps" in err and training_starts(err) == [] and "compiled in" not in err
    assert snapshot(workdir) == before
    assert again["final_val_loss"] == resumed["final_val_loss"]


def test_only_the_restored_step_tells_a_resume_from_a_fresh_start(source_run, reference_run, tiny_config, text_file,
                                                                  tmp_path, capsys):  # fmt: skip
    """The test of the resume tests: training is deterministic, so a loop that ignored every checkpoint and
    trained from step 0 would write the losses of an exact resume. Here the checkpoints are gone instead:
    the metrics match the uninterrupted run all the same, and only the step the session started from differs."""
    workdir = copy_run(source_run, tmp_path / "b")
    shutil.rmtree(workdir / "checkpoints")
    shutil.rmtree(workdir / "best")
    capsys.readouterr()
    train(tiny_config(**{**SOURCE, "max_iters": 30, "data.dataset": str(text_file)}), workdir, progress=False)
    assert_same_metrics(workdir, rows_up_to(reference_run, 30), min_rows=9)  # what a losses check sees
    assert training_starts(capsys.readouterr().err) == [0]  # what the resume tests check: not [20]


def test_rows_written_after_the_last_checkpoint_are_dropped_on_resume(
    trained, tiny_config, text_file, tmp_path, capsys
):
    workdir = copy_run(trained(**{**SOURCE, "max_iters": 10}), tmp_path / "run")
    assert checkpoint_steps(workdir) == [10]
    with open(workdir / "metrics.jsonl", "a") as f:  # as if killed after logging step 15, and mid-line
        f.write(json.dumps({"step": 15, "seed": 1337, "loss": 123.0}) + '\n{"step": 1')
    (workdir / "summary.json").unlink()
    capsys.readouterr()
    train(tiny_config(**{**SOURCE, "data.dataset": str(text_file)}), workdir, progress=False)
    assert training_starts(capsys.readouterr().err) == [10]  # resumed from the checkpoint, not from scratch
    rows = read_jsonl(workdir / "metrics.jsonl")
    assert all(r.get("loss") != 123.0 for r in rows)
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20]


def test_different_config_in_same_workdir_is_refused(source_run, tiny_config, text_file, tmp_path):
    workdir = copy_run(source_run, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"different config.*learning_rate"):
        train(tiny_config(**SOURCE, learning_rate=5e-3, **{"data.dataset": str(text_file)}), workdir, progress=False)


@pytest.mark.parametrize("k", [5, 3])  # 3 does not divide log_interval=5: calls split into single steps
def test_steps_per_call_gives_the_same_losses(tmp_path, k, source_run, tiny_config, text_file):
    one = json.loads((source_run / "summary.json").read_text())  # steps_per_call=1
    config = tiny_config(**SOURCE, steps_per_call=k, **{"data.dataset": str(text_file)})
    five = train(config, tmp_path / "five", progress=False)
    np.testing.assert_allclose(five["final_val_loss"], one["final_val_loss"], rtol=1e-5)
    np.testing.assert_allclose(
        [v for _, v in losses_of(tmp_path / "five")[0]], [v for _, v in losses_of(source_run)[0]], rtol=1e-5
    )


@pytest.mark.slow
def test_divergence_stops_with_message_and_keeps_last_checkpoint(tmp_path, tiny_config, small_text):
    text = small_text()
    huge = {"grad_clip": 0.0, "warmup_iters": 0, "learning_rate": 1e30, "min_lr": 1e30}
    bad = tiny_config(max_iters=40, eval_interval=10, checkpoint_every=10, **huge)
    with pytest.raises(TrainingDiverged, match=r"NaN/Inf at step \d+.*no checkpoint was saved yet"):
        train(bad, tmp_path / "bad", text=text, progress=False)
    # The case: a learning rate so high that parameters stay finite but grow huge, and
    # the logits overflow one step later. The checkpoint named must be good: finite parameters
    # and a finite loss at its next step; the state after it was checked, found bad and not saved.
    huge = tiny_config(max_iters=40, learning_rate=100.0, checkpoint_every=1)
    with pytest.raises(TrainingDiverged) as info:
        train(huge, tmp_path / "bad2", text=text, progress=False)
    message = str(info.value)
    step = int(message.split("at step ")[1].split(";")[0])
    good = int(message.split("last good checkpoint is step ")[1].split()[0])
    assert good == step - 2, message
    run = load_run(tmp_path / "bad2")
    assert run.step() == good and run.diverged == [None]
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(run.params()))
    exp = Experiment.from_config(huge, text=text)
    healthy = health_program(exp)(run.state, *exp.train_inputs)
    assert np.asarray(healthy).tolist() == [True]  # its next loss is finite


def test_best_state_is_kept_per_seed():
    zero = jnp.zeros(2, jnp.int32)
    new = TrainState(
        step=jnp.array([4, 4]), params={"w": jnp.array([[1.0, 1.0], [2.0, 2.0]])}, opt_state=(), diverged_at=zero
    )
    old = TrainState(
        step=jnp.array([2, 2]), params={"w": jnp.array([[9.0, 9.0], [8.0, 8.0]])}, opt_state=(), diverged_at=zero
    )
    merged = merge_members([False, True], new, old)
    np.testing.assert_array_equal(merged.step, [2, 4])  # seed 0 keeps its earlier best, seed 1 takes the new
    np.testing.assert_array_equal(merged.params["w"], [[9.0, 9.0], [2.0, 2.0]])


def test_killed_after_the_last_checkpoint_but_before_the_summary(source_run, tiny_config, text_file, tmp_path, capsys):
    workdir = copy_run(source_run, tmp_path / "run")
    first = json.loads((workdir / "summary.json").read_text())
    rows_before = read_jsonl(workdir / "metrics.jsonl")
    (workdir / "summary.json").unlink()  # as if killed while writing the sample
    capsys.readouterr()
    again = train(tiny_config(**SOURCE, **{"data.dataset": str(text_file)}), workdir, progress=False)
    assert training_starts(capsys.readouterr().err) == [20]  # restored at the end: nothing trained again
    assert read_jsonl(workdir / "metrics.jsonl") == rows_before  # no evaluation written twice
    assert again["final_val_loss"] == first["final_val_loss"]
