"""python -m benchmarks.population: both sides measured, and the figures consistent with each other."""

from __future__ import annotations

import json

import pytest

from attention_jax.lab import population
from attention_jax.lab.config import load_config
from benchmarks import population as bench


def test_members_spread_the_learning_rate_over_a_decade_with_their_own_seeds():
    config = load_config("configs/ablate_scale.py:smoke")
    c = bench.members_config(config, 5)
    members = population.members(c)
    lrs = [m.values["learning_rate"] for m in members]
    assert len(members) == 5 and c.num_seeds == 1 and len({m.seed for m in members}) == 5
    assert lrs[0] == pytest.approx(config.learning_rate / 10**0.5) and lrs[-1] == pytest.approx(
        config.learning_rate * 10**0.5
    )
    assert [m.values["min_lr"] for m in members] == pytest.approx([lr / 10 for lr in lrs])


@pytest.mark.slow
def test_benchmark_prints_both_sides_and_consistent_ratios(text_file, capsys):
    rc = bench.main(["--config", "configs/ablate_scale.py:smoke", "--members", "2", "--steps", "4",
                     f"--config.data.dataset={text_file}"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    (row,) = result["rows"]
    pop, sep = row["population"], row["separate"]
    assert pop["finite"] and sep["finite"] and pop["steps"] == sep["steps"] == 4
    assert row["ratio_end_to_end"] == pytest.approx(sep["end_to_end_s"] / pop["end_to_end_s"], rel=0.02)
    assert row["ratio_per_step"] == pytest.approx(sep["ms_per_step"] / pop["ms_per_step"], rel=0.02)
    assert pop["models_per_hour"] == pytest.approx(3600 * 2 / pop["end_to_end_s"], rel=0.01)
    assert pop["compile_s"] < pop["end_to_end_s"] and sep["compile_s"] < sep["end_to_end_s"]
    assert any("population:" in line and "models per hour" in line for line in out)
