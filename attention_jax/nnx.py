"""NNX twins of the Linen modules: ``Head``, ``MultiHeadAttention``, ``Block``, ``TransformerLM``.

    from attention_jax import nnx as ajx        # not imported by ``import attention_jax``
    model = ajx.TransformerLM(model_config, rngs=flax.nnx.Rngs(0))
    logits = model(tokens)                       # (..., T) -> (..., T, V)

The same options as the Linen modules (scale rules, positions, qk_norm,
attention_impl, masks, cross-attention, the decode cache), over the same pure
functions (:mod:`attention_jax.attention`: projections, the cache, attention);
these classes only own parameters, norms, dropout and where the cache lives.
Parameters have the Linen names, so ``nnx.state(model, nnx.Param)`` is the
Linen parameter tree: ``from_linen(linen_module, params)`` and
``to_linen(nnx_module)`` convert either way, and ``generate`` samples from an
NNX model through its Linen twin (one compiled loop, the KV cache).

NNX conventions: ``rngs=nnx.Rngs(...)`` at construction (``params`` for
initialization, ``dropout`` for dropout); dropout is on until ``model.eval()``
or ``deterministic=True``; ``decode`` is an attribute and a call argument (the
call wins), and ``model.init_cache(...)`` must come before decoding; with
``sow_weights`` (``model.set_attributes(sow_weights=True)``) the attention
weights of the dense path are sown as ``nnx.Intermediate``
``attention_weights``: ``logits, inter = nnx.capture(model,
nnx.Intermediate)(tokens)``. It is off by default because a sow outside
``nnx.capture`` mutates the model (and Flax 0.12 deprecates it), which plain
``jax.grad``/``jax.jit`` over a call refuse.

This module imports ``flax.nnx``, which imports optax: that is why
``import attention_jax`` does not import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike, DTypeLike

from attention_jax import attention, flax_api, layers, model
from attention_jax.attention import ScaleLike
from attention_jax.generate import generate as _generate_linen
from attention_jax.layers import check_call, default_init
from attention_jax.model import ModelConfig
from attention_jax.options import KEYWORDS, AttentionOptions, choices_doc, from_keywords
from attention_jax.positions import sinusoidal_encoding

Array = jax.Array
Initializer = Callable[..., Array]

__all__ = ["AddPositions", "Block", "FeedForward", "FusedMultiHeadAttention", "Head", "MultiHeadAttention"]
__all__ += ["TransformerLM"]
__all__ += ["from_linen", "generate", "to_linen"]


class _Attention(nnx.Module):
    """What Head and MultiHeadAttention share: the options, the dense-path hook, the q/k norms and the cache.

    ``self.options`` holds the :class:`AttentionOptions`; today's keyword names
    (``scale``, ``causal``, ...) read through to it, as the Linen fields do.
    """

    def _set_options(self, where: str, options: AttentionOptions | None, head_size: int, keywords: dict) -> None:
        self.options = from_keywords(where, options, head_size, **keywords)

    def _set_norms(self, head_size: int, dtype: DTypeLike | None, param_dtype: DTypeLike, rngs: nnx.Rngs) -> None:
        if self.options.qk_norm:
            norm = lambda: layers.qk_norm_layer(
                self.options, nnx.LayerNorm, nnx.RMSNorm, num_features=head_size, dtype=dtype,
                param_dtype=param_dtype, rngs=rngs,
            )  # fmt: skip
            self.query_norm, self.key_norm = norm(), norm()

    def _set_option_params(self, num_heads: int | None) -> None:
        """The parameters some options add (sinks, a learned log-n scale), by their Linen names."""
        params = self.options.option_params(num_heads)
        self._option_params = tuple(params)
        for name, (shape, value) in params.items():
            setattr(self, name, nnx.Param(jnp.full(shape, value, jnp.float32)))

    def _norms(self, q: Array, k: Array) -> tuple[Array, Array]:
        return (self.query_norm(q), self.key_norm(k)) if self.options.qk_norm else (q, k)

    def _hook(self, deterministic: bool | None) -> Callable[[Array], Array]:
        def hook(w: Array) -> Array:
            if self.sow_weights:  # a sow mutates the module: only on request, so plain jax.grad/jit work
                self.sow(nnx.Intermediate, "attention_weights", w)
            return self.dropout(w, deterministic=deterministic)

        return hook

    def _init_cache_for(self, k_shape: tuple[int, ...], dtype: DTypeLike) -> None:
        shape = attention.cache_shape(jax.ShapeDtypeStruct(k_shape, dtype), self.options.window)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def _attend(self, q, k, v, *, decode, mask, bias, deterministic, segment_ids=None):
        cache = None
        if decode:
            if getattr(self, "cached_key", None) is None:
                raise ValueError(f"{type(self).__name__}: decode needs a cache; call init_cache first")
            cache = (self.cached_key[...], self.cached_value[...], self.cache_index[...])
        params = {name: getattr(self, name)[...] for name in self._option_params}
        out, new = attention.attention_heads(
            q, k, v, mask=mask, bias=bias, cache=cache, weights_hook=self._hook(deterministic), segment_ids=segment_ids,
            **self.options.attention_kwargs(self.head_size, getattr(self, "num_heads", None), params),
        )  # fmt: skip
        if new is not None:
            self.cached_key[...], self.cached_value[...], self.cache_index[...] = new
        return out


for _name in KEYWORDS:  # nnx_module.scale, .causal, ...: read-only views of self.options
    setattr(_Attention, _name, property(lambda self, _name=_name: getattr(self.options, _name)))


class Head(_Attention):
    """One head of self-attention: (..., T, in_features) -> (..., T, head_size). The twin of ``layers.Head``.

    ``options`` (an :class:`AttentionOptions`) or today's keywords as there;
    ``decode`` with ``init_cache``.

    Choices:
    {choices}"""

    def __init__(
        self,
        in_features: int,
        head_size: int,
        *,
        scale: ScaleLike | None = None,
        causal: bool | None = None,
        dropout_rate: float = 0.0,
        qk_norm: bool | None = None,
        pos_encoding: str | None = None,
        attention_impl: str | None = None,
        decode: bool = False,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        kernel_init: Initializer = default_init,
        sow_weights: bool = False,
        options: AttentionOptions | None = None,
        rngs: nnx.Rngs,
    ):
        keywords = dict(
            scale=scale, causal=causal, qk_norm=qk_norm, pos_encoding=pos_encoding, attention_impl=attention_impl
        )
        self._set_options("Head", options, head_size, keywords)
        # the other arguments, by the Linen field names (to_linen reads them back)
        self.head_size, self.dropout_rate = head_size, dropout_rate
        self.decode, self.dtype, self.param_dtype = decode, dtype, param_dtype
        self.kernel_init, self.sow_weights = kernel_init, sow_weights
        linear = lambda: nnx.Linear(
            in_features,
            head_size,
            use_bias=False,
            kernel_init=kernel_init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.key, self.query, self.value = linear(), linear(), linear()
        self._set_norms(head_size, dtype, param_dtype, rngs)
        self._set_option_params(None)  # one head: scalar sinks and log-n scale
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.cached_key, self.cached_value, self.cache_index = nnx.data(None), nnx.data(None), nnx.data(None)

    def init_cache(self, batch_shape: int | tuple[int, ...], max_length: int, dtype: DTypeLike | None = None) -> None:
        """Empty ``nnx.Cache`` variables for inputs (*batch_shape, T, C) of up to ``max_length`` tokens."""
        batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        self._init_cache_for((*batch_shape, max_length, self.head_size), dtype or self.dtype)

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
        k, q, v = self.key(x), self.query(x), self.value(x)  # (..., T, D)
        q, k = self._norms(q, k)
        decode = self.decode if decode is None else decode
        return self._attend(
            q, k, v, decode=decode, mask=mask, bias=bias, deterministic=deterministic, segment_ids=segment_ids
        )


class FusedMultiHeadAttention(_Attention):
    """The twin of ``layers.MultiHeadAttention``: (..., T, in_features) -> (..., T, out_features or in_features).

    (Named ``MultiHeadAttention`` before ``MultiHeadAttention`` became Flax NNX's class, arguments and
    parameter tree; this one keeps the fused ``qkv_kernel`` and the arguments of the Linen twin.)

    Cross-attention with ``inputs_kv`` (..., S, in_kv_features or in_features);
    ``qkv_kernel`` (C, 3, H, D), or ``query_kernel`` and ``kv_kernel`` with
    ``num_kv_heads`` or ``in_kv_features`` (``attention.projection_shapes``),
    ``proj_kernel`` (H, D, C'), ``proj_bias``; ``options`` (an
    :class:`AttentionOptions`) or today's keywords, and every argument, as
    documented there. Cache: ``init_cache(batch_shape, max_length)``.

    Choices:
    {choices}"""

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        head_size: int,
        *,
        scale: ScaleLike | None = None,
        causal: bool | None = None,
        dropout_rate: float = 0.0,
        qk_norm: bool | None = None,
        pos_encoding: str | None = None,
        attention_impl: str | None = None,
        out_features: int | None = None,
        use_bias: bool = True,
        decode: bool = False,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        kernel_init: Initializer = default_init,
        out_init: Initializer = default_init,
        sow_weights: bool = False,
        options: AttentionOptions | None = None,
        num_kv_heads: int | None = None,
        use_qkv_bias: bool = False,
        in_kv_features: int | None = None,
        out_dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
    ):
        layers.check_heads("FusedMultiHeadAttention", num_heads, num_kv_heads)
        keywords = dict(
            scale=scale, causal=causal, qk_norm=qk_norm, pos_encoding=pos_encoding, attention_impl=attention_impl
        )
        self._set_options("FusedMultiHeadAttention", options, head_size, keywords)
        # the other arguments, by the Linen field names (to_linen reads them back)
        self.num_heads, self.head_size, self.dropout_rate = num_heads, head_size, dropout_rate
        self.out_features, self.use_bias = out_features, use_bias
        self.decode, self.dtype, self.param_dtype = decode, dtype, param_dtype
        self.kernel_init, self.out_init, self.sow_weights = kernel_init, out_init, sow_weights
        self.num_kv_heads, self.use_qkv_bias, self.out_dropout_rate = num_kv_heads, use_qkv_bias, out_dropout_rate
        C, H, D, C_out = in_features, num_heads, head_size, out_features or in_features
        shapes = attention.projection_shapes(C, H, D, num_kv_heads, bias=use_qkv_bias, C_kv=in_kv_features)
        self._projections = tuple(shapes)
        for name, shape in shapes.items():  # qkv_kernel, or query_kernel and kv_kernel; their biases
            init = nn.initializers.zeros if "bias" in name else layers.flax_style_init(kernel_init)
            setattr(self, name, nnx.Param(init(rngs.params(), shape, param_dtype)))
        self.proj_kernel = nnx.Param(layers.flax_style_init(out_init, 2)(rngs.params(), (H, D, C_out), param_dtype))
        self.proj_bias = nnx.Param(jnp.zeros((C_out,), param_dtype)) if use_bias else None
        self._set_norms(D, dtype, param_dtype, rngs)
        self._set_option_params(H)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)  # on the weights
        self.out_dropout = nnx.Dropout(out_dropout_rate, rngs=rngs)  # on the output
        self.cached_key, self.cached_value, self.cache_index = nnx.data(None), nnx.data(None), nnx.data(None)

    def init_cache(self, batch_shape: int | tuple[int, ...], max_length: int, dtype: DTypeLike | None = None) -> None:
        """Empty ``nnx.Cache`` variables for inputs (*batch_shape, T, C) of up to ``max_length`` tokens."""
        batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        heads = self.num_kv_heads or self.num_heads
        self._init_cache_for((*batch_shape, heads, max_length, self.head_size), dtype or self.dtype)

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
        decode = self.decode if decode is None else decode
        check_call("FusedMultiHeadAttention", inputs_kv=inputs_kv, decode=decode,
                   pos_encoding=self.options.pos_encoding, causal=self.options.causal)  # fmt: skip
        dtype = jnp.dtype(self.dtype)
        w = {name: getattr(self, name)[...] for name in self._projections}
        q, k, v = attention.project_qkv(w, inputs_q, inputs_kv, dtype)  # (..., H, T, D), (..., K, S, D)
        q, k = self._norms(q, k)
        out = self._attend(q, k, v, decode=decode, mask=mask, bias=bias, deterministic=deterministic,
                           segment_ids=layers.head_axis(segment_ids))  # fmt: skip
        b_out = None if self.proj_bias is None else self.proj_bias[...]
        y = attention.project_out(out, self.proj_kernel[...], b_out, dtype)
        return self.out_dropout(y, deterministic=deterministic)  # (..., T, C')


for _shell in (Head, FusedMultiHeadAttention):
    if _shell.__doc__:  # None under python -OO
        _shell.__doc__ = _shell.__doc__.format(choices=choices_doc().lstrip())


class MultiHeadAttention(nnx.Module):
    """``flax.nnx.MultiHeadAttention``, argument for argument (positional order included), over attention_jax's math.

    ``MultiHeadAttention(num_heads, in_features, qkv_features, out_features, num_kv_heads,
    in_kv_features, *, ...)`` with Flax's defaults, meanings and parameters (``query``, ``key``,
    ``value``, ``out`` ``LinearGeneral``s; ``query_ln``, ``key_ln`` with ``normalize_qk``), created in
    Flax's order from ``rngs``, so the same ``Rngs`` give Flax's parameters; the dropout stream
    forked as Flax forks it; ``init_cache(input_shape)`` makes Flax's (batch..., S, K, D) cache.
    Ours, as keywords: ``options`` (default ``causal=False``), ``empty_rows`` (see
    :mod:`attention_jax.flax_api`: the one difference, a row with no key, is the same here) and
    the call's ``bias`` and ``segment_ids``. The fused twin of ``layers.MultiHeadAttention`` is
    ``FusedMultiHeadAttention``.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision: Any = None,
        kernel_init: Initializer = nnx.nn.linear.default_kernel_init,
        out_kernel_init: Initializer | None = None,
        bias_init: Initializer = nnx.initializers.zeros,
        out_bias_init: Initializer | None = None,
        use_bias: bool = True,
        attention_fn: Callable[..., Array] = nnx.dot_product_attention,
        decode: bool | None = None,
        normalize_qk: bool = False,
        qkv_promote_dtype: Callable = nnx.nn.dtypes.promote_dtype,
        out_promote_dtype: Callable = nnx.nn.dtypes.promote_dtype,
        ln_promote_dtype: Callable = nnx.nn.dtypes.promote_dtype,
        qkv_dot_general: Any = None,
        out_dot_general: Any = None,
        qkv_dot_general_cls: Any = None,
        out_dot_general_cls: Any = None,
        rngs: nnx.Rngs,
        keep_rngs: bool = True,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        out_kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        out_bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        query_ln_scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        key_ln_scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        options: AttentionOptions | None = None,
        empty_rows: str = "zero",
        **ours: Any,
    ):
        where = "MultiHeadAttention"
        if ours:  # our fused layer's arguments: say where they went, instead of building something else
            raise TypeError(
                f"{where} takes flax.nnx.MultiHeadAttention's arguments (num_heads, in_features, qkv_features, ...), "
                f"not {sorted(ours)[0]!r}: the fused twin of layers.MultiHeadAttention is FusedMultiHeadAttention"
            )
        attention.check_choice(f"{where}.empty_rows", empty_rows, flax_api.EMPTY_ROWS)
        self.num_heads, self.in_features = num_heads, in_features
        self.qkv_features = qkv_features if qkv_features is not None else in_features
        self.out_features = out_features if out_features is not None else in_features
        self.in_kv_features = in_kv_features if in_kv_features is not None else in_features
        self.head_dim, self.num_kv_heads = flax_api.check_heads(where, num_heads, self.qkv_features, num_kv_heads)
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        self.broadcast_dropout, self.dropout_rate, self.deterministic = broadcast_dropout, dropout_rate, deterministic
        self.use_bias, self.attention_fn, self.decode, self.normalize_qk = use_bias, attention_fn, decode, normalize_qk
        self.empty_rows = empty_rows
        self._flax_computes = attention_fn is not nnx.dot_product_attention or precision is not None
        self.options = flax_api.options_for(where, options, self._flax_computes, self.head_dim)
        if normalize_qk and self.options.qk_norm:
            raise ValueError(f"{where}: give normalize_qk (Flax's) or options.qk_norm, not both")
        linear = lambda in_features, heads: nnx.LinearGeneral(
            in_features, out_features=(heads, self.head_dim), dtype=dtype, param_dtype=param_dtype,
            kernel_init=kernel_init, bias_init=bias_init, use_bias=use_bias, precision=precision,
            promote_dtype=qkv_promote_dtype, dot_general=qkv_dot_general, dot_general_cls=qkv_dot_general_cls,
            kernel_metadata=kernel_metadata, bias_metadata=bias_metadata, rngs=rngs,
        )  # fmt: skip
        self.query = linear(in_features, num_heads)
        self.key = linear(self.in_kv_features, self.num_kv_heads)
        self.value = linear(self.in_kv_features, self.num_kv_heads)
        self.query_ln, self.key_ln = nnx.data(None), nnx.data(None)
        if normalize_qk:
            ln = lambda metadata: nnx.LayerNorm(
                self.head_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, promote_dtype=ln_promote_dtype,
                rngs=rngs, scale_metadata=metadata,
            )  # fmt: skip
            self.query_ln, self.key_ln = ln(query_ln_scale_metadata), ln(key_ln_scale_metadata)
        self.out = nnx.LinearGeneral(
            in_features=(num_heads, self.head_dim), out_features=self.out_features, axis=(-2, -1),
            kernel_init=out_kernel_init or kernel_init, bias_init=out_bias_init or bias_init, use_bias=use_bias,
            dtype=dtype, param_dtype=param_dtype, precision=precision, promote_dtype=out_promote_dtype,
            dot_general=out_dot_general, dot_general_cls=out_dot_general_cls, rngs=rngs,
            kernel_metadata=out_kernel_metadata or kernel_metadata, bias_metadata=out_bias_metadata or bias_metadata,
        )  # fmt: skip
        self.query_norm = self.key_norm = nnx.data(None)
        if self.options.qk_norm:  # ours, by our names
            norm = lambda: layers.qk_norm_layer(
                self.options, nnx.LayerNorm, nnx.RMSNorm, num_features=self.head_dim, dtype=dtype,
                param_dtype=param_dtype, rngs=rngs,
            )  # fmt: skip
            self.query_norm, self.key_norm = norm(), norm()
        params = self.options.option_params(num_heads)
        self._option_params = tuple(params)
        for name, (shape, value) in params.items():
            setattr(self, name, nnx.Param(jnp.full(shape, value, jnp.float32)))
        self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else None
        self.cached_key, self.cached_value, self.cache_index = nnx.data(None), nnx.data(None), nnx.data(None)

    def init_cache(self, input_shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> None:
        """Flax's cache for inputs (batch..., S, C): ``cached_key``/``cached_value`` (batch..., S, K, D)."""
        S = input_shape[-2] if self.options.window is None else min(input_shape[-2], self.options.window)
        shape = (*input_shape[:-2], S, self.num_kv_heads, self.head_dim)
        self.cached_key, self.cached_value = nnx.Cache(jnp.zeros(shape, dtype)), nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        mask: Array | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        sow_weights: bool = False,
        decode: bool | None = None,
        is_causal: bool = False,
        out_sharding: Any = None,
        qkv_sharding: Any = None,
        bias: Array | None = None,
        segment_ids: Array | None = None,
    ) -> Array:
        where = "MultiHeadAttention"
        rngs = self.rngs if rngs is None else rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs
        self_attention = inputs_k is None
        inputs_k, inputs_v = flax_api.resolve_kv(where, inputs_q, inputs_k, inputs_v, None)
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(f"{where}: inputs_q has {inputs_q.shape[-1]} features, the layer {self.in_features}")
        query = self.query(inputs_q, out_sharding=qkv_sharding)  # (..., T, H, D)
        key = self.key(inputs_k, out_sharding=qkv_sharding)  # (..., S, K, D)
        value = self.value(inputs_v, out_sharding=qkv_sharding)
        if self.normalize_qk:
            query, key = self.query_ln(query), self.key_ln(key)
        elif self.options.qk_norm:
            query, key = self.query_norm(query), self.key_norm(key)
        decode = decode if decode is not None else self.decode  # the call's wins; one of them is needed, as in Flax NNX
        if decode is None:
            raise ValueError(f"{where}: give decode, at the call or as an attribute (decode=False: no cache)")
        dropout_rng = None
        if self.dropout_rate > 0.0:  # the call's deterministic wins over the attribute, as in Flax NNX
            deterministic = deterministic if deterministic is not None else self.deterministic
            if deterministic is None:
                raise ValueError(f"{where}: dropout_rate > 0 needs deterministic, at the call or as an attribute")
            if not deterministic:
                if rngs is None:
                    raise ValueError(
                        f"{where}: dropout needs rngs at the call (the layer was built with keep_rngs=False)"
                    )
                dropout_rng = rngs()
        else:
            deterministic = True
        if self._flax_computes:  # Flax's own computation gets the caller's mask as it was given
            if decode or bias is not None or segment_ids is not None or self.num_kv_heads != self.num_heads:
                raise ValueError(
                    f"{where}: a custom attention_fn or precision runs Flax's own attention, which takes no decode, "
                    "bias, segment_ids or num_kv_heads here"
                )
            x = self.attention_fn(
                query, key, value, mask=mask, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
                broadcast_dropout=self.broadcast_dropout, deterministic=deterministic, dtype=self.dtype,
                precision=self.precision, module=self if sow_weights else None, is_causal=is_causal,
            )  # fmt: skip
            return self.out(x, out_sharding=out_sharding)
        options = self.options.replace(causal=True) if is_causal else self.options
        if is_causal and query.shape[-3] != key.shape[-3] and not decode:
            raise ValueError(f"{where}: is_causal is for self-attention (T = S); give a mask for {query.shape[-3]} "
                             f"queries over {key.shape[-3]} keys")  # fmt: skip

        def hook(w):
            if sow_weights:
                self.sow(nnx.Intermediate, "attention_weights", w)
            return w if deterministic else flax_api.dropout_weights(w, dropout_rng, self.dropout_rate,
                                                                    self.broadcast_dropout)  # fmt: skip

        cache = None
        if decode:
            if self.cached_key is None:
                raise ValueError(f"{where}: decode needs a cache; call init_cache first")
            cache = flax_api.cache_rows(self.cached_key[...], self.cached_value[...], self.cache_index[...])
        params = {name: getattr(self, name)[...] for name in self._option_params}
        x, new = flax_api.attend_in_flax_layout(
            where, options, query, key, value, mask=mask, bias=bias, segment_ids=segment_ids, hook=hook, cache=cache,
            params=params, empty_rows=self.empty_rows, self_attention=self_attention, deterministic=deterministic,
        )  # fmt: skip
        if new is not None:
            self.cached_key[...] = flax_api.cache_from_rows(new[0], self.cached_key[...])
            self.cached_value[...] = flax_api.cache_from_rows(new[1], self.cached_value[...])
            self.cache_index[...] = new[2]
        return self.out(x, out_sharding=out_sharding)


