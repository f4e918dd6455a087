"""One prepared run for a GPU machine: correctness on the device, speed, then the full recipe.

    ATTENTION_JAX_DATA_DIR=... python -m benchmarks.gpu_check --out DIR

1. Correctness: the fused attention paths ("xla", "cudnn", "blockwise") against
   the hand-written dense path on the GPU, in float32 and bfloat16; causality
   of a TransformerLM on the GPU (logits at t unchanged when tokens after t
   change).
2. Speed: the real train step of configs/shakespeare_char.py:gpu for each
   attention path and dtype, with the device's bf16 matmul FLOP/s measured in
   the same run.
3. The full shakespeare_char recipe (5000 steps) with the fastest working path:
   training seconds and final val loss.

Writes DIR/gpu_report.json and prints every figure as it goes. It never
asserts: a failing piece is recorded and the rest still runs.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def log(report, key, value):
    report[key] = value
    print(f"{key}: {json.dumps(value)}", flush=True)


def check_attention_paths(report):
    from attention_jax import MultiHeadAttention

    x = jax.random.normal(jax.random.key(0), (4, 256, 384), jnp.float32)
    for dtype in ("float32", "bfloat16"):
        dense = MultiHeadAttention(6, 64, dtype=jnp.dtype(dtype))
        params = dense.init(jax.random.key(1), x)
        ref = np.asarray(dense.apply(params, x), np.float32)
        g_ref = jax.grad(lambda p: dense.apply(p, x).astype(jnp.float32).sum())(params)
        for impl in ("xla", "cudnn", "blockwise"):
            other = MultiHeadAttention(6, 64, dtype=jnp.dtype(dtype), attention_impl=impl)
            try:
                out = np.asarray(other.apply(params, x), np.float32)
                g = jax.grad(lambda p: other.apply(p, x).astype(jnp.float32).sum())(params)
                g_err = max(
                    float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
                    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref))
                )
                value = {
                    "max_rel_err_out": float(np.max(np.abs(out - ref)) / np.max(np.abs(ref))),
                    "max_rel_err_grad": g_err,
                }
            except Exception as e:  # recorded, not fatal
                value = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(report, f"attention_{impl}_{dtype}", value)


def check_causality(report):
    from attention_jax import ModelConfig, TransformerLM

    for impl in ("dense", "cudnn"):
        cfg = ModelConfig(
            vocab_size=65, block_size=64, n_embd=128, n_head=4, n_layer=2, dtype="bfloat16", attention_impl=impl
        )
        model = TransformerLM(cfg)
        tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, 65)
        try:
            params = model.init(jax.random.key(1), tokens)
            base = model.apply(params, tokens)
            worst = 0.0
            for t in (0, 31, 62):
                changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 7) % 65)
                out = model.apply(params, changed)
                worst = max(worst, float(jnp.max(jnp.abs(out[:, : t + 1] - base[:, : t + 1]))))
            log(report, f"causality_max_change_{impl}", worst)
        except Exception as e:
            log(report, f"causality_max_change_{impl}", f"error: {type(e).__name__}: {str(e)[:300]}")


def bench_paths(report, steps):
    from attention_jax.lab.bench import benchmark_training
    from attention_jax.lab.config import apply_overrides, load_config
    from attention_jax.lab.hardware import matmul_flops_per_s

    log(report, "bf16_matmul_tflops_8192", matmul_flops_per_s(8192, dtype=jnp.bfloat16) / 1e12)
    log(report, "f32_matmul_tflops_8192", matmul_flops_per_s(8192, dtype=jnp.float32) / 1e12)
    timings = {}
    for impl in ("dense", "xla", "cudnn"):
        for dtype in ("float32", "bfloat16"):
            config = load_config("configs/shakespeare_char.py:gpu")
            apply_overrides(config, {"model.attention_impl": impl, "model.dtype": dtype})
            try:
                result = benchmark_training(config, steps=steps, warmup=1, matmul_n=4096)
                timings[f"{impl}/{dtype}"] = result["ms_per_step"]
                log(report, f"bench_{impl}_{dtype}", result)
            except Exception as e:
                log(report, f"bench_{impl}_{dtype}", f"error: {type(e).__name__}: {str(e)[:300]}")
    return timings


def full_recipe(report, impl, dtype, workdir):
    from attention_jax.lab.config import apply_overrides, load_config
    from attention_jax.lab.loop import train

    config = load_config("configs/shakespeare_char.py:gpu")
    apply_overrides(config, {"model.attention_impl": impl, "model.dtype": dtype})
    t0 = time.time()
    summary = train(config, workdir, progress=False)
    summary["wall_seconds_total"] = round(time.time() - t0, 1)
    summary["attention_impl"], summary["dtype"] = impl, dtype
    log(report, "full_recipe", summary)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    log(report, "devices", [d.device_kind for d in jax.devices()])
    log(report, "jax", jax.__version__)
    timings = {}
    for name, fn in (
        ("attention_paths", lambda: check_attention_paths(report)),
        ("causality", lambda: check_causality(report)),
        ("bench", lambda: timings.update(bench_paths(report, args.steps))),
    ):
        try:
            fn()
        except Exception:
            log(report, f"{name}_failed", traceback.format_exc()[-1500:])
        (out / "gpu_report.json").write_text(json.dumps(report, indent=2))
    if not args.skip_train:
        bf16 = {k: v for k, v in timings.items() if k.endswith("bfloat16")}
        best = min(bf16, key=bf16.get) if bf16 else "dense/bfloat16"
        impl, dtype = best.split("/")
        try:
            full_recipe(report, impl, dtype, "/tmp/gpu_recipe")
        except Exception:
            log(report, "full_recipe_failed", traceback.format_exc()[-1500:])
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
