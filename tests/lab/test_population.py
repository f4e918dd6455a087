"""Populations: members with their own values in one program, each equal to a run of its own."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from attention_jax.lab import population
from attention_jax.lab.config import ConfigError, apply_overrides, parse_override_args
from attention_jax.lab.loop import train
from attention_jax.lab.rundir import RunDir, load_run
from attention_jax.lab.sampling import sample_text
from attention_jax.lab.sweep import product, sweep
from tests.helpers import assert_same_metrics, checkpoint_steps, script_result, training_starts


def rows_of(workdir, member: int) -> list[dict]:
    rows = [r for r in RunDir(workdir).read_metrics() if r["member"] == member]
    return sorted(rows, key=lambda r: (r["step"], "val_loss" in r))


def assert_same_rows(got: list[dict], want: list[dict], rel: float = 2e-5) -> None:
    """A member's rows against a run's (its member index differs: matched by step and seed)."""
    assert_same_metrics(got, want, rel=rel, abs=rel, ids=("step", "seed"), min_rows=4)


def test_members_are_entries_times_seeds_with_the_config_filling_in(tiny_config):
    c = tiny_config(
        num_seeds=2, population=tuple(product(sweep("learning_rate", [1e-3, 3e-3]), sweep("seed", [0, 100])))
    )
    pop = population.members(c)
    assert [(m.seed, m.values) for m in pop] == [
        (0, {"learning_rate": 1e-3}), (1, {"learning_rate": 1e-3}), (100, {"learning_rate": 1e-3}),
        (101, {"learning_rate": 1e-3}), (0, {"learning_rate": 3e-3}), (1, {"learning_rate": 3e-3}),
        (100, {"learning_rate": 3e-3}), (101, {"learning_rate": 3e-3}),
    ]  # fmt: skip
    hp = population.hparams(c, pop)
    np.testing.assert_allclose(hp["learning_rate"], [1e-3] * 4 + [3e-3] * 4, rtol=1e-6)
    np.testing.assert_allclose(hp["min_lr"], [c.min_lr] * 8, rtol=1e-6)  # not varied: the config's value
    assert pop[5].label() == "learning_rate=0.003,seed=1"
    scales = population.attention_scales(tiny_config(population=({"model.attn_scale": "mup"}, {})), [
        population.Member(0, 0, {"model.attn_scale": "mup"}), population.Member(1, 0, {"model.attn_scale": "0.5"}),
        population.Member(2, 0, {})], head_dim=16)  # fmt: skip
    np.testing.assert_allclose(scales, [1 / 16, 0.5, 16**-0.5], rtol=1e-6)  # rules as numbers; the config's sqrt
    assert population.attention_scales(c, pop, head_dim=16) is None  # not varied: the model keeps its static scale
    assert [m.seed for m in population.members(tiny_config(num_seeds=3))] == [1337, 1338, 1339]  # plain run


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"model.head_size": 8}, r"'model\.head_size' is part of the compiled program"),
        ({"model.dropout": 0.1}, r"'model\.dropout' is part of the compiled program"),
        ({"batch_size": 8}, r"'batch_size' is part of the compiled program"),
        ({"max_iters": 5}, r"'max_iters' is the same for every member \(it sets the loop\)"),
        ({"learnig_rate": 1e-3}, r"population: unknown config key 'learnig_rate'; did you mean learning_rate"),
        ({"learning_rate": 1e-3, "min_lr": 1e-2}, r"population member 0 \(learning_rate=0\.001,min_lr=0\.01.*min_lr"),
    ],
)
def test_values_that_cannot_differ_between_members_are_refused_by_name(tiny_config, entry, match):
    with pytest.raises(ConfigError, match=match):
        population.check(tiny_config(population=(entry,)))


def test_population_from_the_command_line_is_a_json_list(tiny_config):
    c = apply_overrides(tiny_config(), parse_override_args(['--config.population=[{"learning_rate": 0.003}]']))
    assert c.population == ({"learning_rate": 0.003},)
    with pytest.raises(ConfigError, match=r"'population' expects a JSON list"):
        apply_overrides(tiny_config(), {"population": '{"learning_rate": 0.003}'})


@pytest.mark.slow
def test_each_member_equals_a_separate_run_with_its_values(tmp_path, tiny_config, small_text):
    """Different learning rates, schedules, weight decays, Adam betas and seeds, with dropout: one program vs one
    run each. Every optimizer value a member may set is set by one (a member's value the program ignored would
    make that member differ from its run)."""
    text = small_text(3000)
    base = dict(max_iters=8, eval_interval=4, log_interval=2, checkpoint_every=8, eval_iters=2, warmup_iters=2)
    entries = (
        {"learning_rate": 1e-3, "seed": 3},
        {"learning_rate": 4e-3, "weight_decay": 0.0, "warmup_iters": 0, "lr_decay_iters": 5, "seed": 3},
        {"learning_rate": 2e-3, "min_lr": 2e-4, "beta1": 0.7, "beta2": 0.95, "seed": 9},
        {"model.attn_scale": "none", "seed": 3},  # the attention scale a runtime number too
        {"model.attn_scale": "mup", "learning_rate": 4e-3, "z_loss": 1e-2, "seed": 9},
    )
    config = tiny_config(**base, population=entries, **{"model.dropout": 0.1})
    summary = train(config, tmp_path / "pop", text=text, progress=False)
    assert summary["members"] == [{k: v for k, v in e.items() if k != "seed"} for e in entries]
    varied = {"learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "beta1", "beta2", "z_loss"}
    assert varied == set(population.HPARAM_KEYS)
    assert {k for e in entries for k in e} == varied | {"seed", "model.attn_scale"}  # every value a member may set
    finals = []
    for i, member in enumerate(population.members(config)):
        alone = population.member_config(config, member)
        single = train(alone, tmp_path / f"alone{i}", text=text, progress=False)
        assert summary["params"] == single["params"]  # the parameters of one model, not of the population
        if "model.attn_scale" in member.values:  # sampling a member uses its own scale
            got = sample_text(load_run(tmp_path / "pop"), "the", max_new_tokens=6, temperature=0.0, member=i)
            assert got == sample_text(load_run(tmp_path / f"alone{i}"), "the", max_new_tokens=6, temperature=0.0)
        assert_same_rows(rows_of(tmp_path / "pop", i), rows_of(tmp_path / f"alone{i}", 0))
        assert summary["final_val_loss"][i] == pytest.approx(single["final_val_loss"][0], rel=2e-5)
        finals.append(single["final_val_loss"][0])
    assert len(set(finals)) == len(
        entries
    )  # the members really differ: equality above is not one run compared with itself


@pytest.mark.slow
def test_a_diverging_member_stops_alone_and_the_others_go_on(tmp_path, tiny_config, small_text):
    text = small_text(3000)
    base = dict(max_iters=12, eval_interval=4, log_interval=2, checkpoint_every=4, grad_clip=0.0, warmup_iters=0)
    entries = ({"learning_rate": 2e-3}, {"learning_rate": 1e30, "min_lr": 1e30})
    summary = train(tiny_config(**base, population=entries), tmp_path / "pop", text=text, progress=False)
    (good, bad) = summary["diverged_at"]
    assert good is None and 1 <= bad <= 2  # at lr 1e30 the first update already breaks the model
    assert summary["final_val_loss"][1] is None and summary["final_val_loss"][0] is not None
    bad_rows = rows_of(tmp_path / "pop", 1)
    assert all(set(r) == {"step", "member", "seed", "diverged_at"} for r in bad_rows if r["step"] >= bad)
    assert not [r for r in bad_rows if "val_loss" in r and r["step"] >= bad]
    # The diverged member is frozen at its last finite state: every checkpoint of the run restores finite.
    run = load_run(tmp_path / "pop")
    assert run.step(1) == 12 and all(bool(np.isfinite(x).all()) for x in jax.tree_util.tree_leaves(run.params(1)))
    # The healthy member trained exactly as it would have alone.
    train(tiny_config(**base, learning_rate=2e-3), tmp_path / "alone", text=text, progress=False)
    assert_same_rows(rows_of(tmp_path / "pop", 0), rows_of(tmp_path / "alone", 0))


@pytest.mark.slow
def test_a_population_resumes_exactly(tmp_path, tiny_config, small_text, capsys):
    text = small_text(3000)
    entries = ({"learning_rate": 1e-3}, {"learning_rate": 3e-3})
    # with the attention variants on, so that their keys go through config.json and a resume too
    variants = {"model.sinks": True, "model.window": 4, "model.logn_scale": 0.5, "model.logn_learned": True,
                "model.softcap": 20.0, "model.qk_norm": "rms", "model.pos_encoding": "alibi"}  # fmt: skip
    base = dict(eval_interval=5, checkpoint_every=5, log_interval=5, population=entries,
                **{"model.dropout": 0.1, **variants})  # fmt: skip
    straight = train(tiny_config(max_iters=15, **base), tmp_path / "a", text=text, progress=False)
    train(tiny_config(max_iters=10, **base), tmp_path / "b", text=text, progress=False)
    assert checkpoint_steps(tmp_path / "b") == [5, 10]
    capsys.readouterr()
    resumed = train(tiny_config(max_iters=15, **base), tmp_path / "b", text=text, progress=False)
    assert training_starts(capsys.readouterr().err) == [10]  # both members restored at step 10
    np.testing.assert_allclose(resumed["final_val_loss"], straight["final_val_loss"], rtol=1e-6)
    for member in (0, 1):
        assert_same_rows(rows_of(tmp_path / "b", member), rows_of(tmp_path / "a", member), rel=1e-6)


MESH_SCRIPT = """
import json, sys
import jax
from attention_jax.lab.cli import enable_compilation_cache
enable_compilation_cache()
from attention_jax.lab.config import apply_overrides, load_config
from attention_jax.lab.experiment import Experiment
from attention_jax.lab.loop import train
from attention_jax.lab.rundir import RunDir
config = load_config("configs/shakespeare_char.py:smoke")
apply_overrides(config, {"batch_size": 8, "max_iters": 6, "eval_interval": 3, "log_interval": 3, "sample_tokens": 0,
                         "model.dropout": 0.1, "population": [{"learning_rate": 1e-3}, {"learning_rate": 3e-3}]})
text = open(sys.argv[2]).read()
mesh = Experiment.from_config(config, text=text).mesh
train(config, sys.argv[1], text=text, progress=False)
print(json.dumps({"mesh": dict(mesh.shape), "rows": RunDir(sys.argv[1]).read_metrics()}))
"""


@pytest.mark.slow
def test_members_and_batch_on_a_two_dimensional_mesh_give_the_losses_of_one_device(tmp_path, text_file):
    outs = {}
    for n in (1, 4):  # 1 in this process
        outs[n] = script_result(MESH_SCRIPT, tmp_path / f"d{n}", text_file, devices=n)
    assert outs[1]["mesh"] == {"population": 1, "data": 1}
    assert outs[4]["mesh"] == {"population": 2, "data": 2}  # 2 members over 2 devices, each batch over 2
    rows1, rows4 = outs[1]["rows"], outs[4]["rows"]
    assert [(r["step"], r["member"]) for r in rows1] == [(r["step"], r["member"]) for r in rows4]
    for r1, r4 in zip(rows1, rows4):
        for key in ("loss", "train_loss", "val_loss", "grad_norm"):
            if key in r1:
                assert r4[key] == pytest.approx(r1[key], rel=2e-5, abs=1e-6), (r1, r4)
