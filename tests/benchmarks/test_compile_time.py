"""python -m benchmarks.compile_time: both models compiled and timed in one run, their losses checked equal."""

from __future__ import annotations

import pytest

from benchmarks import compile_time


@pytest.mark.slow
def test_compile_time_benchmark_compiles_and_times_both_models(capsys):
    result = compile_time.main(["--n_layer", "2", "--n_embd", "16", "--n_head", "2", "--block_size", "16",
                                "--batch", "2", "--repeats", "1"])  # fmt: skip
    for name in ("unrolled", "scanned"):
        assert result[name]["compile_s"] > 0 and result[name]["step_ms"] > 0
    assert result["compile_ratio"] == pytest.approx(result["unrolled"]["compile_s"] / result["scanned"]["compile_s"])
    assert "compile time, unrolled / scanned" in capsys.readouterr().out
