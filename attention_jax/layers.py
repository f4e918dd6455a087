"""Flax Linen shells around the attention math.

Modules here create parameters and call the pure functions of
:mod:`attention_jax.attention`; they hold no math of their own beyond
projections. Shapes follow the legend in :mod:`attention_jax`.

Every module takes ``deterministic`` (True disables dropout; dropout draws
from the ``"dropout"`` RNG stream) and records attention weights with
``sow("intermediates", "attention_weights", w)`` on the dense path, so
``apply(..., mutable=["intermediates"])`` returns them without a second copy
of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention_jax import attention

if TYPE_CHECKING:  # pragma: no cover
    from attention_jax.model import ModelConfig

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# GPT-2 initialization: N(0, 0.02) everywhere. Residual output projections are
# further divided by sqrt(2 * n_layer) (see ``Block``).
default_init = nn.initializers.normal(stddev=0.02)

POS_ENCODINGS = ("learned", "sinusoidal", "rope", "none")
ATTENTION_IMPLS = ("dense", "xla", "cudnn", "blockwise")


# ---------------------------------------------------------------------------
# Positional encodings. Attention is a set operation: without these, nothing
# in a single attention layer knows which of the visible tokens came first.
# ---------------------------------------------------------------------------


def sinusoidal_encoding(T: int, C: int, base: float = 10000.0) -> Array:
    """Fixed (T, C) table of Vaswani et al.: sin on even channels, cos on odd."""
    pos = jnp.arange(T, dtype=jnp.float32)[:, None]  # (T, 1)
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
        T = x.shape[-2]
        mask = attention.causal_mask(T) if self.causal else None
        scale = attention.resolve_scale(self.scale, self.head_size)
        w = attention.attention_weights(q, k, scale=scale, mask=mask)  # (B, T, T)
        self.sow("intermediates", "attention_weights", w)
        w = nn.Dropout(self.dropout_rate)(w, deterministic=deterministic)
        return jnp.einsum("...ts,...sd->...td", w.astype(v.dtype), v)  # (B, T, D)


def _xla_attention(q, k, v, *, scale, causal, implementation):
    """jax.nn.dot_product_attention on head-major (B, H, T, D) arrays."""
    t = lambda a: jnp.swapaxes(a, -3, -2)  # (B, H, T, D) <-> (B, T, H, D)  # noqa: E731
    out = jax.nn.dot_product_attention(t(q), t(k), t(v), scale=scale, is_causal=causal, implementation=implementation)
    return t(out)


class MultiHeadAttention(nn.Module):
    """All heads in one batched einsum, then an output projection.

    (B, T, C) -> (B, T, out_features or C). Query, key and value for all heads
    come from one fused kernel of shape (C, 3, H, D), projected straight into
    the head-major layout (B, H, T, D) that the attention einsums want, so no
    transposes are needed. Equal to running ``num_heads`` ``Head``s and
    concatenating their outputs (tested with shared weights).
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
        scale = attention.resolve_scale(self.scale, D)
        if self.attention_impl == "dense":
            # Only this path materializes the weights, so only it records them and
            # applies dropout to them; the fused paths drop out residual branches only.
            T = x.shape[-2]
            mask = attention.causal_mask(T) if self.causal else None
            w = attention.attention_weights(q, k, scale=scale, mask=mask)  # (B, H, T, T)
            self.sow("intermediates", "attention_weights", w)
            w = nn.Dropout(self.dropout_rate)(w, deterministic=deterministic)
            out = jnp.einsum("bhts,bhsd->bhtd", w.astype(v.dtype), v)  # (B, H, T, D)
        elif self.attention_impl in ("xla", "cudnn"):
            out = _xla_attention(q, k, v, scale=scale, causal=self.causal, implementation=self.attention_impl)
        elif self.attention_impl == "blockwise":
            if not self.causal:
                raise ValueError("attention_impl='blockwise' supports causal attention only")
            from attention_jax.blockwise import blockwise_causal_attention

            out = blockwise_causal_attention(q, k, v, scale=scale)
        else:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}: valid choices are {ATTENTION_IMPLS}")
        w_out = self.param("proj_kernel", self.out_init, (H, D, self.out_features or C), jnp.float32)
        y = jnp.einsum("bhtd,hdc->btc", out, w_out.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("proj_bias", nn.initializers.zeros, (self.out_features or C,), jnp.float32).astype(
                self.dtype
            )
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)  # (B, T, C)


class FeedForward(nn.Module):
    """Position-wise MLP: (B, T, C) -> Dense(4C) -> GELU -> Dense(C) -> dropout.

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


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    Communication (attention) followed by computation (MLP). The residual
    stream lets gradients flow straight from the loss to every block.
    """

    config: "ModelConfig"

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        # Each block adds two residual branches; with 2*n_layer branches summed,
        # the stream's variance would grow ~linearly with depth at init. Scaling
        # the branch outputs by 1/sqrt(2*n_layer) keeps it O(1) (GPT-2).
        out_init = nn.initializers.normal(stddev=0.02 / (2 * max(cfg.n_layer, 1)) ** 0.5)
        h = nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, dtype=dtype, name="ln_attn")(x)
        x = x + MultiHeadAttention(
            num_heads=cfg.n_head,
            head_size=cfg.head_size,
            scale=cfg.attn_scale,
            dropout_rate=cfg.dropout,
            qk_norm=cfg.qk_norm,
            pos_encoding=cfg.pos_encoding,
            attention_impl=cfg.attention_impl,
            use_bias=cfg.bias,
            dtype=dtype,
            out_init=out_init,
            name="attn",
        )(h, deterministic=deterministic)
        h = nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, dtype=dtype, name="ln_mlp")(x)
        return x + FeedForward(
            hidden=4 * cfg.n_embd,
            dropout_rate=cfg.dropout,
            use_bias=cfg.bias,
            dtype=dtype,
            out_init=out_init,
            name="mlp",
        )(h, deterministic=deterministic)
