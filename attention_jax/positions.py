"""Positional encodings as pure functions.

Attention is a set operation: without positions, nothing in one attention
layer knows which of the visible tokens came first. Two ways to add them:
absolute tables added to the token embeddings (learned, or the fixed
sinusoidal table below), or relative schemes inside attention: rotary
encoding of q and k, so that q·k depends on positions only through their
difference, and ALiBi, a per-head penalty linear in the distance.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# "learned": a trainable (block_size, C) table; "sinusoidal": the fixed table below;
# "rope": rotary encoding of q and k; "alibi": linear distance biases on the logits (Press et
# al. 2022); "none": no positions at all.
POS_ENCODINGS = ("learned", "sinusoidal", "rope", "none", "alibi")


def sinusoidal_encoding(
    T: int, C: int, base: float = 10000.0, offset: int | Array = 0, positions: Array | None = None
) -> Array:
    """Fixed (T, C) table of Vaswani et al.: sin on even channels, cos on odd.

    Rows are positions offset..offset+T-1 (``offset`` may be traced: a decode step's cache index),
    or ``positions`` (..., T) given (packed sequences: ``segment_positions``) -> (..., T, C).
    """
    pos = offset + jnp.arange(T) if positions is None else positions
    pos = pos.astype(jnp.float32)[..., None]  # (..., T, 1)
    freq = base ** (-jnp.arange(0, C, 2, dtype=jnp.float32) / C)  # (ceil(C/2),)
    angles = pos * freq  # (..., T, ceil(C/2))
    table = jnp.zeros((*angles.shape[:-1], C), jnp.float32)
    table = table.at[..., 0::2].set(jnp.sin(angles))
    return table.at[..., 1::2].set(jnp.cos(angles[..., : C // 2]))


def segment_runs(segment_ids: Array) -> Array:
    """The index of each token's segment, counted along the row: (..., T) -> (..., T) int32.

    A segment is a run of equal ids, so an id that comes back later starts a new
    segment: [7, 7, 7, 2, 2, 7] -> [0, 0, 0, 1, 1, 2]. The mask and the positions
    of a packed sequence both follow these runs.
    """
    return jnp.cumsum(_segment_starts(segment_ids), axis=-1, dtype=jnp.int32) - 1


def segment_positions(segment_ids: Array) -> Array:
    """Each token's position within its segment (document) of a packed sequence: (..., T) -> (..., T) int32.

    A segment is a run of equal ids: [7, 7, 7, 2, 2, 7] -> [0, 1, 2, 0, 1, 0].
    """
    t = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    first = jax.lax.cummax(jnp.where(_segment_starts(segment_ids), t, 0), axis=segment_ids.ndim - 1)
    return t - first  # first: where each token's segment starts


def _segment_starts(segment_ids: Array) -> Array:
    """(..., T) bool: True where a segment starts (the first token, and wherever the id changes)."""
    first = jnp.ones((*segment_ids.shape[:-1], 1), bool)
    return jnp.concatenate([first, segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)


def apply_rope(x: Array, positions: Array, base: float = 10000.0) -> Array:
    """Rotary position embedding (Su et al. 2021) on the last axis of x.

    x (..., T, D) with D even, positions (T,) or broadcastable to x's (..., T). Channel i is paired with channel
    i + D/2 and the pair is rotated by angle positions * base^(-2i/D), so q·k
    depends on positions only through their difference.
    """
    D = x.shape[-1]
    half = D // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / D)  # (D/2,)
    angles = positions.astype(jnp.float32)[..., None] * freq  # (..., T, D/2)
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes m_h (Press et al. 2022, "Train Short, Test Long"), (num_heads,) float32.

    For H a power of two, the geometric sequence 2^(-8/H), 2^(-16/H), ..., 2^(-8):
    for H = 8, 1/2, 1/4, ..., 1/256. Otherwise the paper's rule: the slopes of the
    largest power of two n < H, then every other slope of 2n for the remaining heads.
    """
    geometric = lambda n: [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(n) if n == num_heads else geometric(n) + geometric(2 * n)[0::2][: num_heads - n]
    return np.asarray(slopes, np.float32)


def alibi_bias(slopes: Array, query_positions: Array, key_positions: Array) -> Array:
    """ALiBi's bias -m·|t - s|: slopes (...), positions (T,), (S,) -> (..., T, S) float32.

    Causally only s <= t is seen, where this is the paper's -m·(t - s); without a
    causal mask the distance is symmetric.
    """
    distance = jnp.abs(query_positions[:, None] - key_positions[None, :]).astype(jnp.float32)  # (T, S)
    return -jnp.asarray(slopes, jnp.float32)[..., None, None] * distance
