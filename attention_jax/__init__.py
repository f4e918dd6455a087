"""attention_jax: masked (causal) self-attention in JAX and Flax Linen.

Shape legend, used in every docstring and shape comment of the package:

    B  batch                 T  query time (sequence length)
    S  key/value time        C  channels (n_embd, residual width)
    H  heads                 D  head size
    V  vocabulary size

Math lives in pure functions (:mod:`attention_jax.attention`); Flax modules
(:mod:`attention_jax.layers`, :mod:`attention_jax.model`) are thin shells that
create parameters and call them.
"""

from attention_jax.attention import (
    attention_logits,
    attention_weights,
    average_past_loop,
    average_past_matmul,
    average_past_softmax,
    causal_mask,
    dot_product_attention,
    masked_softmax,
    resolve_scale,
)
from attention_jax.data import CharTokenizer, get_batch, load_text, split
from attention_jax.generate import generate
from attention_jax.layers import (
    AddPositions,
    Block,
    FeedForward,
    Head,
    MultiHeadAttention,
    apply_rope,
    sinusoidal_encoding,
)
from attention_jax.model import BigramLM, ModelConfig, TransformerLM, count_params, init_params

__version__ = "0.1.0"

__all__ = [
    "AddPositions",
    "BigramLM",
    "Block",
    "CharTokenizer",
    "FeedForward",
    "Head",
    "ModelConfig",
    "MultiHeadAttention",
    "TransformerLM",
    "apply_rope",
    "attention_logits",
    "attention_weights",
    "average_past_loop",
    "average_past_matmul",
    "average_past_softmax",
    "causal_mask",
    "count_params",
    "dot_product_attention",
    "generate",
    "get_batch",
    "init_params",
    "load_text",
    "masked_softmax",
    "resolve_scale",
    "sinusoidal_encoding",
    "split",
]
