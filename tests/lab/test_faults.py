"""Damaged run directories: checkpoints verified and fallen back from, resumes checked before anything is
written, damaged files named in one line, strict JSON, readers that never write, good checkpoints per seed."""

from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax.lab import commands
from attention_jax.lab import rundir as rd
from attention_jax.lab.cli import EXIT_BAD_INPUT
from attention_jax.lab.experiment import Experiment
from attention_jax.lab.loop import OutputState, Progress, TrainingDiverged, save_checkpoints, train
from tests.helpers import (
    SOURCE,
    assert_one_line_error_result,
    assert_same_metrics,
    checkpoint_steps,
    copy_run,
    rows_up_to,
    run_command,
    snapshot,
    tiny_args,
    training_starts,
)

STEPS = SOURCE  # the shared source_run (tests/lab/conftest.py): a finished 20-step run, checkpoints at 10 and 20


@pytest.fixture
def straight_rows(reference_run):
    """metrics.jsonl of the same run trained to step 30 without interruption."""
    return rows_up_to(reference_run, 30)


def copy_of(source, tmp_path):
    return copy_run(source, tmp_path / "run")


def largest_data_file(checkpoint):
    return max((checkpoint / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)


def flip_bytes(path, n=400):
    raw = bytearray(path.read_bytes())
    for i in range(100, 100 + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


DAMAGE = {
    "flipped bytes": lambda ckpt: flip_bytes(largest_data_file(ckpt)),
    "truncated data file": lambda ckpt: largest_data_file(ckpt).write_bytes(largest_data_file(ckpt).read_bytes()[:999]),
    "emptied manifest.ocdbt": lambda ckpt: (ckpt / "state" / "manifest.ocdbt").write_bytes(b""),
    "emptied meta": lambda ckpt: (ckpt / "meta" / "metadata").write_bytes(b""),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    damage, source_run, straight_rows, tiny_config, text_file, tmp_path, capsys
):
    workdir = copy_of(source_run, tmp_path)
    assert checkpoint_steps(workdir) == [10, 20]
    DAMAGE[damage](workdir / rd.CHECKPOINTS / "20")
    before = snapshot(workdir)
    run = rd.load_run(workdir)  # a reader: falls back, says so, changes nothing
    assert run.step() == 10
    err = capsys.readouterr().err
    assert "note: checkpoint step 20" in err and "is damaged" in err and "using step 10 instead" in err
    assert "Traceback" not in err
    assert snapshot(workdir) == before
    # The trainer falls back too, moves the damaged one aside, and ends as if nothing had happened.
    train(tiny_config(**{**STEPS, "max_iters": 30}, **{"data.dataset": str(text_file)}), workdir, progress=False)
    assert training_starts(capsys.readouterr().err) == [10]  # from the previous checkpoint, not from scratch
    assert (workdir / rd.DAMAGED / "checkpoints_20").is_dir()
    assert sorted(p.name for p in (workdir / rd.CHECKPOINTS).iterdir()) == ["20", "30"]
    assert_same_metrics(rd.read_jsonl(workdir / rd.METRICS), straight_rows)


def test_with_no_good_checkpoint_left_both_sample_and_train_refuse_in_one_line(source_run, text_file, tmp_path, capsys):
    workdir = copy_of(source_run, tmp_path)
    flip_bytes(largest_data_file(workdir / rd.CHECKPOINTS / "20"))
    (workdir / rd.CHECKPOINTS / "10" / "state" / "manifest.ocdbt").write_bytes(b"")
    before = snapshot(workdir)
    capsys.readouterr()
    for command, argv in (
        (commands.sample, ["--workdir", str(workdir)]),
        (commands.train, tiny_args(workdir, text_file, STEPS)),
    ):
        assert command(argv) == EXIT_BAD_INPUT
        lines = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in "".join(lines), lines
        assert "no usable checkpoint in" in errors[0] and "step 20" in errors[0] and "step 10" in errors[0]
        assert snapshot(workdir) == before


def test_a_resume_without_config_json_is_refused_and_writes_nothing(source_run, text_file, tmp_path, capsys):
    """The issue's case: config.json deleted, then a resume with another width used to rewrite it."""
    workdir = copy_of(source_run, tmp_path)
    (workdir / rd.CONFIG).unlink()
    before = snapshot(workdir)
    code = commands.train(tiny_args(workdir, text_file, {**STEPS, "model.n_embd": 32}))
    assert code == EXIT_BAD_INPUT
    assert f"holds checkpoints but no {rd.CONFIG}" in capsys.readouterr().err
    assert snapshot(workdir) == before


def test_an_emptied_config_json_is_named_and_left_alone(source_run, text_file, tmp_path, capsys):
    workdir = copy_of(source_run, tmp_path)
    (workdir / rd.CONFIG).write_text("")
    before = snapshot(workdir)
    capsys.readouterr()
    for command, argv in (
        (commands.train, tiny_args(workdir, text_file, STEPS)),
        (commands.sample, ["--workdir", str(workdir)]),
    ):
        assert command(argv) == EXIT_BAD_INPUT
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{workdir / rd.CONFIG} is damaged: not valid JSON" in errors[0], errors
    assert snapshot(workdir) == before


def test_a_damaged_summary_is_named_and_written_again(source_run, tiny_config, text_file, tmp_path, capsys):
    workdir = copy_of(source_run, tmp_path)
    want = json.loads((workdir / rd.SUMMARY).read_text())
    (workdir / rd.SUMMARY).write_text('{"steps": 2')  # cut short
    train(tiny_config(**STEPS, **{"data.dataset": str(text_file)}), workdir, progress=False)
    assert f"note: {workdir / rd.SUMMARY} is damaged: not valid JSON" in capsys.readouterr().err
    again = json.loads((workdir / rd.SUMMARY).read_text())
    assert again["steps"] == 20 and again["final_val_loss"] == want["final_val_loss"]


def test_a_damaged_metrics_row_is_dropped_on_resume_with_its_line_number(
    source_run, straight_rows, tiny_config, text_file, tmp_path, capsys
):
    workdir = copy_of(source_run, tmp_path)
    lines = (workdir / rd.METRICS).read_text().splitlines(keepends=True)
    lost = json.loads(lines[2])
    lines[2] = lines[2][:15] + "\n"  # line 3 cut short
    (workdir / rd.METRICS).write_text("".join(lines))
    train(tiny_config(**{**STEPS, "max_iters": 30}, **{"data.dataset": str(text_file)}), workdir, progress=False)
    assert f"note: {workdir / rd.METRICS}: line 3 not valid JSON" in capsys.readouterr().err
    kind = lambda r: (r["step"], r["seed"], "loss" in r)
    assert_same_metrics(rd.read_jsonl(workdir / rd.METRICS), [r for r in straight_rows if kind(r) != kind(lost)])


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_every_json_file_is_strict_json(tiny_config, text_file, tmp_path, capsys):
    """max_iters=0 used to write Infinity into summary.json; NaN losses are null in metrics.jsonl."""
    config = tiny_config(max_iters=0, **{"data.dataset": str(text_file)})
    train(config, tmp_path / "zero", progress=False)
    for name in (rd.CONFIG, rd.SUMMARY, rd.DATASET, rd.TOKENIZER):
        strict_json((tmp_path / "zero" / name).read_text())
    assert strict_json((tmp_path / "zero" / rd.SUMMARY).read_text())["best_val_loss"] == [None]
    again = train(config, tmp_path / "zero", progress=False)  # "already finished" reads it back
    assert again["best_val_loss"] == [None]

    run = rd.RunDir(tmp_path / "metrics")
    run.create()
    writer = run.metrics_writer(["seed_1"])
    writer.write_many([{"step": 1, "seed": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 0.5}])
    writer.close()
    row = strict_json((run / rd.METRICS).read_text())
    assert row == {"step": 1, "seed": 1, "loss": None, "grad_norm": None, "lr": 0.5}
    (back,) = run.read_metrics()
    assert math.isnan(back["loss"]) and math.isnan(back["grad_norm"]) and back["lr"] == 0.5


def test_readers_never_create_rename_or_delete_anything(source_run, tmp_path, capsys):
    """The issue's case: sampling deleted a live trainer's checkpoint in progress (orbax's temporary folder)."""
    workdir = copy_of(source_run, tmp_path)
    in_progress = workdir / rd.CHECKPOINTS / "30.orbax-checkpoint-tmp"  # orbax's name for a save in progress
    in_progress.mkdir()
    (in_progress / "half-written").write_bytes(b"x" * 100)
    before = snapshot(workdir)
    best_step = json.loads((workdir / rd.SUMMARY).read_text())["best_step"][0]
    assert rd.load_run(workdir).step() == 20 and rd.load_run(workdir, "best").step() == best_step
    assert commands.sample(["--workdir", str(workdir), "--max_new_tokens", "5", "--prompt", "the"]) == 0
    assert snapshot(workdir) == before
    # A run without checkpoints: refused, and no empty checkpoints/ or best/ appear.
    shutil.rmtree(workdir / rd.CHECKPOINTS)
    shutil.rmtree(workdir / rd.BEST)
    before = snapshot(workdir)
    capsys.readouterr()
    assert commands.sample(["--workdir", str(workdir)]) == EXIT_BAD_INPUT
    assert "no latest checkpoint in" in capsys.readouterr().err
    assert snapshot(workdir) == before


def test_max_new_tokens_is_bounded_before_anything_is_loaded(tmp_path, capsys):
    assert commands.sample(["--workdir", str(tmp_path / "nowhere"), "--max_new_tokens", "1000000000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --max_new_tokens must be in [1, 1,000,000], got 1,000,000,000"]


@pytest.fixture
def two_seed_run(trained):
    """A tiny run of two seeds to step 10."""
    return trained(**{**STEPS, "max_iters": 10}, num_seeds=2)


@pytest.mark.slow
def test_a_diverged_seed_does_not_spoil_the_checkpoints_of_the_healthy_one(two_seed_run, tmp_path, capsys):
    workdir = copy_of(two_seed_run, tmp_path)
    state = rd.load_run(workdir).state
    # At step 15 seed 0 has blown up (NaN parameters) and seed 1 is fine; the check before saving finds it.
    poisoned = state.replace(
        step=jnp.full_like(state.step, 15), params=jax.tree_util.tree_map(lambda a: a.at[0].set(jnp.nan), state.params)
    )
    exp = Experiment.from_config(rd.load_run(workdir).config)
    p = Progress(poisoned, 15, diverged=[0, 0])
    checkpoints = rd.RunDir(workdir).checkpoints()
    best = dict(best_val_loss=[1.0, 1.0], best_step=[10, 10])
    outputs = [OutputState(rd.RunDir(workdir), [0, 1], checkpoints=checkpoints, **best)]
    try:
        save_checkpoints(exp, p, outputs, lambda s: np.asarray([False, True]))
        assert p.diverged == [16, 0]  # its next step's loss is the first non-finite one
        assert checkpoints.latest_step() == 15  # saved: seed 1 still has a use for it
        p.step = 16
        with pytest.raises(TrainingDiverged, match=r"NaN/Inf at step 16.*last good checkpoint is step 15"):
            save_checkpoints(exp, p, outputs, lambda s: np.asarray([False, False]))  # nothing saved
        assert checkpoints.latest_step() == 15
        # A seed with NaN parameters that is *not* marked diverged cannot come from save_checkpoints:
        # such a checkpoint (written here directly) is refused on restore, in favour of step 15.
        checkpoints.save_latest(
            20, poisoned, {"best": {"val_loss": [1.0] * 2, "step": [10] * 2}, "diverged": [None] * 2}
        )
    finally:
        checkpoints.close()
    capsys.readouterr()
    run = rd.load_run(workdir)
    assert run.step(0) == 15 and run.diverged == [16, None]
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(run.params(1)))
    err = capsys.readouterr().err
    assert "checkpoint step 20" in err and "non-finite parameters in seed index 0, which had not diverged" in err
    assert commands.sample(["--workdir", str(workdir), "--model_seed", "0"]) == EXIT_BAD_INPUT
    assert "model 0 of" in capsys.readouterr().err
    assert commands.sample(["--workdir", str(workdir), "--model_seed", "1", "--max_new_tokens", "5"]) == 0


@pytest.mark.slow
def test_a_changed_dataset_is_refused_before_anything_is_written(tiny_config, small_text, tmp_path):
    """The issue's cases: one character swapped for another (same vocabulary), or a new character added."""
    data = tmp_path / "data.txt"
    text = small_text()
    data.write_text(text)
    workdir = tmp_path / "run"
    train(tiny_config(**STEPS, **{"data.dataset": str(data)}), workdir, progress=False)
    before = snapshot(workdir)
    swapped = text.replace("k", "q", 1)  # "king" -> "qing": both letters stay in the text
    assert sorted(set(swapped)) == sorted(set(text))
    for new_text, pattern in (
        (swapped, r"data\.dataset=.* differs from the data the run in .* sha256 .*; use a new --workdir"),
        (text + "Z", r"vocabulary differs from the run's in .* \(added 'Z'; \d+ -> \d+ characters\)"),
    ):
        data.write_text(new_text)
        result = run_command("train", *tiny_args(workdir, data, STEPS))
        assert_one_line_error_result(result, pattern)
        assert snapshot(workdir) == before


def test_a_reader_racing_a_trainer_lists_again_and_never_says_there_is_no_checkpoint(source_run, tmp_path, monkeypatch):
    """A live trainer saving every few milliseconds can replace each checkpoint a reader listed before it reads it.
    The reader lists again; a trainer that always wins is reported as that, not as "no checkpoint yet"."""
    from attention_jax.lab.rundir.checkpoints import READ_ATTEMPTS, Checkpoints

    workdir = copy_of(source_run, tmp_path)
    real = Checkpoints._restore_step
    calls = []

    def replaced_while_reading(manager, folder, step, abstract_state, *, times):
        calls.append(step)
        if len(calls) <= times:  # as a trainer does: a newer checkpoint is saved and this one deleted meanwhile
            (folder / str(step)).rename(folder / str(step + 1))  # (the newer one: the same arrays, for the test)
            raise rd.DamagedFile("arrays unreadable: NOT_FOUND")
        return real(manager, folder, step, abstract_state)

    monkeypatch.setattr(Checkpoints, "_restore_step", staticmethod(lambda *a: replaced_while_reading(*a, times=1)))
    assert rd.load_run(workdir).step() == 20  # the arrays of step 20, read from the next listing's newest
    assert calls == [20, 21]

    calls.clear()
    monkeypatch.setattr(Checkpoints, "_restore_step", staticmethod(lambda *a: replaced_while_reading(*a, times=99)))
    with pytest.raises(rd.DamagedFile, match=rf"were replaced {READ_ATTEMPTS} times while being read.*try again"):
        rd.load_run(copy_of(source_run, tmp_path / "again"))


def test_a_checkpoint_deleted_while_the_reader_lists_them_is_listed_again(source_run, tmp_path, monkeypatch):
    """Orbax reads every checkpoint's metadata when it lists them; a live trainer that deletes one in between
    makes the listing raise FileNotFoundError (CI once saw a sample fail on it with exit 2). Listed again."""
    import errno

    import orbax.checkpoint as ocp

    workdir = copy_of(source_run, tmp_path)
    folder, real, calls = workdir / "checkpoints", ocp.CheckpointManager.__init__, []

    def deleted_while_listing(self, directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 1:  # as the trainer does: the newer one saved, the listed one deleted meanwhile
            (folder / "20").rename(folder / "21")
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(folder / "20"))
        real(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "__init__", deleted_while_listing)
    assert rd.load_run(workdir).step() == 20  # step 21's arrays are step 20's (the test renamed it)
    assert len(calls) == 3  # the latest folder twice, then the best one
