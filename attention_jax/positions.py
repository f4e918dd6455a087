"""Positional encodings as pure functions.

Attention is a set operation: without positions, nothing in one attention
layer knows which of the visible tokens came first. Two ways to add them:
absolute tables added to the token embeddings (learned, or the fixed
sinusoidal table below), or rotary encoding applied to q and k inside
attention, so that q·k depends on positions only through their difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# "learned": a trainable (block_size, C) table; "sinusoidal": the fixed table below;
# "rope": rotary encoding of q and k; "none": no positions at all.
POS_ENCODINGS = ("learned", "sinusoidal", "rope", "none")


def sinusoidal_encoding(T: int, C: int, base: float = 10000.0, offset: int | Array = 0) -> Array:
    """Fixed (T, C) table of Vaswani et al.: sin on even channels, cos on odd.

    Rows are positions offset..offset+T-1 (``offset`` may be traced: a decode step's cache index).
    """
    pos = (offset + jnp.arange(T)).astype(jnp.float32)[:, None]  # (T, 1)
    freq = base ** (-jnp.arange(0, C, 2, dtype=jnp.float32) / C)  # (ceil(C/2),)
    angles = pos * freq  # (T, ceil(C/2))
    table = jnp.zeros((T, C), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(angles))
    return table.at[:, 1::2].set(jnp.cos(angles[:, : C // 2]))


def apply_rope(x: Array, positions: Array, base: float = 10000.0) -> Array:
    """Rotary position embedding (Su et al. 2021) on the last axis of x.

    x (..., T, D) with D even, positions (T,). Channel i is paired with channel
    i + D/2 and the pair is rotated by angle positions * base^(-2i/D), so q·k
    depends on positions only through their difference.
    """
    D = x.shape[-1]
    half = D // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / D)  # (D/2,)
    angles = positions.astype(jnp.float32)[:, None] * freq  # (T, D/2)
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
