"""Flax Linen shells around the attention math.

Modules here create parameters and call the pure functions of
:mod:`attention_jax.attention` and :mod:`attention_jax.positions`; they hold
no math of their own beyond projections. Shapes follow the legend in
:mod:`attention_jax`.

Every module takes ``deterministic`` (True disables dropout; dropout draws
from the ``"dropout"`` RNG stream): a layer with dropout needs it given, as
Flax's do (``required_deterministic``); ``Block`` and ``TransformerLM``
default to True (evaluation). On the dense attention path each records
the attention weights with ``sow("intermediates", "attention_weights", w)``,
and on every path the queries and keys as attention takes them (``"queries"``,
``"keys"``: after rope and log-n), so ``apply(..., mutable=["intermediates"])``
returns them without a second copy of the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from attention_jax import attention
from attention_jax.attention import ScaleLike
from attention_jax.options import KEYWORDS, AttentionOptions, choices_doc, from_keywords
from attention_jax.positions import POS_ENCODINGS, sinusoidal_encoding

Array = jax.Array
Initializer = Callable[..., Array]

# GPT-2 initialization: N(0, 0.02) everywhere. Residual output projections are
# further divided by sqrt(2 * n_layer) (see ``model.Block``).
default_init = nn.initializers.normal(stddev=0.02)


def flax_style_init(init: Initializer, inputs: int = 1) -> Initializer:
    """``init`` applied to a projection kernel as Flax's ``DenseGeneral`` applies it: to the flat (inputs, outputs)
    matrix, so fan-in and fan-out are a projection's (C and H·D for a query kernel (C, H, D); H·D and C for an
    output kernel (H, D, C)). A stacked kernel (C, n, H, D) (``qkv_kernel``, ``kv_kernel``) is n projections, each
    drawn on its own: a variance-scaling init gives each Flax's numbers, not those of one (C, 3, H, D) tensor."""

    def draw(key, shape, dtype=jnp.float32):
        if inputs == 1 and len(shape) == 4:  # (C, n, H, D): n stacked projections
            C, n, H, D = shape
            keys = jax.random.split(key, n)
            return jnp.stack([init(k, (C, H * D), dtype).reshape(C, H, D) for k in keys], axis=1)
        flat = (math.prod(shape[:inputs]), math.prod(shape[inputs:]))
        return init(key, flat, dtype).reshape(shape)

    return draw


def check_call(where: str, *, inputs_kv: Array | None, decode: bool, pos_encoding: str, causal: bool = False) -> None:
    """What a call may not combine: cross-attention with a causal mask, rope, ALiBi or the decode cache."""
    if inputs_kv is None:
        return
    if pos_encoding in ("rope", "alibi"):
        raise ValueError(
            f"{where}: {pos_encoding} relates queries and keys by their positions in one sequence; "
            "cross-attention (inputs_kv) relates two sequences, so use pos_encoding='none' there"
        )
    if decode:
        raise ValueError(
            f"{where}: decode caches self-attention keys; for cross-attention pass the same inputs_kv "
            "at every step without decode"
        )
    if causal:  # the default of this package's layers, and a silent mistake for cross-attention
        raise ValueError(
            f"{where}: causal=True (the default here) masks keys by their position in the query's sequence, "
            "and cross-attention's keys (inputs_kv) are another sequence; build the layer with causal=False"
        )


def positions_offset(module: nn.Module, T: int, decode: bool) -> Array | int:
    """Where the T new positions start: 0, or (decode) the ``cache_index`` this module keeps in ``"cache"``.

    The index is created, as Flax's attention does, by the first decode call
    (``init`` or ``TransformerLM.init_cache``), which leaves it at 0; every later
    decode call advances it by T.
    """
    if not decode:
        return 0
    initialized = module.has_variable("cache", "cache_index")
    index = module.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
        return 0
    start = index.value
    index.value = start + T
    return start


