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
import numpy as np
from jax.typing import DTypeLike

from attention_jax import attention
from attention_jax.layers import ACTIVATIONS, AddPositions, FeedForward, MultiHeadAttention, default_init
from attention_jax.options import AttentionOptions, OptionError, choices_doc
from attention_jax.positions import segment_positions

Array = jax.Array
DTYPES = ("float32", "bfloat16", "float16")
# ModelConfig.remat's choices: the jax.checkpoint_policies that take no arguments
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "checkpoint_dots", "checkpoint_dots_with_no_batch_dims")  # fmt: skip


def dtype_name(where: str, value: DTypeLike) -> str:
    """A compute or parameter dtype, given as a JAX dtype or its name, as one of ``DTYPES``' names."""
    try:
        name = jnp.dtype(value).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"{where}: unknown {value!r}, valid choices are {DTYPES} (names or JAX dtypes)")
    return name


# The attention options read and set flat on a ModelConfig (``cfg.attn_scale``, ``ModelConfig(qk_norm=True)``),
# as before it held an AttentionOptions, and as the experiment config's model.* keys name them:
# every option by its own name, except the scale, which is attn_scale.
ATTENTION_NAMES: dict[str, str] = {
    ("attn_scale" if name == "scale" else name): name for name in AttentionOptions.names()
}


