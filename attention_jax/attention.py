"""Masked self-attention as pure functions over arrays.

Everything here is a plain function of arrays: no parameters, no modules, no
state. The Flax modules in :mod:`attention_jax.layers` only create parameters
and call these. Shapes follow the legend in :mod:`attention_jax` (B batch,
T query time, S key time, D head size); leading ``...`` axes are any batch
axes (batch, heads), broadcast as usual.

The picture from the lecture: T tokens are nodes of a directed graph, token t
has an edge from every token s <= t. Each token emits a query ("what am I
looking for") and a key ("what do I contain"); q·k is the affinity along an
edge; softmax over the incoming edges turns affinities into the weights of a
weighted average of the values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from attention_jax.blockwise import blockwise_causal_attention

Array = jax.Array

# Named scaling rules. A number is accepted too (see ``resolve_scale``).
SCALES: dict[str, Callable[[int], float]] = {
    "sqrt": lambda d: d**-0.5,  # Vaswani et al. 2017: keeps logit variance ~1
    "none": lambda d: 1.0,  # unscaled: logit variance grows like head_size
    "mup": lambda d: 1.0 / d,  # muP (Yang et al. 2022): 1/d, width-transferable
}


def causal_mask(T: int, S: int | None = None) -> Array:
    """Lower-triangular (T, S) boolean mask, True where query t may see key s.

    With S > T the queries are the *last* T positions of S keys (as when a
    prefix is cached), so query t sees keys s <= t + (S - T).
    """
    S = T if S is None else S
    return jnp.tril(jnp.ones((T, S), dtype=bool), k=S - T)


def resolve_scale(scale: str | float | int, head_size: int) -> float:
    """Turn a scaling rule into the number that multiplies q·kᵀ.

    ``"sqrt"`` -> head_size**-0.5, ``"none"`` -> 1.0, ``"mup"`` -> 1/head_size,
    a number -> itself.
    """
    if isinstance(scale, bool):  # bool is an int; True is never meant as a scale
        raise ValueError(f"attention scale must be one of {sorted(SCALES)} or a number, got {scale!r}")
    if isinstance(scale, (int, float)):
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"attention scale must be a positive finite number, got {scale!r}")
        return float(scale)
    if isinstance(scale, str) and scale in SCALES:
        if head_size <= 0:
            raise ValueError(f"head_size must be positive, got {head_size}")
        return float(SCALES[scale](head_size))
    raise ValueError(
        f"unknown attention scale {scale!r}: valid choices are "
        f"{', '.join(repr(s) for s in sorted(SCALES))} or a positive number"
    )


def attention_logits(q: Array, k: Array, *, scale: float) -> Array:
    """Scaled affinities q·kᵀ·scale: (..., T, D), (..., S, D) -> (..., T, S)."""
    return jnp.einsum("...td,...sd->...ts", q, k) * jnp.asarray(scale, q.dtype)


def masked_softmax(logits: Array, mask: Array | None = None) -> Array:
    """Softmax over the last axis in float32; masked entries get exactly 0.

    The fill value is the most negative *finite* float32, not -inf: a row whose
    every entry is masked would otherwise give exp(-inf - -inf) = NaN, and NaN
    poisons gradients even where the output is discarded. After the softmax the
    masked entries are set to exactly 0 (they are already ~0; this makes it
    exact, which the causality tests rely on).
    """
    logits = logits.astype(jnp.float32)
    if mask is None:
        return jax.nn.softmax(logits, axis=-1)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)


def attention_weights(q: Array, k: Array, *, scale: float, mask: Array | None = None) -> Array:
    """softmax(q·kᵀ·scale) over keys: (..., T, D), (..., S, D) -> (..., T, S) float32.

    ``mask`` (broadcastable to (..., T, S), True = keep) zeroes the weights of
    the edges it removes; every row with at least one kept entry sums to 1.
    """
    return masked_softmax(attention_logits(q, k, scale=scale), mask)


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float,
    mask: Array | None = None,
    weights_hook: Callable[[Array], Array] | None = None,
) -> Array:
    """Weighted average of values: (..., T, D), (..., S, D), (..., S, Dv) -> (..., T, Dv).

    The dense path: the (..., T, S) weights are materialized, and
    ``weights_hook`` (if given) sees them before they average the values: the
    Flax modules record them there and apply attention-weight dropout.
    """
    w = attention_weights(q, k, scale=scale, mask=mask)  # (..., T, S) float32
    if weights_hook is not None:
        w = weights_hook(w)
    return jnp.einsum("...ts,...sd->...td", w.astype(v.dtype), v)


# ---------------------------------------------------------------------------
# One dispatcher over the attention backends
# ---------------------------------------------------------------------------

# "dense": the functions above; the only backend that materializes the weights, so the
#          only one that records them and applies dropout to them.
# "xla" / "cudnn": jax.nn.dot_product_attention with that implementation (cudnn: GPU only).
# "blockwise": flash-style tiles in pure JAX (attention_jax.blockwise), causal only, O(T) memory.
ATTENTION_IMPLS = ("dense", "xla", "cudnn", "blockwise")


def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float,
    mask: Array | None = None,
    causal: bool = False,
    impl: str = "dense",
    weights_hook: Callable[[Array], Array] | None = None,
) -> Array:
    """Attention by one of ``ATTENTION_IMPLS``: (..., T, D), (..., S, D), (..., S, Dv) -> (..., T, Dv).

    ``mask`` (broadcastable to (..., T, S), True = attend) and ``causal`` (the
    lower-triangular mask) combine. ``weights_hook`` runs on the dense path only.
    """
    if impl == "dense":
        if causal:
            mask = _and(mask, causal_mask(q.shape[-2], k.shape[-2]))
        return dot_product_attention(q, k, v, scale=scale, mask=mask, weights_hook=weights_hook)
    if impl in ("xla", "cudnn"):
        if causal and q.shape[-2] != k.shape[-2]:  # jax.nn's is_causal aligns the first, not the last, query
            mask, causal = _and(mask, causal_mask(q.shape[-2], k.shape[-2])), False
        return _jax_nn_attention(q, k, v, scale=scale, mask=mask, causal=causal, implementation=impl)
    if impl == "blockwise":
        if not causal or mask is not None or q.shape[-2] != k.shape[-2]:
            raise ValueError("impl='blockwise' supports causal self-attention without a mask only")
        return blockwise_causal_attention(q, k, v, scale=scale)
    raise ValueError(f"unknown attention impl {impl!r}: valid choices are {ATTENTION_IMPLS}")


def _and(mask: Array | None, other: Array) -> Array:
    return other if mask is None else jnp.logical_and(mask, other)


def _jax_nn_attention(q, k, v, *, scale, mask, causal, implementation):
    """jax.nn.dot_product_attention on (..., T, D) arrays: leading axes become its batch, one head each."""
    *lead, T, D = q.shape
    S, Dv = k.shape[-2], v.shape[-1]
    n = math.prod(lead)
    as_bthd = lambda a, t, d: a.reshape(n, t, 1, d)  # noqa: E731  (..., t, d) -> (N, t, 1, d)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (*lead, T, S)).reshape(n, 1, T, S)
    out = jax.nn.dot_product_attention(
        as_bthd(q, T, D), as_bthd(k, S, D), as_bthd(v, S, Dv),
        scale=scale, mask=mask, is_causal=causal, implementation=implementation,
    )  # fmt: skip
    return out.reshape(*lead, T, Dv)


# ---------------------------------------------------------------------------
# The lecture's three equivalent ways for token t to average tokens 0..t.
# They are the teaching entry point: the third is attention with all
# affinities equal to zero, and real attention only replaces those zeros by
# data-dependent q·k.
# ---------------------------------------------------------------------------


def average_past_loop(x: Array) -> Array:
    """Version 1: an explicit loop over time. x (B, T, C) -> (B, T, C).

    out[b, t] = mean(x[b, :t+1]). Clear and slow: T separate reductions.
    """
    T = x.shape[-2]
    rows = [jnp.mean(x[..., : t + 1, :], axis=-2) for t in range(T)]
    return jnp.stack(rows, axis=-2)


def average_past_matmul(x: Array) -> Array:
    """Version 2: one matmul with a row-normalized lower-triangular matrix.

    W[t, s] = 1/(t+1) for s <= t, else 0; out = W @ x. x (B, T, C) -> (B, T, C).
    """
    T = x.shape[-2]
    w = jnp.tril(jnp.ones((T, T), x.dtype))
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    return jnp.einsum("ts,...sc->...tc", w, x)


def average_past_softmax(x: Array) -> Array:
    """Version 3: softmax of a zero matrix whose future is masked to -inf.

    Zero affinities everywhere means uniform weights over the visible past;
    this is attention with q·kᵀ replaced by 0. x (B, T, C) -> (B, T, C).
    """
    T = x.shape[-2]
    affinities = jnp.zeros((T, T), jnp.float32)
    affinities = jnp.where(causal_mask(T), affinities, -jnp.inf)  # every row keeps s=0: no NaN
    w = jax.nn.softmax(affinities, axis=-1).astype(x.dtype)
    return jnp.einsum("ts,...sc->...tc", w, x)
