"""One attention layer against Flax's and jax.nn's, timed side by side in one run.

    python -m benchmarks.attention_layers                  # B 8, T 256, C 128, 4 heads, causal, float32
    python -m benchmarks.attention_layers --repeats 7 --json layers.json

Two measurements, each the best of ``--repeats`` timed calls after a compiling one, the
calls of a measurement interleaved round by round (see ``race``):

- ``train``: forward + backward (gradients w.r.t. the input and every
  parameter) of one causal self-attention layer with its projections, at (B, T,
  C): ``attention_jax.MultiHeadAttention`` ("dense" and "xla" paths), its NNX
  twin, ``flax.linen.MultiHeadDotProductAttention`` and
  ``flax.nnx.MultiHeadAttention`` (both with ``nn.make_causal_mask``); and the
  attention core alone on (B, H, T, D): ``attention_jax.attend`` against
  ``jax.nn.dot_product_attention(is_causal=True)``.
- ``decode``: one layer's KV-cache decoding, ``--steps`` one-token steps in a
  ``lax.fori_loop`` against a cache of ``--cache`` slots, batch 1 and
  ``--batch``: ours (Linen), Flax Linen's (``decode=True``) and Flax NNX's
  (``init_cache``). jax.nn.dot_product_attention has no cache.

All with the same weights where the parameter layouts allow (Flax's are
separate q/k/v kernels; the timing does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import attention
from attention_jax import nnx as ajx
from attention_jax.layers import MultiHeadAttention


def race(calls: dict[str, tuple], repeats: int) -> dict[str, float]:
    """Milliseconds per call, each the best of ``repeats``, the calls interleaved round by round.

    ``calls`` maps a row name to (function, *args). Each function is compiled by
    one untimed call first. Round-robin timing puts every row under the same
    background load (the machine is shared), and the best of several rounds is
    the least disturbed one.
    """
    for fn, *args in calls.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, *args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * min(ts) for name, ts in times.items()}


def linen_train_step(module, params, x, **kwargs):
    loss = lambda p, x: jnp.sum(module.apply({"params": p}, x, **kwargs) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1))), params, x


def nnx_train_step(model, x, **kwargs):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # gradients w.r.t. the parameters only

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x, **kwargs) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), params, x


def train_rows(B: int, T: int, C: int, H: int, repeats: int) -> dict[str, float]:
    D = C // H
    key = jax.random.key(0)
    x = jax.random.normal(key, (B, T, C))
    causal = nn.make_causal_mask(jnp.ones((B, T)))  # (B, 1, T, T)
    calls = {}
    for impl in ("dense", "xla"):
        ours = MultiHeadAttention(H, D, attention_impl=impl)
        calls[f"attention_jax MultiHeadAttention ({impl})"] = linen_train_step(ours, ours.init(key, x)["params"], x)
    twin = ajx.FusedMultiHeadAttention(C, H, D, rngs=nnx.Rngs(0))
    calls["attention_jax.nnx MultiHeadAttention (dense)"] = nnx_train_step(twin, x)
    flax_linen = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=C)
    fl_params = flax_linen.init(key, x, mask=causal)["params"]
    calls["flax.linen.MultiHeadDotProductAttention"] = linen_train_step(flax_linen, fl_params, x, mask=causal)
    flax_nnx = nnx.MultiHeadAttention(num_heads=H, in_features=C, decode=False, rngs=nnx.Rngs(0))
    calls["flax.nnx.MultiHeadAttention"] = nnx_train_step(flax_nnx, x, mask=causal)

    q, k, v = (jax.random.normal(jax.random.key(i), (B, H, T, D)) for i in (1, 2, 3))
    core = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))
    for impl in ("dense", "xla"):
        f = lambda q, k, v, impl=impl: attention.attend(q, k, v, scale=D**-0.5, causal=True, impl=impl)
        calls[f"core: attention_jax.attend ({impl})"] = (core(f), q, k, v)
    bthd = lambda a: jnp.swapaxes(a, 1, 2)  # jax.nn wants (B, T, H, D)
    f = lambda q, k, v: jax.nn.dot_product_attention(bthd(q), bthd(k), bthd(v), is_causal=True)
    calls["core: jax.nn.dot_product_attention"] = (core(f), q, k, v)
    return race(calls, repeats)


def linen_decode_loop(module: nn.Module, steps: int):
    """A jitted loop of ``steps`` one-token decode calls of a Linen layer, feeding each output back in."""

    @jax.jit
    def loop(variables, x):
        def step(_, carry):
            cache, y = carry
            y, state = module.apply({"params": variables["params"], "cache": cache}, y, mutable=["cache"])
            return state["cache"], y

        return jax.lax.fori_loop(0, steps, step, (variables["cache"], x))[1]

    return loop


def decode_rows(B: int, S: int, C: int, H: int, steps: int, repeats: int) -> dict[str, float]:
    """Microseconds per one-token step of one layer with a KV cache of S slots."""
    D = C // H
    key = jax.random.key(0)
    x = jax.random.normal(key, (B, 1, C))

    # Both Linen layers follow Flax's convention: init on (B, S, C) sizes the cache, steps append.
    ours = MultiHeadAttention(H, D, decode=True)
    flax_linen = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=C, decode=True)
    flax_nnx = nnx.MultiHeadAttention(num_heads=H, in_features=C, decode=True, rngs=nnx.Rngs(0))
    flax_nnx.init_cache((B, S, C))
    graphdef, state = nnx.split(flax_nnx)

    @jax.jit
    def flax_nnx_loop(state, x):
        def step(_, carry):
            state, y = carry
            model = nnx.merge(graphdef, state)
            y = model(y)
            return nnx.state(model), y

        return jax.lax.fori_loop(0, steps, step, (state, x))[1]

    calls = {
        "attention_jax MultiHeadAttention": (linen_decode_loop(ours, steps), ours.init(key, jnp.zeros((B, S, C))), x),
        "flax.linen.MultiHeadDotProductAttention": (
            linen_decode_loop(flax_linen, steps),
            flax_linen.init(key, jnp.zeros((B, S, C))),
            x,
        ),
        "flax.nnx.MultiHeadAttention": (flax_nnx_loop, state, x),
    }
    return {name: 1e3 * ms / steps for name, ms in race(calls, repeats).items()}  # us per step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=256)
    parser.add_argument("--C", type=int, default=128)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--cache", type=int, default=256)
    parser.add_argument("--steps", type=int, default=255)
    parser.add_argument("--batch", type=int, default=8, help="the larger decode batch (the other is 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; float32; best of {args.repeats}, interleaved; "
        f"load average at start {load:.2f}"
    )
    result = {"load_average": load, "train_ms": train_rows(args.B, args.T, args.C, args.H, args.repeats)}
    print(f"\nforward+backward, B={args.B} T={args.T} C={args.C} H={args.H}, causal: ms")
    for name, ms in result["train_ms"].items():
        print(f"  {name:<48} {ms:9.2f}")
    result["decode_us_per_step"] = {}
    for batch in (1, args.batch):
        rows = decode_rows(batch, args.cache, args.C, args.H, args.steps, args.repeats)
        result["decode_us_per_step"][str(batch)] = rows
        print(f"\ndecode, one layer, cache {args.cache}, batch {batch}: us per one-token step")
        for name, us in rows.items():
            print(f"  {name:<48} {us:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