@dataclasses.dataclass(frozen=True, init=False)
class ModelConfig:
    """Architecture of a ``TransformerLM``. Immutable; derive variants with ``.replace``.

    The attention options are one :class:`AttentionOptions`, ``attention``;
    each is also a keyword and an attribute by its flat name (``attn_scale``
    for ``attention.scale``, ``causal``, ``qk_norm``, ``pos_encoding``,
    ``attention_impl``, ...; see ``ATTENTION_NAMES``), which overrides the
    field of ``attention``: ``ModelConfig(vocab_size=65, attn_scale="none")``,
    ``cfg.replace(qk_norm=True)``. A model's positions default to a learned
    table (``pos_encoding="learned"``); everything else as AttentionOptions.

    Checked at construction: an impossible combination raises ``ValueError``
    naming the field, before any compute. Integers may be numpy integers
    (stored as ints); dtypes may be JAX dtypes (stored as their names). An
    array ``attn_scale`` must be a scalar (one scale per vmapped model).

    Choices (``dtype`` and ``param_dtype``: ``"float32"`` | ``"bfloat16"`` | ``"float16"``):
    {choices}"""

    vocab_size: int  # V: number of distinct tokens
    block_size: int = 256  # longest context T the model accepts
    n_embd: int = 384  # C: width of the residual stream
    n_head: int = 6  # H: heads per attention layer
    n_layer: int = 6  # number of Blocks
    head_size: int | None = None  # D; None: n_embd // n_head. Settable independently of n_embd
    # K kv heads per layer, dividing n_head: grouped-query attention (Ainslie et al. 2023), each kv head
    # serving n_head / K query heads; 1: multi-query (Shazeer 2019). None: n_head. The cache holds K heads.
    n_kv_head: int | None = None
    dropout: float = 0.0  # on attention weights, residual branches
    dtype: DTypeLike = "float32"  # compute dtype
    bias: bool = True  # biases in LayerNorms, output projections, MLP and LM head (nanoGPT: False)
    tie_embeddings: bool = False  # LM head = token embedding transposed (nanoGPT and GPT-2: True)
    param_dtype: DTypeLike = "float32"  # dtype the parameters are stored in
    qkv_bias: bool = False  # biases on the q, k, v projections (GPT-2: True)
    mlp_hidden: int | None = None  # the MLP's hidden width; None: 4 * n_embd
    activation: str = "gelu_tanh"  # the MLP's: "gelu_tanh" (GPT-2's gelu_new), "gelu" (exact), "relu", "silu"
    norm_epsilon: float = 1e-5  # every LayerNorm's epsilon (GPT-2: 1e-5)
    # Layer i's (from 0) attention scale divided by i + 1: transformers' GPT-2 option
    # scale_attn_by_inverse_layer_idx (from Stanford CRFM's Mistral runs); False: attn_scale in every layer.
    attn_scale_by_layer: bool = False
    # Run the n_layer blocks as one nn.scan over a stack of layers: parameters (and the decode cache) get a
    # leading "layers" axis under "blocks" (stack_layers / unstack_layers convert), one block is compiled
    # instead of n_layer. Needs every layer alike (one window, no attn_scale_by_layer).
    scan_layers: bool = False
    # Rematerialize each block in the backward pass (jax.checkpoint), keeping what this policy of
    # jax.checkpoint_policies saves (REMAT_POLICIES); None: keep every activation.
    remat: str | None = None
    # The token that ends a document in a packed stream: a call without segment_ids derives them from
    # the tokens (the token after each end starts a new document: segment_ids_from_ends). None: one stream.
    end_token_id: int | None = None
    attention: AttentionOptions = AttentionOptions(pos_encoding="learned")  # every attention layer's options

    def __init__(self, vocab_size: int, **fields: Any):
        """Fields by keyword; attention options as ``attention=`` and/or by their flat names (which win)."""
        flat = {ATTENTION_NAMES[name]: fields.pop(name) for name in list(fields) if name in ATTENTION_NAMES}
        own = {f.name: f for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(fields) - set(own))
        if unknown:
            raise TypeError(f"ModelConfig got an unexpected keyword argument {unknown[0]!r}")
        for name, f in own.items():
            object.__setattr__(self, name, fields.get(name, f.default))
        object.__setattr__(self, "vocab_size", vocab_size)
        if not isinstance(self.attention, AttentionOptions):
            raise ValueError(f"ModelConfig.attention must be an AttentionOptions, got {self.attention!r}")
        try:
            object.__setattr__(self, "attention", self.attention.replace(**flat))
        except OptionError as e:
            raise e.named("ModelConfig", _FLAT_NAME) from None
        self.__post_init__()

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # (frozen)
        for name in ("vocab_size", "block_size", "n_embd", "n_head"):
            set_(name, attention.as_int(f"ModelConfig.{name}", getattr(self, name)))
        set_("n_layer", attention.as_int("ModelConfig.n_layer", self.n_layer, minimum=0))
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"ModelConfig.head_size: n_embd={self.n_embd} is not divisible by "
                    f"n_head={self.n_head}; set head_size explicitly or change n_head"
                )
        else:
            set_("head_size", attention.as_int("ModelConfig.head_size", self.head_size))
        if self.n_kv_head is not None:
            set_("n_kv_head", attention.as_int("ModelConfig.n_kv_head", self.n_kv_head))
            if self.n_head % self.n_kv_head:
                raise ValueError(
                    f"ModelConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (each kv head serves "
                    "n_head / n_kv_head query heads)"
                )
        if self.mlp_hidden is not None:
            set_("mlp_hidden", attention.as_int("ModelConfig.mlp_hidden", self.mlp_hidden))
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            choices = tuple(ACTIVATIONS)
            raise ValueError(f"ModelConfig.activation: unknown {self.activation!r}, valid choices are {choices}")
        eps = self.norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"ModelConfig.norm_epsilon must be a number in (0, 1), got {eps!r}")
        set_("norm_epsilon", float(eps))
        if not isinstance(self.attn_scale, str) and np.ndim(self.attn_scale) != 0:
            shape = np.shape(self.attn_scale)
            raise ValueError(f"ModelConfig.attn_scale: an array scale must be a scalar, got shape {shape}")
        try:
            for i in range(max(self.n_layer, 1)):
                self.attention.layer(i).check(self.head_dim)
        except OptionError as e:
            raise e.named("ModelConfig", _FLAT_NAME) from None
        windows = self.window if isinstance(self.window, tuple) else (self.window,)
        if any(w is not None and w > self.block_size for w in windows):
            raise ValueError(
                f"ModelConfig.window={self.window!r}: a window longer than block_size={self.block_size} sees no "
                "more than the whole block; use None for full attention"
            )
        if self.end_token_id is not None:
            set_("end_token_id", attention.as_int("ModelConfig.end_token_id", self.end_token_id, minimum=0))
            if self.end_token_id >= self.vocab_size:
                raise ValueError(
                    f"ModelConfig.end_token_id={self.end_token_id} is not a token of vocab_size={self.vocab_size}"
                )
        if self.remat is not None and self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat: unknown {self.remat!r}, valid choices are None, {REMAT_POLICIES}")
        for name in ("bias", "tie_embeddings", "qkv_bias", "attn_scale_by_layer", "scan_layers"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"ModelConfig.{name} must be True or False, got {getattr(self, name)!r}")
            set_(name, bool(getattr(self, name)))
        if self.scan_layers and (isinstance(self.window, tuple) and len(set(self.window)) > 1):
            raise ValueError(
                f"ModelConfig.scan_layers: one scanned block serves every layer, but window={self.window!r} differs "
                "by layer; give one window, or scan_layers=False"
            )
        if self.scan_layers and self.attn_scale_by_layer:
            raise ValueError(
                "ModelConfig.scan_layers: one scanned block serves every layer, but attn_scale_by_layer scales each "
                "layer differently; use one or the other"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        set_("dtype", dtype_name("ModelConfig.dtype", self.dtype))
        set_("param_dtype", dtype_name("ModelConfig.param_dtype", self.param_dtype))

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields: the attention options by their flat names.
        option = ATTENTION_NAMES.get(name)
        if option is None or name == "attention":
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.attention, option)

    @classmethod
    def keywords(cls) -> tuple[str, ...]:
        """Every keyword a ModelConfig takes by a flat name: its own fields but ``attention``, then the options'."""
        return (*(f.name for f in dataclasses.fields(cls) if f.name != "attention"), *ATTENTION_NAMES)

    @property
    def head_dim(self) -> int:
        """D, the head size in effect: ``head_size``, or n_embd // n_head when that is None."""
        return self.n_embd // self.n_head if self.head_size is None else self.head_size

    @property
    def kv_heads(self) -> int:
        """K, the kv heads in effect: ``n_kv_head``, or n_head when that is None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width in effect: ``mlp_hidden``, or 4 * n_embd when that is None."""
        return 4 * self.n_embd if self.mlp_hidden is None else self.mlp_hidden

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with ``changes`` (a head_size left None follows n_embd and n_head)."""
        return dataclasses.replace(self, **changes)


_FLAT_NAME = {option: name for name, option in ATTENTION_NAMES.items()}  # "scale" -> "attn_scale"
if ModelConfig.__doc__:  # None under python -OO
    ModelConfig.__doc__ = ModelConfig.__doc__.format(choices=choices_doc().lstrip())


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)). (..., T, C) -> (..., T, C).

    Communication (attention) followed by computation (MLP). The residual
    stream lets gradients flow straight from the loss to every block. ``mask``
    (boolean, broadcastable to (..., H, T, S), True = attend) and ``bias`` go
    to the attention, combined with the causal mask when
    ``model_config.causal``; ``decode`` uses the attention's KV cache.
    """

    model_config: ModelConfig
    layer: int = 0  # which layer of the model: picks its window when model_config.window is per layer

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        segment_ids: Array | None = None,
    ) -> Array:
        cfg = self.model_config
        attn, mlp = block_options(cfg, self.layer)
        norm = lambda name: nn.LayerNorm(
            epsilon=cfg.norm_epsilon, use_bias=cfg.bias, dtype=jnp.dtype(cfg.dtype), param_dtype=cfg.param_dtype,
            name=name,
        )  # fmt: skip
        h = norm("ln_attn")(x)
        x = x + MultiHeadAttention(**attn, name="attn")(
            h, mask=mask, bias=bias, deterministic=deterministic, decode=decode, segment_ids=segment_ids
        )
        h = norm("ln_mlp")(x)
        return x + FeedForward(**mlp, name="mlp")(h, deterministic=deterministic)


