"""python -m benchmarks.train_step: the JAX step and the eager PyTorch twin timed side by side."""

from __future__ import annotations

import json

import pytest

from attention_jax.lab.bench import benchmark_training, format_table
from attention_jax.lab.config import load_config
from benchmarks import train_step
from tests.helpers import SMOKE


def test_benchmark_times_jax_and_torch_side_by_side(text_file):
    c = load_config(SMOKE)
    c.steps_per_call = 2
    c.data.dataset = str(text_file)
    result = benchmark_training(c, steps=4, warmup=1, matmul_n=128, reference=train_step.torch_reference(None))
    assert result["steps_per_call"] == 2 and result["measured_steps"] == 4
    if result["reference_ms_per_step"] is None:  # torch not installed: skipped with a reason
        assert "torch" in result["reference_skipped"]
    else:
        assert result["reference"] == "PyTorch" and result["reference_ms_per_step"] > 0
        ratio = result["ms_per_step"] / result["reference_ms_per_step"]
        assert result["jax_over_reference"] == pytest.approx(ratio, rel=1e-2, abs=1e-3)  # rounded to 3 places
        assert "JAX / PyTorch" in format_table(result)


@pytest.mark.slow
def test_no_torch_flag_and_k_seeds_say_why_there_is_no_comparison(text_file, capsys):
    assert train_step.main(["--config", SMOKE, "--steps", "2", "--warmup", "0", "--matmul_n", "64", "--no-torch",
                            f"--config.data.dataset={text_file}"]) == 0  # fmt: skip
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["reference_ms_per_step"] is None and "--no-torch" in last["reference_skipped"]
    c = load_config(SMOKE)
    c.num_seeds = 2
    c.data.dataset = str(text_file)
    result = benchmark_training(c, steps=1, warmup=0, matmul_n=64, reference=train_step.torch_reference(None))
    assert result["reference_ms_per_step"] is None and "2 models" in result["reference_skipped"]
    assert "PyTorch reference trains one" in format_table(result)