class FeedForward(nnx.Module):
    """The twin of ``layers.FeedForward``: (..., T, C) -> fc -> activation -> proj -> dropout."""

    def __init__(
        self,
        in_features: int,
        hidden: int,
        *,
        dropout_rate: float = 0.0,
        use_bias: bool = True,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        out_init: Initializer = default_init,
        activation: str = "gelu_tanh",
        rngs: nnx.Rngs,
    ):
        attention.check_choice("FeedForward.activation", activation, tuple(layers.ACTIVATIONS))
        self.activation = activation
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc = nnx.Linear(in_features, hidden, kernel_init=default_init, **kw)
        self.proj = nnx.Linear(hidden, in_features, kernel_init=out_init, **kw)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: Array, *, deterministic: bool | None = None) -> Array:
        h = layers.ACTIVATIONS[self.activation](self.fc(x))
        return self.dropout(self.proj(h), deterministic=deterministic)


class AddPositions(nnx.Module):
    """The twin of ``layers.AddPositions``: ``kind`` ``"learned"`` | ``"sinusoidal"`` | ``"rope"`` | ``"none"``."""

    def __init__(self, kind: str, max_len: int, features: int, *, param_dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs):
        attention.check_choice("AddPositions.kind", kind, layers.POS_ENCODINGS)
        self.kind, self.max_len = kind, max_len
        if kind == "learned":
            self.embedding = nnx.Param(default_init(rngs.params(), (max_len, features), param_dtype))
        self.cache_index = nnx.data(None)

    def init_cache(self) -> None:
        if self.kind in ("learned", "sinusoidal"):
            self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def __call__(self, x: Array, *, decode: bool = False, positions: Array | None = None) -> Array:
        T, C = x.shape[-2:]
        if self.kind not in ("learned", "sinusoidal"):
            return x
        if positions is not None:  # each token's own position (packed sequences)
            if self.kind == "learned":
                return x + self.embedding[...][positions].astype(x.dtype)
            return x + sinusoidal_encoding(T, C, positions=positions).astype(x.dtype)
        start = 0
        if decode:
            if self.cache_index is None:
                raise ValueError("AddPositions: decode needs a cache; call init_cache first")
            start = self.cache_index[...]
            self.cache_index[...] = start + T
        if self.kind == "learned":
            table = self.embedding[...]
            rows = jax.lax.dynamic_slice_in_dim(table, start, T) if decode else table[:T]
            return x + rows.astype(x.dtype)
        return x + sinusoidal_encoding(T, C, offset=start).astype(x.dtype)