class LayerStep(Block):
    """A ``Block`` as ``nn.scan`` and ``nn.remat`` take it: (x, mask, bias, segment_ids) -> (x, None), the flags
    (``deterministic``, ``decode``) fields instead of call arguments. Its parameters are a Block's."""

    deterministic: bool = True
    decode: bool = False

    def __call__(self, x, mask=None, bias=None, segment_ids=None):  # type: ignore[override]
        y = super().__call__(x, mask=mask, bias=bias, deterministic=self.deterministic, decode=self.decode,
                             segment_ids=segment_ids)  # fmt: skip
        return y, None


def blocks(cfg: ModelConfig, x, *, mask, bias, deterministic: bool, decode: bool, segment_ids):
    """The n_layer blocks of ``cfg`` on x (..., T, C): unrolled (``block_i``), or one ``nn.scan`` (``blocks``,
    each parameter and cache entry stacked on a leading layers axis); each rematerialized with ``cfg.remat``."""
    step = LayerStep
    if cfg.remat is not None:
        step = nn.remat(step, policy=getattr(jax.checkpoint_policies, cfg.remat), prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        stack = nn.scan(
            step, variable_axes={True: 0}, split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layer,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )  # fmt: skip
        x, _ = stack(cfg, deterministic=deterministic, decode=decode, name="blocks")(x, mask, bias, segment_ids)
        return x
    for i in range(cfg.n_layer):
        x, _ = step(cfg, layer=i, deterministic=deterministic, decode=decode, name=f"block_{i}")(
            x, mask, bias, segment_ids
        )
    return x


def stack_layers(params: Any, n_layer: int) -> Any:
    """An unrolled model's parameters (or cache) ``block_0`` .. ``block_{L-1}`` as a scanned model's ``blocks``,
    every leaf stacked on a leading layers axis; the rest unchanged."""
    params = dict(params)
    layers = [params.pop(f"block_{i}") for i in range(n_layer)]
    if n_layer:
        params["blocks"] = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *layers)
    return params


