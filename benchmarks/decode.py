"""Decoding speed: ``generate`` with the KV cache against the full-window path, from one run.

    python -m benchmarks.decode                      # the 4-layer, n_embd 128, block 256 model; batch 1 and 8
    python -m benchmarks.decode --batch 1 8 32 --new_tokens 256 --repeats 5

Both paths run the same model, parameters, prompt (one token) and keys, in
the same process; each is compiled first (an untimed call), then the two are
timed ``--repeats`` times, interleaved round by round. tokens/s = batch x new
tokens / seconds, from the best round of each path (the least disturbed on a
shared machine) and, in parentheses, from the medians. The cached tokens are
checked equal to the full-window tokens before anything is printed (greedy,
and the text never outgrows the block, so both paths must agree exactly).
The FLOPs are the forward matmul FLOPs of the tokens each path feeds the
model (the full window feeds the whole window at every step).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp

from attention_jax.generate import generate
from attention_jax.model import ModelConfig, TransformerLM, init_params, matmul_params


def forward_flops(cfg: ModelConfig, batch: int, prompt: int, new_tokens: int, cached: bool) -> float:
    """Forward FLOPs of one ``generate`` call: 2 per matmul weight per token fed, plus q·kᵀ and w·v."""
    per_token = 2.0 * matmul_params(cfg)
    attn = lambda keys: cfg.n_layer * cfg.n_head * 2 * 2 * keys * cfg.head_dim  # per query
    total, L = 0.0, prompt + new_tokens
    W = min(cfg.block_size, L)
    if cached:  # the prompt once, then one token per step against the whole cache (masked slots included)
        total += prompt * (per_token + attn(W)) + (new_tokens - 1) * (per_token + attn(W))
    else:  # every step feeds the whole W-token window
        total += new_tokens * W * (per_token + attn(W))
    return batch * total


def time_both(model, params, prompt, new_tokens: int, repeats: int):
    """Seconds of ``repeats`` calls of each path, interleaved round by round, after one compiling call each.

    Round-robin puts both paths under the same background load (the machine is
    shared); the tokens of both paths come back for the equality check.
    """
    run = {
        path: functools.partial(
            generate, model, params, prompt, new_tokens, jax.random.key(0), 0.0, use_cache=(path == "cached")
        )
        for path in ("full", "cached")
    }
    out = {path: fn().block_until_ready() for path, fn in run.items()}
    times = {path: [] for path in run}
    for _ in range(repeats):
        for path, fn in run.items():
            t0 = time.perf_counter()
            fn().block_until_ready()
            times[path].append(time.perf_counter() - t0)
    return times, out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--vocab_size", type=int, default=65)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    cfg = ModelConfig(
        vocab_size=args.vocab_size,
        block_size=args.block_size,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_layer=args.n_layer,
    )
    model = TransformerLM(cfg)
    params = init_params(model, jax.random.key(0))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"model: {cfg.n_layer} layers, n_embd {cfg.n_embd}, {cfg.n_head} heads, block {cfg.block_size}; "
        f"{args.new_tokens} new tokens from a 1-token prompt, greedy; {args.repeats} interleaved rounds; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; load average at start {load:.2f}"
    )
    print(
        f"{'batch':>5} | {'full window tok/s':>17} | {'cached tok/s':>12} | {'speed-up':>8} | "
        f"{'(medians: full, cached, speed-up)':>36} | GFLOP full / cached"
    )
    rows = []
    for batch in args.batch:
        prompt = jnp.zeros((batch, 1), jnp.int32)
        times, out = time_both(model, params, prompt, args.new_tokens, args.repeats)
        if not bool(jnp.array_equal(out["full"], out["cached"])):
            raise SystemExit(f"error: cached and full-window tokens differ at batch {batch}")
        n = batch * args.new_tokens
        best = {path: min(ts) for path, ts in times.items()}
        median = {path: statistics.median(ts) for path, ts in times.items()}
        row = {
            "batch": batch,
            "full_tokens_per_s": n / best["full"],
            "cached_tokens_per_s": n / best["cached"],
            "speedup": best["full"] / best["cached"],
            "median_full_tokens_per_s": n / median["full"],
            "median_cached_tokens_per_s": n / median["cached"],
            "median_speedup": median["full"] / median["cached"],
            "full_gflop": forward_flops(cfg, batch, 1, args.new_tokens, cached=False) / 1e9,
            "cached_gflop": forward_flops(cfg, batch, 1, args.new_tokens, cached=True) / 1e9,
        }
        rows.append(row)
        medians = (
            f"{row['median_full_tokens_per_s']:,.0f}, {row['median_cached_tokens_per_s']:,.0f}, "
            f"{row['median_speedup']:.1f}x"
        )
        print(
            f"{batch:>5} | {row['full_tokens_per_s']:>17,.0f} | {row['cached_tokens_per_s']:>12,.0f} | "
            f"{row['speedup']:>7.1f}x | {medians:>36} | {row['full_gflop']:.1f} / {row['cached_gflop']:.2f}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
