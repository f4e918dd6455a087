"""This machine, measured or read: matmul FLOP/s, peak memory, cores, the CPU's estimated float32 peak."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops_per_s(n: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
    """FLOP/s of one jit-compiled (n, n) @ (n, n) matmul on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))
    return 2 * n**3 / _median_seconds(lambda: mm(a, b), repeats)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if platform.system() == "Darwin" else rss / 1024


def cpu_cores() -> int:
    """Cores this process may run on (XLA:CPU sizes its thread pool the same way)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key and key not in info:  # first processor's entry
                    info[key] = value.strip()
    except OSError:
        pass
    return info


def cpu_peak_flops(cores: int | None = None, cpuinfo: dict | None = None) -> tuple[float, str] | None:
    """Estimated float32 peak of the CPU: cores x FLOP/cycle/core x clock, with the assumption made.

    FLOP/cycle/core = 2 (an FMA) x float32 lanes x FMA pipes: 32 for AVX2 with
    FMA (2 pipes x 8 lanes) and for AMD Zen 4 AVX-512 (its 512-bit FMAs run on
    two 256-bit pipes); 64 for Intel AVX-512 (assumes 2 FMA units, true of
    server parts). The clock is the one /proc/cpuinfo reports, the nominal
    one: turbo is not counted, so a boosting chip can exceed this "peak".
    None where it cannot be told (not x86 Linux, no clock, no FMA).
    """
    info = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = set(info.get("flags", "").split())
    try:
        ghz = float(info["cpu MHz"]) / 1000
    except (KeyError, ValueError):
        return None
    cores = cpu_cores() if cores is None else cores
    vendor = info.get("vendor_id", "")
    if "avx512f" in flags and vendor == "AuthenticAMD":
        per_cycle, how = 32, "AVX-512 on AMD (Zen 4: 2 x 256-bit FMA pipes) = 32"
    elif "avx512f" in flags:
        per_cycle, how = 64, "AVX-512 x 2 FMA units = 64"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, how = 32, "AVX2 x 2 FMA units = 32"
    else:
        return None
    note = f"{cores} cores x {how} FLOP/cycle x {ghz:.2f} GHz (nominal clock from /proc/cpuinfo; turbo not counted)"
    return cores * per_cycle * ghz * 1e9, note


def cpu_model_name() -> str:
    return _cpuinfo().get("model name", platform.processor() or "unknown")
