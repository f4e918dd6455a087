"""Flax Linen shells around the attention math.

Modules here create parameters and call the pure functions of
:mod:`attention_jax.attention` and :mod:`attention_jax.positions`; they hold
no math of their own beyond projections. Shapes follow the legend in
:mod:`attention_jax`.

Every module takes ``deterministic`` (True disables dropout; dropout draws
from the ``"dropout"`` RNG stream) and, on the dense attention path, records
the attention weights with ``sow("intermediates", "attention_weights", w)``,
so ``apply(..., mutable=["intermediates"])`` returns them without a second
copy of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention_jax import attention
from attention_jax.positions import apply_rope, sinusoidal_encoding

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# GPT-2 initialization: N(0, 0.02) everywhere. Residual output projections are
# further divided by sqrt(2 * n_layer) (see ``model.Block``).
default_init = nn.initializers.normal(stddev=0.02)


class AddPositions(nn.Module):
    """Adds an absolute positional encoding to token embeddings (B, T, C).

    ``"learned"``: a trainable (max_len, C) table; ``"sinusoidal"``: the fixed
    table; ``"rope"`` and ``"none"``: nothing here (rope acts inside attention).
    """

    kind: str
    max_len: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        T, C = x.shape[-2:]
        if self.kind == "learned":
            table = self.param("embedding", default_init, (self.max_len, C), jnp.float32)
            return x + table[:T].astype(x.dtype)
        if self.kind == "sinusoidal":
            return x + sinusoidal_encoding(T, C).astype(x.dtype)
        return x


def _prepare_qk(q: Array, k: Array, *, qk_norm: bool, pos_encoding: str):
    """Optional QK-LayerNorm then optional rotary encoding. q, k (..., T, D)."""
    if qk_norm:
        # QK-LayerNorm (Dehghani et al. 2023; Wortsman et al. 2023) bounds the
        # logits' scale regardless of the projections' growth.
        q = nn.LayerNorm(epsilon=1e-5, dtype=q.dtype, name="query_norm")(q)
        k = nn.LayerNorm(epsilon=1e-5, dtype=k.dtype, name="key_norm")(k)
    if pos_encoding == "rope":
        positions = jnp.arange(q.shape[-2])
        q, k = apply_rope(q, positions), apply_rope(k, positions)
    return q, k


def _dense_weights_hook(module: nn.Module, dropout_rate: float, deterministic: bool):
    """What the dense path does with the weights: record them, then dropout on them."""

    def hook(w: Array) -> Array:
        module.sow("intermediates", "attention_weights", w)
        return nn.Dropout(dropout_rate)(w, deterministic=deterministic)

    return hook


# ---------------------------------------------------------------------------
# Attention modules
# ---------------------------------------------------------------------------


class Head(nn.Module):
    """One head of self-attention: (B, T, C) -> (B, T, head_size).

    The lecture's ``Head``: bias-free ``key``, ``query``, ``value`` projections,
    a causal mask, softmax, dropout on the weights, weighted sum of values.
    """

    head_size: int
    scale: str | float = "sqrt"
    causal: bool = True
    dropout_rate: float = 0.0
    qk_norm: bool = False
    pos_encoding: str = "none"  # only "rope" acts here
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_init

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        dense = lambda name: nn.Dense(  # noqa: E731
            self.head_size, use_bias=False, kernel_init=self.kernel_init, dtype=self.dtype, name=name
        )
        k = dense("key")(x)  # (B, T, D)
        q = dense("query")(x)  # (B, T, D)
        v = dense("value")(x)  # (B, T, D)
        q, k = _prepare_qk(q, k, qk_norm=self.qk_norm, pos_encoding=self.pos_encoding)
        return attention.attend(
            q,
            k,
            v,
            scale=attention.resolve_scale(self.scale, self.head_size),
            causal=self.causal,
            weights_hook=_dense_weights_hook(self, self.dropout_rate, deterministic),
        )  # (B, T, D)


class MultiHeadAttention(nn.Module):
    """All heads in one batched einsum, then an output projection.

    (B, T, C) -> (B, T, out_features or C). Query, key and value for all heads
    come from one fused kernel of shape (C, 3, H, D), projected straight into
    the head-major layout (B, H, T, D) that the attention einsums want, so no
    transposes are needed. Equal to running ``num_heads`` ``Head``s and
    concatenating their outputs (tested with shared weights).
    ``attention_impl`` is one of ``attention.ATTENTION_IMPLS``; only
    ``"dense"`` records the weights and applies dropout to them (the others
    drop out the output only).
    """

    num_heads: int
    head_size: int
    scale: str | float = "sqrt"
    causal: bool = True
    dropout_rate: float = 0.0
    qk_norm: bool = False
    pos_encoding: str = "none"
    attention_impl: str = "dense"
    out_features: int | None = None
    use_bias: bool = True  # bias of the output projection
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_init
    out_init: Initializer = default_init

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        C = x.shape[-1]
        H, D = self.num_heads, self.head_size
        w_qkv = self.param("qkv_kernel", self.kernel_init, (C, 3, H, D), jnp.float32)
        qkv = jnp.einsum("btc,cnhd->nbhtd", x.astype(self.dtype), w_qkv.astype(self.dtype))
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, H, T, D)
        q, k = _prepare_qk(q, k, qk_norm=self.qk_norm, pos_encoding=self.pos_encoding)
        out = attention.attend(
            q,
            k,
            v,
            scale=attention.resolve_scale(self.scale, D),
            causal=self.causal,
            impl=self.attention_impl,
            weights_hook=_dense_weights_hook(self, self.dropout_rate, deterministic),
        )  # (B, H, T, D)
        w_out = self.param("proj_kernel", self.out_init, (H, D, self.out_features or C), jnp.float32)
        y = jnp.einsum("bhtd,hdc->btc", out, w_out.astype(self.dtype))
        if self.use_bias:
            bias = self.param("proj_bias", nn.initializers.zeros, (self.out_features or C,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)  # (B, T, C)


class FeedForward(nn.Module):
    """Position-wise MLP: (B, T, C) -> Dense(hidden) -> GELU -> Dense(C) -> dropout.

    This is where each token "thinks" about what it gathered by attention.
    """

    hidden: int
    dropout_rate: float = 0.0
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    out_init: Initializer = default_init

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        C = x.shape[-1]
        h = nn.Dense(self.hidden, use_bias=self.use_bias, kernel_init=default_init, dtype=self.dtype, name="fc")(x)
        h = nn.gelu(h)
        y = nn.Dense(C, use_bias=self.use_bias, kernel_init=self.out_init, dtype=self.dtype, name="proj")(h)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
