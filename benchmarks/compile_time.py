"""Compile time of a deep model, its blocks unrolled against one ``nn.scan`` (``ModelConfig.scan_layers``).

    python -m benchmarks.compile_time                  # 12 layers, n_embd 128, 4 heads, block 256, batch 8
    python -m benchmarks.compile_time --n_layer 24 --repeats 3

Each round lowers and compiles a fresh forward+backward program (the loss's
gradient) of each model, interleaved, with JAX's persistent compilation cache
off, and then times one step of each compiled program; the parameters of the
two are the same numbers (``stack_layers``) and their losses are checked
equal before anything is printed. Best of ``--repeats`` rounds, medians in
parentheses.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax.model import ModelConfig, TransformerLM, cross_entropy, init_params, stack_layers


def loss_fn(model):
    def loss(params, tokens):
        return cross_entropy(model.apply({"params": params}, tokens[:, :-1]), tokens[:, 1:])

    return jax.value_and_grad(loss)


def compile_seconds(model, params, tokens) -> tuple[float, object]:
    t0 = time.perf_counter()
    compiled = jax.jit(loss_fn(model)).lower(params, tokens).compile()
    return time.perf_counter() - t0, compiled


def step_seconds(compiled, params, tokens) -> float:
    jax.block_until_ready(compiled(params, tokens))
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, tokens))
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cached = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # every round compiles for real
    try:
        return run(args)
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)


def run(args) -> dict:
    cfg = ModelConfig(vocab_size=65, block_size=args.block_size, n_embd=args.n_embd, n_head=args.n_head,
                      n_layer=args.n_layer)  # fmt: skip
    unrolled = TransformerLM(cfg)
    params = init_params(unrolled, jax.random.key(0))
    models = {"unrolled": (unrolled, params),
              "scanned": (TransformerLM(cfg.replace(scan_layers=True)), stack_layers(params, cfg.n_layer))}  # fmt: skip
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 65, (args.batch, args.block_size + 1)), jnp.int32)
    compile_s = {name: [] for name in models}
    step_s = {name: [] for name in models}
    losses = {}
    for _ in range(args.repeats):
        for name, (model, p) in models.items():
            seconds, compiled = compile_seconds(model, p, tokens)
            compile_s[name].append(seconds)
            step_s[name].append(step_seconds(compiled, p, tokens))
            losses[name] = float(compiled(p, tokens)[0])
    if not np.isclose(losses["unrolled"], losses["scanned"], rtol=1e-5):
        raise SystemExit(f"error: the two models' losses differ: {losses}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{cfg.n_layer} layers, n_embd {cfg.n_embd}, {cfg.n_head} heads, T {cfg.block_size}, batch {args.batch}; "
          f"forward+backward; {args.repeats} interleaved rounds; jax {jax.__version__} on {jax.devices()[0].platform}; "
          f"load average {load:.2f}")  # fmt: skip
    print(f"{'':>9} | {'compile s (median)':>18} | {'step ms (median)':>16}")
    result = {}
    for name in models:
        c, s = compile_s[name], step_s[name]
        result[name] = {"compile_s": min(c), "median_compile_s": statistics.median(c), "step_ms": 1e3 * min(s),
                        "median_step_ms": 1e3 * statistics.median(s)}  # fmt: skip
        r = result[name]
        print(f"{name:>9} | {r['compile_s']:>7.2f} ({r['median_compile_s']:.2f}) s | "
              f"{r['step_ms']:>7.1f} ({r['median_step_ms']:.1f}) ms")  # fmt: skip
    ratio = result["unrolled"]["compile_s"] / result["scanned"]["compile_s"]
    print(f"compile time, unrolled / scanned: {ratio:.2f}x; loss {losses['scanned']:.6f} both")
    return {**result, "compile_ratio": ratio}


if __name__ == "__main__":
    main()