def unstack_layers(params: Any) -> Any:
    """The inverse of ``stack_layers``: a scanned model's ``blocks`` as ``block_0`` .. ``block_{L-1}``."""
    params = dict(params)
    stacked = params.pop("blocks", None)
    if stacked is not None:
        n_layer = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        for i in range(n_layer):
            params[f"block_{i}"] = jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], stacked)
    return params


def block_options(model_config: ModelConfig, layer: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keyword arguments of Block ``layer``'s attention and MLP, for the Linen and the NNX Block alike."""
    cfg = model_config
    # Each block adds two residual branches; with 2*n_layer branches summed,
    # the stream's variance would grow ~linearly with depth at init. Scaling
    # the branch outputs by 1/sqrt(2*n_layer) keeps it O(1) (GPT-2).
    out_init = nn.initializers.normal(stddev=0.02 / (2 * max(cfg.n_layer, 1)) ** 0.5)
    common = dict(
        dropout_rate=cfg.dropout,
        use_bias=cfg.bias,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        out_init=out_init,
    )
    options = cfg.attention.layer(layer)
    if cfg.attn_scale_by_layer:  # GPT-2's scale_attn_by_inverse_layer_idx
        options = options.replace(scale=attention.resolve_scale(options.scale, cfg.head_dim) / (layer + 1))
    attn = dict(
        num_heads=cfg.n_head, head_size=cfg.head_dim, options=options, num_kv_heads=cfg.n_kv_head,
        use_qkv_bias=cfg.qkv_bias, out_dropout_rate=cfg.dropout, **common,
    )  # fmt: skip
    return attn, dict(hidden=cfg.mlp_width, activation=cfg.activation, **common)


class TransformerLM(nn.Module):
    """GPT-style decoder: tokens (..., T) -> logits (..., T, V) float32, with T <= block_size.

    token embedding + positions -> n_layer pre-LN Blocks -> LayerNorm -> LM head.
    ``mask``/``bias`` go to every attention layer (see ``Block``). ``segment_ids``
    (integers, the tokens' shape) pack several documents into one row: each
    attends only within itself and its positions (learned, sinusoidal, rope,
    log-n) restart at 0, so its logits are those of the document alone. With
    ``model_config.end_token_id`` set, a call without ``segment_ids`` derives
    them from the tokens (``segment_ids_from_ends``); decoding does not.

    Decoding with a KV cache (Flax's convention): ``cache = model.init_cache(B,
    max_length)``, then ``model.apply({"params": params, "cache": cache},
    tokens, decode=True, mutable=["cache"])`` feeds T new tokens (a prompt, then
    one at a time) and returns (logits, {"cache": updated}). Positions continue
    from the cache index; max_length <= block_size, and running past it gives
    NaN logits (``generate`` refills the cache instead; see there).
    """

    model_config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        segment_ids: Array | None = None,
    ) -> Array:
        cfg = self.model_config
        T = tokens.shape[-1]
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        segment_ids, positions = packed_inputs(tokens, segment_ids, cfg.end_token_id, decode)
        dtype = jnp.dtype(cfg.dtype)
        embed = nn.Embed(
            cfg.vocab_size, cfg.n_embd, embedding_init=default_init, param_dtype=cfg.param_dtype, name="token_embedding"
        )
        x = embed(tokens)
        x = AddPositions(cfg.pos_encoding, cfg.block_size, param_dtype=cfg.param_dtype, name="positions")(
            x, decode=decode, positions=positions
        )  # (..., T, C)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic).astype(dtype)
        x = blocks(cfg, x, mask=mask, bias=bias, deterministic=deterministic, decode=decode, segment_ids=segment_ids)
        x = nn.LayerNorm(
            epsilon=cfg.norm_epsilon, use_bias=cfg.bias, dtype=dtype, param_dtype=cfg.param_dtype, name="ln_final"
        )(x)
        if cfg.tie_embeddings:  # one (V, C) matrix reads tokens in and writes logits out
            logits = embed.attend(x.astype(jnp.float32))
        else:
            lm_head = nn.Dense(
                cfg.vocab_size,
                use_bias=cfg.bias,
                kernel_init=default_init,
                dtype=dtype,
                param_dtype=cfg.param_dtype,
                name="lm_head",
            )
            logits = lm_head(x)
        return logits.astype(jnp.float32)  # (..., T, V)

    @nn.nowrap
    def init_cache(self, batch_size: int, max_length: int | None = None) -> Any:
        """An empty ``"cache"`` collection for ``batch_size`` sequences of up to ``max_length`` tokens.

        max_length defaults to, and may not exceed, block_size. Holds, per
        attention layer, ``cached_key`` and ``cached_value`` (B·K, max_length,
        D) in the compute dtype and ``cache_index``, plus the positions'
        ``cache_index`` for learned and sinusoidal encodings. Built from shapes
        alone: no parameter is initialized.
        """
        return empty_cache(self, batch_size, max_length or self.model_config.block_size, self.model_config.block_size)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward = 3x forward); see :func:`flops_per_token`."""
        return flops_per_token(self.model_config)


def segment_ids_from_ends(tokens: Array, end_token_id: int) -> Array:
    """Segment ids (..., T) of a packed stream: each end token closes its document, the next token opens one.

    ``[a, b, END, c, END, d]`` -> ``[0, 0, 0, 1, 1, 2]``.
    """
    ends = (tokens == end_token_id).astype(jnp.int32)
    return jnp.cumsum(ends, axis=-1) - ends


def packed_inputs(
    tokens: Array, segment_ids: Array | None, end_token_id: int | None, decode: bool
) -> tuple[Array | None, Array | None]:
    """A language model's ``(segment_ids, positions)`` for ``tokens``: each token's document and position in it.

    The ids given, else derived from ``end_token_id`` (not when decoding), else (None, None): one stream.
    Refuses, in one line, ids of another shape or a non-integer dtype, and decoding a packed sequence.
    """
    if segment_ids is None and end_token_id is not None and not decode:
        segment_ids = segment_ids_from_ends(tokens, end_token_id)
    if segment_ids is None:
        return None, None
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != tokens.shape:
        raise ValueError(f"segment_ids of shape {segment_ids.shape} must have the tokens' shape {tokens.shape}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integers (one document id per token), got dtype {segment_ids.dtype}")
    if decode:
        raise ValueError("segment_ids: packed sequences are for training and scoring; decode one document at a time")
    return segment_ids, segment_positions(segment_ids)


def empty_cache(model: nn.Module, batch_size: int, max_length: int, block_size: int | None = None) -> Any:
    """The ``"cache"`` collection that ``model.init(..., decode=True)`` on (batch_size, max_length) tokens makes."""
    batch_size = attention.as_int("batch_size", batch_size)
    max_length = attention.as_int("max_length", max_length)
    if block_size is not None and max_length > block_size:
        raise ValueError(f"max_length {max_length} exceeds block_size {block_size}")
    tokens = jnp.zeros((batch_size, max_length), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True)).get("cache", {})
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


class BigramLM(nn.Module):
    """The lecture's baseline: the next token depends on the current one only.

    A (V, V) table of logits: row i is the distribution after token i.
    tokens (..., T) -> logits (..., T, V). No attention, no context (so
    ``decode`` needs no cache: its cache is empty).
    """

    vocab_size: int

    @nn.compact
    def __call__(self, tokens: Array, *, deterministic: bool = True, decode: bool = False) -> Array:
        del deterministic, decode  # no dropout, no context; same signature as TransformerLM
        table = nn.Embed(self.vocab_size, self.vocab_size, embedding_init=default_init, name="logits_table")
        return table(tokens).astype(jnp.float32)

    @nn.nowrap
    def init_cache(self, batch_size: int, max_length: int) -> Any:
        """An empty cache: a bigram sees only the current token."""
        return empty_cache(self, batch_size, max_length)

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
    C, H, K, D, V, L = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.vocab_size, cfg.n_layer
    per_layer = C * (H + 2 * K) * D + H * D * C + 2 * C * cfg.mlp_width
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
