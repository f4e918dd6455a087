"""The model: a frozen ``ModelConfig``, the transformer ``Block``, the language models, their FLOP count.

Models return logits (B, T, V) in float32. The next-token loss is the
separate function ``cross_entropy``, never computed inside a model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention_jax import attention
from attention_jax.layers import AddPositions, FeedForward, MultiHeadAttention, default_init
from attention_jax.positions import POS_ENCODINGS

Array = jax.Array
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a ``TransformerLM``. Immutable; derive variants with ``.replace``.

    Checked at construction: an impossible combination raises ``ValueError``
    naming the field, before any compute.
    """

    vocab_size: int  # V: number of distinct tokens
    block_size: int = 256  # longest context T the model accepts
    n_embd: int = 384  # C: width of the residual stream
    n_head: int = 6  # H: heads per attention layer
    n_layer: int = 6  # number of Blocks
    head_size: int | None = None  # D; None: n_embd // n_head. Settable independently of n_embd
    attn_scale: str | float = "sqrt"  # "sqrt" | "none" | "mup" | a positive number
    pos_encoding: str = "learned"  # "learned" | "sinusoidal" | "rope" | "none"
    qk_norm: bool = False  # LayerNorm on q and k before q·kᵀ
    dropout: float = 0.0  # on attention weights, residual branches
    dtype: str = "float32"  # compute dtype; params always float32
    # "dense" (hand-written; records weights, attention dropout) | "xla" | "cudnn" |
    # "blockwise" (fused or flash-style; no attention-weight dropout, no recorded weights)
    attention_impl: str = "dense"
    bias: bool = True  # biases in LayerNorms, output projections, MLP and LM head (nanoGPT: False)
    tie_embeddings: bool = False  # LM head = token embedding transposed (nanoGPT and GPT-2: True)

    def __post_init__(self):
        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "block_size", "n_embd", "n_head"):
            positive_int(name, getattr(self, name))
        if isinstance(self.n_layer, bool) or not isinstance(self.n_layer, int) or self.n_layer < 0:
            raise ValueError(f"ModelConfig.n_layer must be a non-negative integer, got {self.n_layer!r}")
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"ModelConfig.head_size: n_embd={self.n_embd} is not divisible by "
                    f"n_head={self.n_head}; set head_size explicitly or change n_head"
                )
        else:
            positive_int("head_size", self.head_size)
        try:
            attention.resolve_scale(self.attn_scale, self.head_dim)
        except ValueError as e:
            raise ValueError(f"ModelConfig.attn_scale: {e}") from None
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(
                f"ModelConfig.pos_encoding: unknown {self.pos_encoding!r}, valid choices are {POS_ENCODINGS}"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_size must be even for rope, got {self.head_dim}")
        for name in ("bias", "tie_embeddings", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype: unknown {self.dtype!r}, valid choices are {DTYPES}")
        if self.attention_impl not in attention.ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention_impl: unknown {self.attention_impl!r}, "
                f"valid choices are {attention.ATTENTION_IMPLS}"
            )

    @property
    def head_dim(self) -> int:
        """D, the head size in effect: ``head_size``, or n_embd // n_head when that is None."""
        return self.n_embd // self.n_head if self.head_size is None else self.head_size

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with ``changes`` (a head_size left None follows n_embd and n_head)."""
        return dataclasses.replace(self, **changes)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    Communication (attention) followed by computation (MLP). The residual
    stream lets gradients flow straight from the loss to every block.
    """

    model_config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        cfg = self.model_config
        dtype = jnp.dtype(cfg.dtype)
        # Each block adds two residual branches; with 2*n_layer branches summed,
        # the stream's variance would grow ~linearly with depth at init. Scaling
        # the branch outputs by 1/sqrt(2*n_layer) keeps it O(1) (GPT-2).
        out_init = nn.initializers.normal(stddev=0.02 / (2 * max(cfg.n_layer, 1)) ** 0.5)
        h = nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, dtype=dtype, name="ln_attn")(x)
        x = x + MultiHeadAttention(
            num_heads=cfg.n_head,
            head_size=cfg.head_dim,
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


class TransformerLM(nn.Module):
    """GPT-style decoder: tokens (B, T) -> logits (B, T, V), with T <= block_size.

    token embedding + positions -> n_layer pre-LN Blocks -> LayerNorm -> LM head.
    """

    model_config: ModelConfig

    @nn.compact
    def __call__(self, tokens: Array, *, deterministic: bool = True) -> Array:
        cfg = self.model_config
        T = tokens.shape[-1]
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        dtype = jnp.dtype(cfg.dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=default_init, name="token_embedding")
        x = embed(tokens)
        x = AddPositions(cfg.pos_encoding, cfg.block_size, name="positions")(x)  # (B, T, C)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic).astype(dtype)
        for i in range(cfg.n_layer):
            x = Block(cfg, name=f"block_{i}")(x, deterministic=deterministic)
        x = nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, dtype=dtype, name="ln_final")(x)
        if cfg.tie_embeddings:  # one (V, C) matrix reads tokens in and writes logits out
            logits = embed.attend(x.astype(jnp.float32))
        else:
            lm_head = nn.Dense(cfg.vocab_size, use_bias=cfg.bias, kernel_init=default_init, dtype=dtype, name="lm_head")
            logits = lm_head(x)
        return logits.astype(jnp.float32)  # (B, T, V)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward = 3x forward); see :func:`flops_per_token`."""
        return flops_per_token(self.model_config)


