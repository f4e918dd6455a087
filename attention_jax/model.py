"""Language models: a frozen ``ModelConfig``, ``TransformerLM`` and ``BigramLM``.

Models return logits (B, T, V) in float32; the loss lives in
:mod:`attention_jax.train`, not here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention_jax import attention
from attention_jax.layers import ATTENTION_IMPLS, POS_ENCODINGS, AddPositions, Block, default_init

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
    head_size: int | None = None  # D: defaults to n_embd // n_head; settable independently
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
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "block_size", "n_embd", "n_head"):
            positive_int(name)
        if isinstance(self.n_layer, bool) or not isinstance(self.n_layer, int) or self.n_layer < 0:
            raise ValueError(f"ModelConfig.n_layer must be a non-negative integer, got {self.n_layer!r}")
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"ModelConfig.head_size: n_embd={self.n_embd} is not divisible by "
                    f"n_head={self.n_head}; set head_size explicitly or change n_head"
                )
            object.__setattr__(self, "head_size", self.n_embd // self.n_head)
            object.__setattr__(self, "_head_size_derived", True)  # re-derived by .replace
        positive_int("head_size")
        try:
            attention.resolve_scale(self.attn_scale, self.head_size)
        except ValueError as e:
            raise ValueError(f"ModelConfig.attn_scale: {e}") from None
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(
                f"ModelConfig.pos_encoding: unknown {self.pos_encoding!r}, valid choices are {POS_ENCODINGS}"
            )
        if self.pos_encoding == "rope" and self.head_size % 2:
            raise ValueError(f"ModelConfig.head_size must be even for rope, got {self.head_size}")
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"ModelConfig.qk_norm must be True or False, got {self.qk_norm!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype: unknown {self.dtype!r}, valid choices are {DTYPES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention_impl: unknown {self.attention_impl!r}, valid choices are {ATTENTION_IMPLS}"
            )

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with ``changes``; a head_size that was derived is derived again."""
        if getattr(self, "_head_size_derived", False):
            changes.setdefault("head_size", None)
        return dataclasses.replace(self, **changes)


class TransformerLM(nn.Module):
    """GPT-style decoder: tokens (B, T) -> logits (B, T, V), with T <= block_size.

    token embedding + positions -> n_layer pre-LN Blocks -> LayerNorm -> LM head.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: Array, *, deterministic: bool = True) -> Array:
        cfg = self.config
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
            logits = nn.Dense(cfg.vocab_size, use_bias=cfg.bias, kernel_init=default_init, dtype=dtype, name="lm_head")(
                x
            )
        return logits.astype(jnp.float32)  # (B, T, V)


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


def init_params(model: nn.Module, key: Array, block_size: int = 8) -> Any:
    """Initialize a model's parameters from a dummy (1, block_size) batch."""
    return model.init(key, jnp.zeros((1, block_size), jnp.int32))["params"]


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter tree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
