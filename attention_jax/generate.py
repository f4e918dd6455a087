"""Autoregressive sampling, compiled once per (model, shapes, sampling settings).

The whole loop is one ``jax.jit``-compiled ``lax.fori_loop`` over a
fixed-shape token buffer, so generating N tokens never recompiles per token.
Two paths, the same tokens while the text fits in ``block_size``:

- **Cached** (the default for models with ``init_cache``): the prompt is
  prefilled into the model's KV cache (Flax's ``decode=True`` and ``"cache"``
  collection), then every step feeds one token and attends over the cached
  keys and values: O(1) tokens of work per step instead of O(block_size).
- **Full window** (``use_cache=False``): every step feeds the model the window
  of at most ``block_size`` tokens ending at the current position (the
  lecture's ``idx[:, -block_size:]`` crop). Kept for checking the cache.

Past ``block_size``. A cache holds at most ``block_size`` tokens, and the
model's positions (learned or sinusoidal tables, rope) and every deeper layer's
keys depend on where the window starts, so the window cannot slide one token at
a time without recomputing it. When the text outgrows the cache, the cache is
**refilled**: emptied and prefilled with the latest ``refill_to`` tokens (their
positions re-based to 0), and decoding continues one token at a time until it
is full again. So the token at position p sees the tokens since the last
refill: between ``refill_to`` and ``block_size`` of them, where the full-window
path always sees ``block_size``. ``refill_to`` defaults to ``block_size // 2``
(one prefill of block_size/2 tokens per block_size/2 new tokens);
``refill_to=block_size`` refills at every step and reproduces the full-window
path exactly, at its cost.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

Array = jax.Array


def _block_size(model: nn.Module) -> int | None:
    return getattr(getattr(model, "model_config", None), "block_size", None)


def _sample(logits: Array, key: Array, temperature: Array, top_k: int | None) -> tuple[Array, Array]:
    """The next token (B,) from logits (B, V), and the next key. Temperature 0 is argmax.

    The temperature is a runtime value (it may be traced), so a ``lax.cond``
    picks the branch: greedy decoding draws no random numbers (in a one-token
    decode step on CPU, the draw costs as much as a layer).
    """

    def sample(logits, key):
        key, sub = jax.random.split(key)
        logits = logits / temperature
        if top_k is not None:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(sub, logits, axis=-1), key

    def greedy(logits, key):
        return jnp.argmax(logits, axis=-1), key

    return jax.lax.cond(temperature > 0, sample, greedy, logits, key)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "use_cache", "refill_to"))
def _generate(model, params, tokens, key, temperature, *, max_new_tokens, top_k, use_cache, refill_to):
    B, T0 = tokens.shape
    L = T0 + max_new_tokens
    W = min(_block_size(model) or L, L)  # the longest window (and the cache's length)
    buf = jnp.zeros((B, L), tokens.dtype).at[:, :T0].set(tokens)
    write = lambda buf, nxt, pos: jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(buf.dtype), pos, axis=1)

    if not use_cache:

        def step(pos, carry):
            buf, key = carry
            # Window [start, start + W) holds positions < pos (the rest is not yet
            # written, and causality keeps it from affecting position pos - 1).
            start = jnp.clip(pos - W, 0, L - W)
            window = jax.lax.dynamic_slice_in_dim(buf, start, W, axis=1)  # (B, W)
            logits = model.apply({"params": params}, window)  # (B, W, V)
            logits = jax.lax.dynamic_index_in_dim(logits, pos - 1 - start, axis=1, keepdims=False)  # (B, V)
            nxt, key = _sample(logits, key, temperature, top_k)
            return write(buf, nxt, pos), key

        return jax.lax.fori_loop(T0, L, step, (buf, key))[0]

    empty = model.init_cache(B, W)

    def run(cache, window):
        """Feed window (B, t) to the model in decode mode: (last logits (B, V), updated cache)."""
        logits, state = model.apply({"params": params, "cache": cache}, window, decode=True, mutable=["cache"])
        return logits[:, -1], state.get("cache", {})

    def refill(buf, end, n):
        """An empty cache prefilled with tokens [end - n, end): positions re-based to 0."""
        return run(empty, jax.lax.dynamic_slice_in_dim(buf, end - n, n, axis=1))

    prefill = min(T0, W)  # a prompt longer than the cache: its last W tokens, as the full window sees them
    logits, cache = refill(buf, T0, prefill)

    # Sampling position pos gives the token that is fed next: into the cache while it has room,
    # else by a refill. That schedule is static, so it is laid out as loops with no branch in
    # them (a lax.cond carrying the cache costs a copy of it per step on CPU): feeds until the
    # cache is full, then segments of one refill and W - refill_to feeds, then a shorter one.
    def feed_step(pos, carry):
        buf, key, cache, logits = carry
        nxt, key = _sample(logits, key, temperature, top_k)
        logits, cache = run(cache, nxt[:, None].astype(buf.dtype))
        return write(buf, nxt, pos), key, cache, logits

    def refill_step(pos, carry):
        buf, key, _, logits = carry
        nxt, key = _sample(logits, key, temperature, top_k)
        buf = write(buf, nxt, pos)
        return (buf, key, *reversed(refill(buf, pos + 1, refill_to)))

    def feeds(carry, pos, n):
        return jax.lax.fori_loop(pos, pos + n, feed_step, carry) if n else carry

    def segment(pos, carry, n_feeds):
        return feeds(refill_step(pos, carry), pos + 1, n_feeds)

    steps = L - 1 - T0  # sample-and-feed steps; the last token is only sampled
    head = min(W - prefill, steps)
    per_segment = 1 + W - refill_to
    full, rest = divmod(steps - head, per_segment)
    carry = feeds((buf, key, cache, logits), T0, head)
    pos = T0 + head
    if full:
        carry = jax.lax.fori_loop(0, full, lambda i, c: segment(pos + i * per_segment, c, W - refill_to), carry)
        pos += full * per_segment
    if rest:
        carry = segment(pos, carry, rest - 1)
    buf, key, _, logits = carry
    nxt, _ = _sample(logits, key, temperature, top_k)  # the last token needs no feeding
    return write(buf, nxt, L - 1)


def generate(
    model: nn.Module,
    params: Any,
    tokens: ArrayLike,
    max_new_tokens: int,
    key: Array,
    temperature: float | ArrayLike = 1.0,
    top_k: int | None = None,
    *,
    use_cache: bool | None = None,
    refill_to: int | None = None,
) -> Array:
    """Extend ``tokens`` (B, T0) by ``max_new_tokens`` sampled tokens -> (B, T0 + max_new_tokens).

    ``temperature`` 0 is greedy (argmax); it may be a JAX scalar, traced under
    jit. ``top_k`` keeps the k most likely tokens. Deterministic for a given
    ``key``, and the same key gives the same tokens on both paths.
    ``use_cache``: None (default) uses the KV cache when the model has
    ``init_cache`` (``TransformerLM``, ``BigramLM``), False the full-window path.
    ``refill_to``: tokens kept when the text outgrows the cache (default
    block_size // 2; block_size reproduces the full-window path); see the
    module docstring.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be (B, T) with T >= 1, got shape {tokens.shape}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not isinstance(temperature, jax.core.Tracer):
        t = float(temperature)
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if any(c.__module__.startswith("flax.nnx") for c in type(model).__mro__):
        raise TypeError("generate takes a Linen model and its params; for an NNX model use attention_jax.nnx.generate")
    if not getattr(getattr(model, "model_config", None), "causal", True):
        raise ValueError("generate needs a causal model (model_config.causal=True)")
    if use_cache is None:
        use_cache = hasattr(model, "init_cache")
    elif use_cache and not hasattr(model, "init_cache"):
        raise ValueError(f"use_cache=True needs a model with init_cache; {type(model).__name__} has none")
    max_new_tokens = int(max_new_tokens)
    if max_new_tokens == 0:
        return tokens
    W = min(_block_size(model) or tokens.shape[1] + max_new_tokens, tokens.shape[1] + max_new_tokens)
    if refill_to is None:
        refill_to = max(W // 2, 1)
    elif isinstance(refill_to, bool) or not isinstance(refill_to, numbers.Integral) or not 1 <= refill_to <= W:
        raise ValueError(f"refill_to must be an integer in [1, {W}] (the cache's length), got {refill_to!r}")
    vocab = getattr(getattr(model, "model_config", None), "vocab_size", None) or getattr(model, "vocab_size", None)
    if top_k is not None and vocab is not None:
        top_k = min(int(top_k), vocab)
    return _generate(
        model,
        params,
        tokens,
        key,
        jnp.asarray(temperature, jnp.float32),
        max_new_tokens=max_new_tokens,
        top_k=None if top_k is None else int(top_k),
        use_cache=bool(use_cache),
        refill_to=int(refill_to),
    )