class AddPositions(nn.Module):
    """Adds an absolute positional encoding to token embeddings (..., T, C).

    ``kind``, one of ``POS_ENCODINGS``: ``"learned"`` (a trainable (max_len, C)
    table), ``"sinusoidal"`` (the fixed table), ``"rope"`` and ``"none"``
    (nothing here: rope acts inside attention). With ``decode=True`` the
    positions continue from a ``cache_index`` in the ``"cache"`` collection.
    """

    kind: str
    max_len: int
    param_dtype: DTypeLike = jnp.float32

    def __post_init__(self):
        attention.check_choice("AddPositions.kind", self.kind, POS_ENCODINGS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, *, decode: bool = False, positions: Array | None = None) -> Array:
        """``positions`` (..., T) integers: each token's own position (packed sequences restart them)."""
        T, C = x.shape[-2:]
        if self.kind not in ("learned", "sinusoidal"):
            return x
        start = positions_offset(self, T, decode)
        if self.kind == "learned":
            table = self.param("embedding", default_init, (self.max_len, C), self.param_dtype)
            if positions is not None:
                return x + table[positions].astype(x.dtype)
            rows = jax.lax.dynamic_slice_in_dim(table, start, T) if decode else table[:T]
            return x + rows.astype(x.dtype)
        return x + sinusoidal_encoding(T, C, offset=start, positions=positions).astype(x.dtype)


def _qk_norms(module: nn.Module, q: Array, k: Array, param_dtype: DTypeLike) -> tuple[Array, Array]:
    """``options.qk_norm`` on q and k (..., T, D): bounds the logits' scale regardless of the
    projections' growth (Dehghani et al. 2023; Wortsman et al. 2023). See ``qk_norm_layer``."""
    options = module.options
    norm = lambda name: qk_norm_layer(
        options, nn.LayerNorm, nn.RMSNorm, dtype=q.dtype, param_dtype=param_dtype, name=name
    )
    return norm("query_norm")(q), norm("key_norm")(k)


def qk_norm_layer(options: AttentionOptions, layer_norm: Callable, rms_norm: Callable, **kwargs: Any) -> Any:
    """The q/k norm ``options`` ask for, built by the Linen or NNX norm classes given.

    LayerNorm epsilon 1e-5 (as the model's own LayerNorms), RMSNorm 1e-6 (Flax's default);
    ``qk_norm_gain=False`` drops the learned gain (and LayerNorm's offset).
    """
    gain = options.qk_norm_gain
    if options.qk_norm == "rms":
        return rms_norm(epsilon=1e-6, use_scale=gain, **kwargs)
    return layer_norm(epsilon=1e-5, use_scale=gain, use_bias=gain, **kwargs)


def required_deterministic(where: str, deterministic: bool | None, *rates: float) -> bool:
    """``deterministic`` as a layer with these dropout ``rates`` needs it: given (True or False) when any rate is
    above 0, as Flax requires it (never silently off); without dropout, None means True."""
    if deterministic is None:
        if any(rate > 0 for rate in rates):
            raise ValueError(
                f"{where}: dropout is on (rate {max(rates)}), so pass deterministic=False to train with it or "
                "deterministic=True to evaluate"
            )
        return True
    return deterministic


def _dense_weights_hook(module: nn.Module, dropout_rate: float, deterministic: bool):
    """What the dense path does with the weights: record them, then dropout on them."""

    def hook(w: Array) -> Array:
        module.sow("intermediates", "attention_weights", w)
        return nn.Dropout(dropout_rate)(w, deterministic=deterministic)

    return hook


def _cache(module: nn.Module, k: Array, v: Array):
    """The decode cache in the ``"cache"`` collection: (cached_key, cached_value, cache_index), or None.

    Flax's convention: the first decode call (``init``) creates zeros shaped like
    its keys, so the input's length is the cache's max length; it attends as
    usual and leaves the cache empty (index 0). Layout (N, S, D): N = batch x heads
    (``attention.cache_shape``).
    """
    initialized = module.has_variable("cache", "cached_key")
    window = module.options.window  # a window layer keeps at most that many keys
    ck = module.variable("cache", "cached_key", jnp.zeros, attention.cache_shape(k, window), k.dtype)
    cv = module.variable("cache", "cached_value", jnp.zeros, attention.cache_shape(v, window), v.dtype)
    ci = module.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    return (ck, cv, ci) if initialized else None