class BigramLM(nn.Module):
    """The lecture's baseline: the next token depends on the current one only.

    A (V, V) table of logits: row i is the distribution after token i.
    tokens (B, T) -> logits (B, T, V). No attention, no context.
    """

    vocab_size: int

    @nn.compact
    def __call__(self, tokens: Array, *, deterministic: bool = True) -> Array:
        del deterministic  # no dropout; same signature as TransformerLM
        table = nn.Embed(self.vocab_size, self.vocab_size, embedding_init=default_init, name="logits_table")
        return table(tokens).astype(jnp.float32)

    def flops_per_token(self) -> float:
        """A table lookup: no matmul FLOPs."""
        return 0.0


def token_nll(logits: Array, targets: Array) -> Array:
    """Negative log-likelihood of each target: logits (..., T, V), integer targets (..., T) -> (..., T)."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def cross_entropy(logits: Array, targets: Array) -> Array:
    """Mean next-token loss: logits (..., T, V), integer targets (..., T) -> ()."""
    return jnp.mean(token_nll(logits, targets))


def init_params(model: nn.Module, key: Array, block_size: int = 8) -> Any:
    """Initialize a model's parameters from a dummy (1, block_size) batch."""
    return model.init(key, jnp.zeros((1, block_size), jnp.int32))["params"]


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter tree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def matmul_params(model_config: ModelConfig) -> int:
    """Weights that take part in a matmul per token (no embedding lookups)."""
    cfg = model_config
    C, H, D, V, L = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.vocab_size, cfg.n_layer
    per_layer = C * 3 * H * D + H * D * C + 2 * C * 4 * C
    return L * per_layer + C * V


def flops_per_token(model_config: ModelConfig) -> float:
    """Training FLOPs per token of a TransformerLM (forward + backward = 3x forward).

    Forward: 2 FLOPs per matmul weight, plus the attention matmuls q·kᵀ and
    w·v over the full T x T block (2 * 2 * T * D per head per layer, counted
    dense as the dense kernel computes it). Embedding lookups are not FLOPs.
    """
    cfg = model_config
    attn = cfg.n_layer * cfg.n_head * 2 * 2 * cfg.block_size * cfg.head_dim
    return 3.0 * (2.0 * matmul_params(cfg) + attn)
