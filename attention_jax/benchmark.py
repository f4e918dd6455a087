"""Honest timing of the training step: compiled, warmed up, synchronized, side by side.

Every figure comes from this process in this run: the step time of the real
compiled train step (median over calls after warm-up), and the matmul FLOP/s
of this machine measured in the same run, so the MFU is not a guess.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections


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


def benchmark_training(config: ml_collections.ConfigDict, steps: int = 30, warmup: int = 3, matmul_n: int = 2048):
    """Time ``steps`` optimizer steps of the real train step of ``config``."""
    from attention_jax.train import Trainer

    trainer = Trainer.from_config(config)
    state = trainer.init_state()
    per_call = config.steps_per_call
    t0 = time.perf_counter()
    step = trainer.compile_train(per_call).lower(state).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, out = step(state)
    jax.block_until_ready(out)
    calls = max(1, -(-steps // per_call))
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        state, out = step(state)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    s_per_step = statistics.median(times) / per_call
    flops_step = trainer.flops_per_step()
    mm = matmul_flops_per_s(matmul_n)
    model_flops = flops_step / s_per_step
    return {
        "config": f"{config.model.n_layer}L {config.model.n_head}H C{config.model.n_embd} "
        f"T{config.model.block_size} B{config.batch_size}",
        "ms_per_step": round(1000 * s_per_step, 3),
        "tokens_per_s": round(trainer.tokens_per_step / s_per_step, 1),
        "gflop_per_step": round(flops_step / 1e9, 3),
        "model_flops_per_s": round(model_flops, 1),
        "matmul_flops_per_s": round(mm, 1),
        "mfu": round(model_flops / mm, 4),
        "compile_s": round(compile_s, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "steps_per_call": per_call,
        "measured_steps": calls * per_call,
        "jax": jax.__version__,
    }


def format_table(result: dict) -> str:
    rows = [
        ("model", result["config"]),
        ("backend", f"{result['backend']} ({result['device_kind']}) x{result['devices']}"),
        ("step time", f"{result['ms_per_step']:.2f} ms (median of {result['measured_steps']} steps)"),
        ("throughput", f"{result['tokens_per_s']:,.0f} tokens/s"),
        ("model FLOP/step", f"{result['gflop_per_step']:.2f} GFLOP"),
        ("model FLOP/s", f"{result['model_flops_per_s'] / 1e9:.1f} GFLOP/s"),
        ("matmul FLOP/s", f"{result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (measured now)"),
        ("MFU", f"{100 * result['mfu']:.1f}% of measured matmul speed"),
        ("compile", f"{result['compile_s']:.1f} s"),
        ("peak RSS", f"{result['peak_rss_mb']:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
