"""The training-step benchmark: its JSON line, its figures' consistency, the hardware-peak estimate."""

from __future__ import annotations

import json

import pytest

from attention_jax.lab import hardware
from attention_jax.lab.bench import benchmark_training, format_table
from attention_jax.lab.config import load_config
from tests.helpers import SMOKE, run_command


def test_bench_prints_json_last_line(text_file):
    result = run_command(
        "bench", "--config", SMOKE, "--steps", 3, "--matmul_n", 256, f"--config.data.dataset={text_file}"
    )
    assert result.returncode == 0, result.stderr
    last = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("ms_per_step", "tokens_per_s", "model_flops_per_s", "mfu", "compile_s", "peak_rss_mb", "backend"):
        assert key in last, key
    assert last["backend"] == "cpu" and last["devices"] == 1
    assert last["ms_per_step"] > 0 and 0 < last["mfu"]
    # tokens/s is consistent with the step time it was computed from.
    assert last["tokens_per_s"] == pytest.approx(4 * 16 / (last["ms_per_step"] / 1000), rel=1e-2)


def test_given_peak_sets_the_hardware_mfu_and_no_reference_is_said(text_file):
    config = load_config(SMOKE)
    config.data.dataset = str(text_file)
    result = benchmark_training(config, steps=2, warmup=0, matmul_n=128, peak_flops=1e12)
    assert result["hardware_peak_flops_per_s"] == 1e12
    assert result["mfu_hardware"] == pytest.approx(result["model_flops_per_s"] / 1e12, abs=1e-4)  # 4 places
    assert result["reference_ms_per_step"] is None and "reference" not in format_table(result).split("MFU")[0]


@pytest.mark.parametrize(
    "vendor, flags, mhz, expected",
    [
        ("AuthenticAMD", "fma avx2 avx512f", "2600.0", 2 * 32 * 2.6e9),  # Zen 4: 512-bit FMAs on 256-bit pipes
        ("GenuineIntel", "fma avx2 avx512f", "2500.0", 2 * 64 * 2.5e9),  # 2 AVX-512 FMA units
        ("GenuineIntel", "fma avx2", "3000.0", 2 * 32 * 3.0e9),
        ("GenuineIntel", "sse4_2", "3000.0", None),  # no FMA: not estimated
    ],
)
def test_cpu_peak_flops_estimate(vendor, flags, mhz, expected):
    info = {"vendor_id": vendor, "flags": flags, "cpu MHz": mhz}
    got = hardware.cpu_peak_flops(cores=2, cpuinfo=info)
    if expected is None:
        assert got is None
    else:
        assert got[0] == pytest.approx(expected) and "nominal clock" in got[1]
    assert hardware.cpu_peak_flops(cores=2, cpuinfo={"flags": flags}) is None  # no clock: omitted
