"""attention_jax: masked (causal) self-attention in JAX and Flax (Linen here; NNX twins in ``attention_jax.nnx``).

Shape legend, used in every docstring and shape comment of the package:

    B  batch                 T  query time (sequence length)
    S  key/value time        C  channels (n_embd, residual width)
    H  heads                 D  head size
    V  vocabulary size

The core depends on jax, flax and numpy only. Math lives in pure functions
(:mod:`attention_jax.attention`, :mod:`attention_jax.positions`,
:mod:`attention_jax.blockwise`, :mod:`attention_jax.stats`); Flax modules
(:mod:`attention_jax.layers`, :mod:`attention_jax.model`, and their NNX twins in
:mod:`attention_jax.nnx`, imported explicitly because flax.nnx loads optax) are
thin shells that create parameters and call them; :mod:`attention_jax.convert`
loads Hugging Face GPT-2 checkpoints into them and writes them back. The experiment toolkit,
:mod:`attention_jax.lab`, is an install extra (``attention_jax[experiments]``)
and is never imported from here.
"""

from attention_jax import convert
from attention_jax.attention import (
    ATTENTION_IMPLS,
    attend,
    attention_logits,
    attention_weights,
    average_past_loop,
    average_past_matmul,
    average_past_softmax,
    causal_mask,
    dot_product_attention,
    masked_softmax,
    padding_mask,
    resolve_scale,
)
from attention_jax.blockwise import blockwise_causal_attention
from attention_jax.data import CharTokenizer, get_batch, load_text, split
from attention_jax.flax_api import MultiHeadDotProductAttention, SelfAttention
from attention_jax.generate import generate
from attention_jax.layers import AddPositions, FeedForward, Head, MultiHeadAttention
from attention_jax.model import (
    BigramLM,
    Block,
    ModelConfig,
    TransformerLM,
    count_params,
    cross_entropy,
    flops_per_token,
    init_params,
)
from attention_jax.options import AttentionOptions
from attention_jax.positions import POS_ENCODINGS, apply_rope, sinusoidal_encoding

__version__ = "0.2.0"

__all__ = [
    "ATTENTION_IMPLS",
    "POS_ENCODINGS",
    "AddPositions",
    "AttentionOptions",
    "BigramLM",
    "Block",
    "CharTokenizer",
    "FeedForward",
    "Head",
    "ModelConfig",
    "MultiHeadAttention",
    "MultiHeadDotProductAttention",
    "SelfAttention",
    "TransformerLM",
    "apply_rope",
    "attend",
    "attention_logits",
    "attention_weights",
    "average_past_loop",
    "average_past_matmul",
    "average_past_softmax",
    "blockwise_causal_attention",
    "convert",
    "causal_mask",
    "count_params",
    "cross_entropy",
    "dot_product_attention",
    "flops_per_token",
    "generate",
    "get_batch",
    "init_params",
    "load_text",
    "masked_softmax",
    "padding_mask",
    "resolve_scale",
    "sinusoidal_encoding",
    "split",
]