def _attend_with_cache(
    module: nn.Module,
    q,
    k,
    v,
    *,
    num_heads: int | None,
    decode: bool,
    mask,
    bias,
    deterministic: bool,
    segment_ids=None,
):
    """``attention.attention_heads`` with the cache read from and written to ``module``'s variables.

    The parameters some options add (``AttentionOptions.option_params``: sinks, a learned
    log-n scale) are created here, float32 whatever ``param_dtype``: they are a few logits.
    """
    variables = _cache(module, k, v) if decode else None
    cache = None if variables is None else tuple(var.value for var in variables)
    hook = _dense_weights_hook(module, module.dropout_rate, deterministic)
    params = {
        name: module.param(name, nn.initializers.constant(value), shape, jnp.float32)
        for name, (shape, value) in module.options.option_params(num_heads).items()
    }
    core = module.options.attention_kwargs(module.head_size, num_heads, params)

    def record_qk(q, k):  # a sow costs nothing unless apply(..., mutable=["intermediates"]) asks for it
        module.sow("intermediates", "queries", q)
        module.sow("intermediates", "keys", k)

    out, new = attention.attention_heads(
        q, k, v, mask=mask, bias=bias, cache=cache, weights_hook=hook, qk_hook=record_qk, segment_ids=segment_ids,
        **core,
    )  # fmt: skip
    if variables is not None:
        for var, value in zip(variables, new):
            var.value = value
    return out


def _resolve_options(module: nn.Module, where: str) -> None:
    """Set a shell's ``options`` from its ``options`` and keyword fields (``from_keywords``)."""
    keywords = {name: getattr(module, name) for name in KEYWORDS}
    resolved = from_keywords(where, module.options, module.head_size, **keywords)
    object.__setattr__(module, "options", resolved)  # before Module.__post_init__ freezes the fields


# ---------------------------------------------------------------------------
# Attention modules
# ---------------------------------------------------------------------------


