"""python -m benchmarks.recipe_quality: its statistics and the merging of saved results (no training here)."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from benchmarks import recipe_quality


@pytest.fixture(scope="module")
def rq():
    return recipe_quality


def result(rq, seeds, jax_losses, torch_losses, config="configs/x.py:cpu"):
    r = {"config": config, "steps": 10, "seeds": seeds, "target": 1.88}
    r["jax"], r["torch"] = rq._summary(jax_losses, 1.88), rq._summary(torch_losses, 1.88)
    rq.compare(r)
    return r


def test_summary_counts_the_stored_values_and_welch_t_matches_the_formula(rq):
    a, b = [1.87, 1.8800001, 1.89], [1.86, 1.875, 1.88]
    r = result(rq, [0, 1, 2], a, b)
    # 1.8800001 is stored as 1.88 (6 decimals), so it counts as at the target: a reader recounting agrees.
    assert r["jax"]["full_val_loss"] == [1.87, 1.88, 1.89]
    assert r["jax"]["at_or_below_target"] == 2 and r["torch"]["at_or_below_target"] == 3
    assert r["jax"]["sd"] == round(statistics.stdev([1.87, 1.88, 1.89]), 4)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(statistics.variance(a) / 3 + statistics.variance(b) / 3)
    assert r["welch_t"] == pytest.approx(t, abs=0.01)


def test_merge_concatenates_seeds_and_recomputes(rq):
    r1 = result(rq, [0, 1], [1.87, 1.89], [1.86, 1.88])
    r2 = result(rq, [5, 6, 7], [1.88, 1.875, 1.885], [1.87, 1.871, 1.872])
    m = rq.merge([r1, r2])
    assert m["seeds"] == [0, 1, 5, 6, 7]
    assert m["jax"]["full_val_loss"] == [1.87, 1.89, 1.88, 1.875, 1.885]
    assert m["jax"]["mean"] == round(statistics.fmean(m["jax"]["full_val_loss"]), 4)
    assert m["torch"]["at_or_below_target"] == 5 and "welch_t" in m


def test_merge_refuses_shared_seeds_and_different_recipes(rq):
    r1 = result(rq, [0, 1], [1.87, 1.89], [1.86, 1.88])
    with pytest.raises(ValueError, match="share seeds"):
        rq.merge([r1, r1])
    with pytest.raises(ValueError, match="different config"):
        rq.merge([r1, result(rq, [2, 3], [1.8, 1.9], [1.8, 1.9], config="configs/y.py")])


def test_from_json_merges_saved_files_and_bad_input_gets_one_line(rq, tmp_path, capsys):
    paths = []
    for i, seeds in enumerate(([0, 1], [2, 3])):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(result(rq, seeds, [1.87, 1.89], [1.86, 1.88])))
    assert rq.main(["--from_json", *map(str, paths), "--json", str(tmp_path / "all.json")]) == 0
    assert json.loads((tmp_path / "all.json").read_text())["seeds"] == [0, 1, 2, 3]
    assert rq.main(["--from_json", str(tmp_path / "missing.json")]) == 2
    assert rq.main(["--seeds", "1"]) == 2
    assert rq.main(["--config.seed=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