class Block(nnx.Module):
    """The twin of ``model.Block``: pre-LayerNorm x + attn(ln(x)), then x + mlp(ln(x)). (..., T, C) -> (..., T, C)."""

    def __init__(self, model_config: ModelConfig, *, layer: int = 0, rngs: nnx.Rngs):
        cfg = self.model_config = model_config
        self.layer = layer  # as model.Block.layer: picks its window when model_config.window is per layer
        attn, mlp = model.block_options(cfg, layer)
        norm = lambda: nnx.LayerNorm(
            cfg.n_embd,
            epsilon=cfg.norm_epsilon,
            use_bias=cfg.bias,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        self.ln_attn = norm()
        self.attn = FusedMultiHeadAttention(cfg.n_embd, **attn, rngs=rngs)
        self.ln_mlp = norm()
        self.mlp = FeedForward(cfg.n_embd, **mlp, rngs=rngs)

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
        x = x + self.attn(
            self.ln_attn(x), mask=mask, bias=bias, deterministic=deterministic, decode=decode, segment_ids=segment_ids
        )
        return x + self.mlp(self.ln_mlp(x), deterministic=deterministic)


class TransformerLM(nnx.Module):
    """The twin of ``model.TransformerLM``: tokens (..., T) -> logits (..., T, V) float32, T <= block_size.

    Decoding: ``model.init_cache(B, max_length)``, then ``model(tokens,
    decode=True)`` feeds T new tokens at a time; positions continue from the
    cache index.
    """

    def __init__(self, model_config: ModelConfig, *, rngs: nnx.Rngs):
        cfg = self.model_config = model_config
        if cfg.scan_layers or cfg.remat is not None:
            raise ValueError(
                "ModelConfig.scan_layers and remat are for the Linen TransformerLM; the NNX twin unrolls its blocks "
                "(use model.unstack_layers to bring a scanned model's parameters over)"
            )
        dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.token_embedding = nnx.Embed(
            cfg.vocab_size, cfg.n_embd, embedding_init=default_init, param_dtype=pdt, rngs=rngs
        )
        self.positions = AddPositions(cfg.pos_encoding, cfg.block_size, cfg.n_embd, param_dtype=pdt, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        for i in range(cfg.n_layer):  # attributes block_0, block_1, ...: the Linen names
            setattr(self, f"block_{i}", Block(cfg, layer=i, rngs=rngs))
        self.ln_final = nnx.LayerNorm(
            cfg.n_embd, epsilon=cfg.norm_epsilon, use_bias=cfg.bias, dtype=dtype, param_dtype=pdt, rngs=rngs
        )
        self.lm_head = nnx.data(None)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Linear(
                cfg.n_embd,
                cfg.vocab_size,
                use_bias=cfg.bias,
                kernel_init=default_init,
                dtype=dtype,
                param_dtype=pdt,
                rngs=rngs,
            )

    def blocks(self) -> list[Block]:
        return [getattr(self, f"block_{i}") for i in range(self.model_config.n_layer)]

    def init_cache(self, batch_size: int, max_length: int | None = None) -> None:
        """Empty caches in every attention layer (and the positions) for ``batch_size`` x ``max_length`` tokens."""
        cfg = self.model_config
        max_length = attention.as_int("max_length", max_length or cfg.block_size)
        if max_length > cfg.block_size:
            raise ValueError(f"max_length {max_length} exceeds block_size {cfg.block_size}")
        self.positions.init_cache()
        for block in self.blocks():
            block.attn.init_cache(attention.as_int("batch_size", batch_size), max_length)

    def __call__(
        self,
        tokens: Array,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        deterministic: bool | None = None,
        decode: bool = False,
        segment_ids: Array | None = None,
    ) -> Array:
        cfg = self.model_config
        if tokens.shape[-1] > cfg.block_size:
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds block_size {cfg.block_size}")
        segment_ids, positions = model.packed_inputs(tokens, segment_ids, cfg.end_token_id, decode)
        x = self.positions(self.token_embedding(tokens), decode=decode, positions=positions)  # (..., T, C)
        x = self.dropout(x, deterministic=deterministic).astype(jnp.dtype(cfg.dtype))
        for block in self.blocks():
            x = block(x, mask=mask, bias=bias, deterministic=deterministic, decode=decode, segment_ids=segment_ids)
        x = self.ln_final(x)
        if self.lm_head is None:
            logits = self.token_embedding.attend(x.astype(jnp.float32))
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32)  # (..., T, V)


# ---------------------------------------------------------------------------
# Linen <-> NNX
# ---------------------------------------------------------------------------


def _layer_fields(module: nn.Module) -> dict[str, Any]:
    return {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in ("parent", "name")}


def _twin_of_linen(module: nn.Module, params: Any, rngs: nnx.Rngs) -> nnx.Module:
    if isinstance(module, (model.TransformerLM, model.Block)):
        if isinstance(module, model.TransformerLM):
            return TransformerLM(module.model_config, rngs=rngs)
        return Block(module.model_config, layer=module.layer, rngs=rngs)
    if isinstance(module, layers.MultiHeadAttention):
        if "qkv_kernel" in params:
            C = C_kv = params["qkv_kernel"].shape[0]
        else:
            C, C_kv = params["query_kernel"].shape[0], params["kv_kernel"].shape[0]
        fields = _layer_fields(module)
        return FusedMultiHeadAttention(C, **fields, in_kv_features=None if C_kv == C else C_kv, rngs=rngs)
    if isinstance(module, layers.Head):
        return Head(params["key"]["kernel"].shape[0], **_layer_fields(module), rngs=rngs)
    raise TypeError(
        f"from_linen converts Head, MultiHeadAttention, Block and TransformerLM, got {type(module).__name__}"
    )


def _linen_twin(module: nnx.Module) -> nn.Module:
    if isinstance(module, TransformerLM):
        return model.TransformerLM(module.model_config)
    if isinstance(module, Block):
        return model.Block(module.model_config, layer=module.layer)
    linen_type = {FusedMultiHeadAttention: layers.MultiHeadAttention, Head: layers.Head}.get(type(module))
    if linen_type is None:
        raise TypeError(
            f"to_linen converts Head, MultiHeadAttention, Block and TransformerLM, got {type(module).__name__}"
        )
    names = [f.name for f in dataclasses.fields(linen_type) if f.name not in ("parent", "name")]
    return linen_type(**{name: getattr(module, name) for name in names})


def _paths(tree: Any) -> set[tuple]:
    return {tuple(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def from_linen(linen_module: nn.Module, params: Any, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """The NNX twin of a Linen ``Head``, ``MultiHeadAttention``, ``Block`` or ``TransformerLM`` with ``params``.

    ``rngs`` (with a ``params`` stream, used and then overwritten) seeds the
    twin's dropout (default ``nnx.Rngs(0)``). Raises
    ``ValueError`` naming the parameters that do not match the twin's.
    """
    params = params.get("params", params) if isinstance(params, dict) and set(params) == {"params"} else params
    twin = _twin_of_linen(linen_module, params, rngs or nnx.Rngs(0))
    state = nnx.state(twin, nnx.Param)
    want, got = _paths(nnx.to_pure_dict(state)), _paths(params)
    if want != got:
        raise ValueError(
            f"params do not fit {type(linen_module).__name__}: missing {sorted(want - got)}, "
            f"unexpected {sorted(got - want)}"
        )
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, params))
    nnx.update(twin, state)
    return twin


def to_linen(nnx_module: nnx.Module) -> tuple[nn.Module, Any]:
    """``(linen_module, params)``: the Linen twin of an NNX module of this package, and its weights."""
    linen_module = _linen_twin(nnx_module)
    return linen_module, nnx.to_pure_dict(nnx.state(nnx_module, nnx.Param))


def generate(
    model: TransformerLM,
    tokens: ArrayLike,
    max_new_tokens: int,
    key: Array,
    temperature: float | ArrayLike = 1.0,
    top_k: int | None = None,
    *,
    use_cache: bool | None = None,
    refill_to: int | None = None,
) -> Array:
    """``attention_jax.generate`` for an NNX ``TransformerLM``: (B, T0) -> (B, T0 + max_new_tokens).

    Runs the Linen twin with the model's current weights (the same compiled
    loop and KV cache); the NNX model itself is left untouched.
    """
    linen_module, params = to_linen(model)
    return _generate_linen(
        linen_module,
        params,
        tokens,
        max_new_tokens,
        key,
        temperature,
        top_k,
        use_cache=use_cache,
        refill_to=refill_to,
    )