class Head(nn.Module):
    """One head of self-attention: (..., T, C) -> (..., T, head_size).

    The lecture's ``Head``: bias-free ``key``, ``query``, ``value`` projections,
    a causal mask, softmax, dropout on the weights, weighted sum of values.

    ``options``: an :class:`AttentionOptions` (only ``pos_encoding="rope"``
    acts here among the positions); today's keywords ``scale``, ``causal``,
    ``qk_norm``, ``pos_encoding``, ``attention_impl`` build one (None: not
    given; with ``options`` they must agree with it); read ``self.options``.
    ``dropout_rate``: dropout on the weights (dense path). ``decode`` (also a
    call argument, which wins) uses the ``"cache"`` collection
    (``cached_key``/``cached_value`` (..., S, D), ``cache_index``). Call:
    ``mask`` boolean, broadcastable to (..., T, S), True = attend, combined
    with the causal mask; ``bias`` float, added to the logits.

    Choices:
    {choices}"""

    head_size: int
    scale: ScaleLike | None = None
    causal: bool | None = None
    dropout_rate: float = 0.0
    qk_norm: bool | None = None
    pos_encoding: str | None = None
    attention_impl: str | None = None
    decode: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    kernel_init: Initializer = default_init
    options: AttentionOptions | None = None  # None: AttentionOptions(), with the keywords above

    def __post_init__(self):
        _resolve_options(self, "Head")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        deterministic: bool | None = None,
        decode: bool | None = None,
        segment_ids: Array | None = None,
    ) -> Array:
        deterministic = required_deterministic("Head", deterministic, self.dropout_rate)
        decode = self.decode if decode is None else decode
        dtype = jnp.dtype(self.dtype)
        dense = lambda name: nn.Dense(
            self.head_size,
            use_bias=False,
            kernel_init=self.kernel_init,
            dtype=dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        k = dense("key")(x)  # (..., T, D)
        q = dense("query")(x)  # (..., T, D)
        v = dense("value")(x)  # (..., T, D)
        if self.options.qk_norm:
            q, k = _qk_norms(self, q, k, self.param_dtype)
        return _attend_with_cache(
            self,
            q,
            k,
            v,
            num_heads=None,  # one head: scalar sinks, slope and log-n scale
            decode=decode,
            mask=mask,
            bias=bias,
            deterministic=deterministic,
            segment_ids=segment_ids,
        )  # (..., T, D)


class MultiHeadAttention(nn.Module):
    """All heads in one batched einsum, then an output projection.

    Self-attention (..., T, C) -> (..., T, out_features or C); cross-attention
    with ``inputs_kv`` (..., S, C_kv): queries from ``inputs_q``, keys and values
    from ``inputs_kv`` (Flax's argument names). Query, key and value for all
    heads come from one fused kernel ``qkv_kernel`` of shape (C, 3, H, D),
    projected straight into the head-major layout (..., H, T, D) that the
    attention einsums want (cross-attention uses its k and v slices). Equal to
    running ``num_heads`` ``Head``s and concatenating their outputs (tested with
    shared weights). ``num_kv_heads`` K < H (grouped-query attention; 1:
    multi-query) or a layer initialized with ``inputs_kv`` of another width
    C_kv has ``query_kernel`` (C, H, D) and ``kv_kernel`` (C_kv, 2, K, D)
    instead (``attention.projection_shapes``); query head h reads kv head
    h // (H / K), and the decode cache holds the K kv heads only.
    ``use_qkv_bias``: biases on the q, k, v projections (GPT-2 has them;
    ``qkv_bias`` (3, H, D), or ``query_bias`` and ``kv_bias``); ``use_bias``
    is the output projection's.

    ``options``: an :class:`AttentionOptions` (the scale may also be an array
    broadcastable to (..., H, T, S): one per head, traced or learnable); today's
    keywords ``scale``, ``causal``, ``qk_norm``, ``pos_encoding``,
    ``attention_impl`` build one (None: not given; with ``options`` they must
    agree with it); read ``self.options``. ``dropout_rate``: dropout on the
    attention weights (Flax's meaning; the dense path, where they exist);
    ``out_dropout_rate``: dropout on the layer's output (a residual branch:
    ``Block`` sets both from ``ModelConfig.dropout``). With either above 0 a
    call gives ``deterministic``. ``causal`` defaults to True: cross-attention
    (``inputs_kv``) needs ``causal=False`` and says so.
    ``decode``: KV-cache decoding, Flax's convention (also a call argument,
    which wins): the ``"cache"`` collection holds ``cached_key``,
    ``cached_value`` (B·K, S, D), batch and kv heads in one axis, and
    ``cache_index``; the first decode call (``init``) sizes it from its input,
    later calls append their T tokens and attend over everything cached.
    ``dtype`` (compute), ``param_dtype``: JAX dtypes or their names.

    Call: ``mask`` boolean, broadcastable to (..., H, T, S) (e.g.
    ``attention.padding_mask``), True = attend; ``bias`` float, same shape rule,
    added to the logits. A query row with no key left gives zero output.
    ``segment_ids`` (..., T) integers: a packed sequence of documents, each
    token attending within its own, rope restarting per document.

    Choices:
    {choices}"""

    num_heads: int
    head_size: int
    scale: ScaleLike | None = None
    causal: bool | None = None
    dropout_rate: float = 0.0
    qk_norm: bool | None = None
    pos_encoding: str | None = None
    attention_impl: str | None = None
    out_features: int | None = None
    use_bias: bool = True  # bias of the output projection
    decode: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    kernel_init: Initializer = default_init
    out_init: Initializer = default_init
    options: AttentionOptions | None = None  # None: AttentionOptions(), with the keywords above
    num_kv_heads: int | None = None  # K kv heads, dividing num_heads; None: num_heads
    use_qkv_bias: bool = False  # biases of the q, k, v projections
    out_dropout_rate: float = 0.0  # dropout on the layer's output (a residual branch's: nanoGPT's resid_dropout)

    def __post_init__(self):
        check_heads("MultiHeadAttention", self.num_heads, self.num_kv_heads)
        _resolve_options(self, "MultiHeadAttention")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        deterministic: bool | None = None,
        decode: bool | None = None,
        segment_ids: Array | None = None,
    ) -> Array:
        where = "MultiHeadAttention"
        deterministic = required_deterministic(where, deterministic, self.dropout_rate, self.out_dropout_rate)
        decode = self.decode if decode is None else decode
        check_call(where, inputs_kv=inputs_kv, decode=decode, pos_encoding=self.options.pos_encoding,
                   causal=self.options.causal)  # fmt: skip
        C = inputs_q.shape[-1]
        H, D = self.num_heads, self.head_size
        dtype = jnp.dtype(self.dtype)
        fused = self.has_variable("params", "qkv_kernel")  # initialized for keys of C channels
        C_kv = C if inputs_kv is None or fused else inputs_kv.shape[-1]
        shapes = attention.projection_shapes(C, H, D, self.num_kv_heads, bias=self.use_qkv_bias, C_kv=C_kv)
        kernel_init = flax_style_init(self.kernel_init)
        w = {
            name: self.param(name, nn.initializers.zeros if "bias" in name else kernel_init, shape, self.param_dtype)
            for name, shape in shapes.items()
        }
        q, k, v = attention.project_qkv(w, inputs_q, inputs_kv, dtype)  # (..., H, T, D), (..., K, S, D)
        if self.options.qk_norm:
            q, k = _qk_norms(self, q, k, self.param_dtype)
        out = _attend_with_cache(
            self,
            q,
            k,
            v,
            num_heads=H,
            decode=decode,
            mask=mask,
            bias=bias,
            deterministic=deterministic,
            segment_ids=head_axis(segment_ids),
        )  # (..., H, T, D)
        out_features = self.out_features or C
        w_out = self.param("proj_kernel", flax_style_init(self.out_init, 2), (H, D, out_features), self.param_dtype)
        b_out = None
        if self.use_bias:
            b_out = self.param("proj_bias", nn.initializers.zeros, (out_features,), self.param_dtype)
        y = attention.project_out(out, w_out, b_out, dtype)
        return nn.Dropout(self.out_dropout_rate)(y, deterministic=deterministic)  # (..., T, C)


