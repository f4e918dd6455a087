"""Autoregressive sampling, compiled once per (model, shapes, sampling settings).

The whole loop is one ``jax.jit``-compiled ``lax.fori_loop`` over a
fixed-shape token buffer, so generating N tokens never recompiles per token.
Each step feeds the model a window of at most ``block_size`` tokens ending at
the current position (the lecture's ``idx[:, -block_size:]`` crop).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _block_size(model: nn.Module) -> int | None:
    return getattr(getattr(model, "model_config", None), "block_size", None)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k"))
def _generate(model, params, tokens, key, *, max_new_tokens, temperature, top_k):
    B, T0 = tokens.shape
    L = T0 + max_new_tokens
    block = _block_size(model) or L
    W = min(block, L)  # window length fed to the model at every step
    buf = jnp.zeros((B, L), tokens.dtype).at[:, :T0].set(tokens)

    def step(pos, carry):
        buf, key = carry
        # Window [start, start + W) holds positions < pos (the rest is not yet
        # written, and causality keeps it from affecting position pos - 1).
        start = jnp.clip(pos - W, 0, L - W)
        window = jax.lax.dynamic_slice_in_dim(buf, start, W, axis=1)  # (B, W)
        logits = model.apply({"params": params}, window)  # (B, W, V)
        logits = jax.lax.dynamic_index_in_dim(logits, pos - 1 - start, axis=1, keepdims=False)  # (B, V)
        key, sub = jax.random.split(key)
        if temperature == 0:
            nxt = jnp.argmax(logits, axis=-1)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            nxt = jax.random.categorical(sub, logits, axis=-1)
        buf = jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(buf.dtype), pos, axis=1)
        return buf, key

    buf, _ = jax.lax.fori_loop(T0, L, step, (buf, key))
    return buf


def generate(
    model: nn.Module,
    params: Any,
    tokens: Array,
    max_new_tokens: int,
    key: Array,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> Array:
    """Extend ``tokens`` (B, T0) by ``max_new_tokens`` sampled tokens -> (B, T0 + max_new_tokens).

    ``temperature`` 0 is greedy (argmax); ``top_k`` keeps the k most likely
    tokens. Deterministic for a given ``key``.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be (B, T) with T >= 1, got shape {tokens.shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if max_new_tokens == 0:
        return tokens
    vocab = getattr(getattr(model, "model_config", None), "vocab_size", None) or getattr(model, "vocab_size", None)
    if top_k is not None and vocab is not None:
        top_k = min(int(top_k), vocab)
    return _generate(
        model,
        params,
        tokens,
        key,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=None if top_k is None else int(top_k),
    )
