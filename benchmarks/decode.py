"""Decoding speed: ``generate`` with the KV cache against the full-window path, from one run.

    python -m benchmarks.decode                      # the 4-layer, n_embd 128, block 256 model; batch 1 and 8
    python -m benchmarks.decode --batch 1 8 32 --new_tokens 256 --repeats 5
    python -m benchmarks.decode --layouts            # the cache flat (B·H, S, D), as kept, against batch first

Both paths run the same model, parameters, prompt (one token) and keys, in
the same process; each is compiled first (an untimed call), then the two are
timed ``--repeats`` times, interleaved round by round. tokens/s = batch x new
tokens / seconds, from the best round of each path (the least disturbed on a
shared machine) and, in parentheses, from the medians. The cached tokens are
checked equal to the full-window tokens before anything is printed (greedy,
and the text never outgrows the block, so both paths must agree exactly).
The FLOPs are the forward matmul FLOPs of the tokens each path feeds the
model (the full window feeds the whole window at every step).

``--layouts`` times the cached decode loop twice instead, with the cache in
the flat (B·H, S, D) layout the modules keep and batch first (B, H, S, D)
(``attention_heads`` takes both, through the same code): same model, tokens
checked equal, rounds interleaved; the ratio is batch first's tokens/s over flat's.
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


def time_interleaved(run: dict, repeats: int):
    """Seconds of ``repeats`` calls of each of ``run``'s functions, interleaved round by round, after one compiling
    call each, and their first outputs.

    Round-robin puts every side under the same background load (the machine is
    shared); the outputs come back for the equality check.
    """
    out = {name: fn().block_until_ready() for name, fn in run.items()}
    times = {name: [] for name in run}
    for _ in range(repeats):
        for name, fn in run.items():
            t0 = time.perf_counter()
            fn().block_until_ready()
            times[name].append(time.perf_counter() - t0)
    return times, out


def time_both(model, params, prompt, new_tokens: int, repeats: int):
    """``time_interleaved`` of ``generate`` with the full window and with the KV cache."""
    run = {
        path: functools.partial(
            generate, model, params, prompt, new_tokens, jax.random.key(0), 0.0, use_cache=(path == "cached")
        )
        for path in ("full", "cached")
    }
    return time_interleaved(run, repeats)


def greedy_loop(model, new_tokens: int):
    """A jitted greedy decode loop over a given cache: (params, cache, first tokens (B, 1)) -> tokens (B, new)."""

    def run(params, cache, tok):
        def step(carry, _):
            cache, tok = carry
            logits, state = model.apply({"params": params, "cache": cache}, tok, decode=True, mutable=["cache"])
            tok = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
            return (state["cache"], tok), tok[:, 0]

        _, toks = jax.lax.scan(step, (cache, tok), None, length=new_tokens)
        return toks.T

    return jax.jit(run)


def batch_first_cache(cache, batch: int):
    """The cache with every cached_key / cached_value (B·H, S, D) as (B, H, S, D)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a: a.reshape(batch, -1, *a.shape[-2:]) if "cached_" in jax.tree_util.keystr(path) else a, cache
    )


def time_layouts(model, params, batch: int, new_tokens: int, repeats: int):
    """``time_interleaved`` of the cached greedy loop with each cache layout."""
    loop = greedy_loop(model, new_tokens)
    cache = model.init_cache(batch, model.model_config.block_size)
    caches = {"flat": cache, "batch first": batch_first_cache(cache, batch)}
    tok = jnp.zeros((batch, 1), jnp.int32)
    return time_interleaved({name: functools.partial(loop, params, c, tok) for name, c in caches.items()}, repeats)


def layouts(model, params, args) -> list[dict]:
    print(f"{'batch':>5} | {'flat tok/s':>10} | {'batch first tok/s':>17} | {'ratio':>6} | (medians: ratio)")
    rows = []
    for batch in args.batch:
        times, out = time_layouts(model, params, batch, args.new_tokens, args.repeats)
        if not bool(jnp.array_equal(out["batch first"], out["flat"])):
            raise SystemExit(f"error: the two cache layouts decode different tokens at batch {batch}")
        n = batch * args.new_tokens
        best = {name: min(ts) for name, ts in times.items()}
        median = {name: statistics.median(ts) for name, ts in times.items()}
        row = {
            "batch": batch,
            "flat_tokens_per_s": n / best["flat"],
            "batch_first_tokens_per_s": n / best["batch first"],
            "ratio": best["flat"] / best["batch first"],
            "median_ratio": median["flat"] / median["batch first"],
        }
        rows.append(row)
        print(f"{batch:>5} | {row['flat_tokens_per_s']:>10,.0f} | {row['batch_first_tokens_per_s']:>17,.0f} | "
              f"{row['ratio']:>5.2f}x | {row['median_ratio']:.2f}x", flush=True)  # fmt: skip
    return rows


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
    parser.add_argument("--layouts", action="store_true", help="the cache batch first against flat, cached loop")
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
    if args.layouts:
        return layouts(model, params, args)
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