for _shell in (Head, MultiHeadAttention):
    if _shell.__doc__:  # None under python -OO
        _shell.__doc__ = _shell.__doc__.format(choices=choices_doc().lstrip())


def check_heads(where: str, num_heads: int, num_kv_heads: int | None) -> None:
    """num_heads a positive integer, num_kv_heads None or one that divides it; else one line naming them."""
    attention.as_int(f"{where}.num_heads", num_heads)
    if num_kv_heads is not None:
        attention.as_int(f"{where}.num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{where}.num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (each kv head serves "
                "num_heads / num_kv_heads query heads)"
            )


def head_axis(segment_ids: Array | None) -> Array | None:
    """Segment ids (..., T) of the tokens as the heads' (..., 1, T): one id per token for every head."""
    return None if segment_ids is None else jnp.asarray(segment_ids)[..., None, :]


# The MLP's activations by name. Flax's nn.gelu is the tanh approximation by default (GPT-2's
# "gelu_new"); "gelu" is the exact erf form (BERT, PyTorch's default).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
    "silu": nn.silu,
}


class FeedForward(nn.Module):
    """Position-wise MLP: (..., T, C) -> Dense(hidden) -> activation -> Dense(C) -> dropout.

    This is where each token "thinks" about what it gathered by attention.
    ``activation``: one of ``ACTIVATIONS`` (default GELU, tanh form).
    """

    hidden: int
    dropout_rate: float = 0.0
    use_bias: bool = True
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    out_init: Initializer = default_init
    activation: str = "gelu_tanh"

    def __post_init__(self):
        attention.check_choice("FeedForward.activation", self.activation, tuple(ACTIVATIONS))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool | None = None) -> Array:
        deterministic = required_deterministic("FeedForward", deterministic, self.dropout_rate)
        C = x.shape[-1]
        dense = lambda features, init, name: nn.Dense(
            features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=init,
            name=name,
        )
        h = ACTIVATIONS[self.activation](dense(self.hidden, default_init, "fc")(x))
        y = dense(C, self.out_init, "proj")(h)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
