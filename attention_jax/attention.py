"""Masked self-attention as pure functions over arrays.

Everything here is a plain function of arrays: no parameters, no modules, no
state. The Flax modules in :mod:`attention_jax.layers` only create parameters
and call these. Shapes follow the legend in :mod:`attention_jax` (B batch,
T query time, S key time, D head size); leading ``...`` axes are any batch
axes (batch, heads), broadcast as usual.

The picture from the lecture: T tokens are nodes of a directed graph, token t
has an edge from every token s <= t. Each token emits a query ("what am I
looking for") and a key ("what do I contain"); q·k is the affinity along an
edge; softmax over the incoming edges turns affinities into the weights of a
weighted average of the values.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from attention_jax.blockwise import blockwise_causal_attention
from attention_jax.positions import alibi_bias, apply_rope, segment_positions, segment_runs
from attention_jax.splash import splash_attention

Array = jax.Array
# A scale: a rule's name, a number (Python or numpy), or an array (numpy or JAX, possibly a
# tracer inside jit/vmap/grad, possibly learnable); see ``resolve_scale``.
ScaleLike = str | float | ArrayLike

# Named scaling rules. A number or an array is accepted too (see ``resolve_scale``).
SCALES: dict[str, Callable[[int], float]] = {
    "sqrt": lambda d: d**-0.5,  # Vaswani et al. 2017: keeps logit variance ~1
    "none": lambda d: 1.0,  # unscaled: logit variance grows like head_size
    "mup": lambda d: 1.0 / d,  # muP (Yang et al. 2022): 1/d, width-transferable
}


def check_choice(where: str, value: object, choices: tuple) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``value`` is one of ``choices`` (string options)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{where}: unknown {value!r}, valid choices are {choices}")


def as_int(where: str, value: object, minimum: int = 1) -> int:
    """``value`` as a Python int (numpy integers accepted), at least ``minimum``; else ``ValueError``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{where} must be {what}, got {value!r}")
    return operator.index(value)


# ---------------------------------------------------------------------------
# Masks and scales
# ---------------------------------------------------------------------------


def causal_mask(T: int, S: int | None = None, window: int | None = None) -> Array:
    """Lower-triangular (T, S) boolean mask, True where query t may see key s.

    With S > T the queries are the *last* T positions of S keys (as when a
    prefix is cached), so query t sees keys s <= t + (S - T). With ``window``
    W (sliding-window, local attention) it sees at most the last W of them,
    itself included: t + (S - T) - W < s.
    """
    T = operator.index(T)
    S = T if S is None else operator.index(S)
    window = None if window is None else operator.index(window)
    return sees(jnp.arange(S - T, S)[:, None], jnp.arange(S)[None, :], window)


def sees(query_pos: Array, key_pos: Array, window: int | None = None) -> Array:
    """Whether a query at ``query_pos`` may see a key at ``key_pos`` causally (broadcast): s <= t, and t - W < s."""
    visible = key_pos <= query_pos
    return visible if window is None else visible & (key_pos > query_pos - window)


def segment_mask(segment_ids: Array) -> Array:
    """(..., T, T) boolean mask of a packed sequence: True where query t and key s are of one segment.

    ``segment_ids`` (..., T) integers, one per token, equal within a document; a segment is a run
    of equal ids (``positions.segment_runs``: an id that comes back later is another document).
    """
    runs = segment_runs(jnp.asarray(segment_ids))
    return runs[..., :, None] == runs[..., None, :]


def padding_mask(lengths: ArrayLike, max_length: int, *, mask_queries: bool = False) -> Array:
    """Boolean mask from sequence lengths: (B,) -> (B, 1, 1, S), or (B, 1, T, S) with ``mask_queries``.

    True where key s < lengths[b] (S = T = ``max_length``), so padded keys get no
    weight. With ``mask_queries`` the rows of padded queries are masked too: they
    have no key at all, and their outputs are exactly zero. The head axis (size 1)
    makes it broadcastable to (B, H, T, S) for ``MultiHeadAttention``; for a
    single ``Head`` (weights (B, T, S)) take ``mask[:, 0]``.
    """
    lengths = jnp.asarray(lengths)
    if lengths.ndim != 1 or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be a (B,) integer array, got shape {lengths.shape} dtype {lengths.dtype}")
    pos = jnp.arange(operator.index(max_length))
    keys = pos[None, :] < lengths[:, None]  # (B, S)
    if not mask_queries:
        return keys[:, None, None, :]  # (B, 1, 1, S)
    return (keys[:, :, None] & keys[:, None, :])[:, None]  # (B, 1, T, S)


def as_mask(mask: ArrayLike | None) -> Array | None:
    """Check that ``mask`` is boolean (True = attend) and return it as an array; None passes through.

    A numeric mask is refused rather than guessed at: a 1/0 mask (Flax reads
    non-zero as attend) and an additive one (0 = keep, -inf = drop) mean
    opposite things, and the message gives the conversion for each.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(
            f"mask must be a boolean array (True = attend), got dtype {mask.dtype}: for a 1/0 mask (1 = attend, as "
            "Flax reads it) pass mask=(m != 0); for an additive mask (0 = keep, -inf = drop) pass bias=m, or "
            "mask=(m == 0)"
        )
    return mask


def resolve_scale(scale: ScaleLike, head_size: int) -> float | Array:
    """Turn a scaling rule into what multiplies q·kᵀ.

    ``"sqrt"`` -> head_size**-0.5, ``"none"`` -> 1.0, ``"mup"`` -> 1/head_size,
    a number (Python or numpy scalar) -> itself as a float. An array (numpy or
    JAX, a scalar or broadcastable to the (..., T, S) logits, e.g. (H, 1, 1) per
    head) is returned as a floating JAX array: a learnable temperature, or a
    scale vmapped over a population. Concrete values must be positive and
    finite; traced values (inside jit, vmap, grad) cannot be checked and pass.
    """
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(
                f"unknown attention scale {scale!r}: valid choices are "
                f"{', '.join(repr(s) for s in sorted(SCALES))}, a positive number or an array"
            )
        if isinstance(head_size, (bool, np.bool_)) or not isinstance(head_size, numbers.Integral) or head_size <= 0:
            raise ValueError(f"head_size must be a positive integer, got {head_size!r}")
        return float(SCALES[scale](operator.index(head_size)))
    if isinstance(scale, (bool, np.bool_)):  # bool is an int; True is never meant as a scale
        raise ValueError(f"attention scale must be one of {sorted(SCALES)}, a number or an array, got {scale!r}")
    if isinstance(scale, numbers.Real):  # Python and numpy scalars: a static float
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"attention scale must be a positive finite number, got {scale!r}")
        return float(scale)
    if isinstance(scale, jax.core.Tracer):  # a runtime value: nothing to check before it runs
        return scale if jnp.issubdtype(scale.dtype, jnp.floating) else scale.astype(jnp.float32)
    if isinstance(scale, (np.ndarray, jax.Array)):
        values = np.asarray(scale)
        if values.dtype == np.bool_ or not np.issubdtype(values.dtype, np.number):
            raise ValueError(f"attention scale array must be numeric, got dtype {values.dtype}")
        if not np.all(np.isfinite(values)) or not np.all(values > 0):
            raise ValueError(f"attention scale must be positive and finite, got {values!r}")
        scale = jnp.asarray(scale)
        return scale if jnp.issubdtype(scale.dtype, jnp.floating) else scale.astype(jnp.float32)
    raise ValueError(f"attention scale must be one of {sorted(SCALES)}, a positive number or an array, got {scale!r}")


def _is_static(scale: float | Array) -> bool:
    return isinstance(scale, (int, float))


# ---------------------------------------------------------------------------
# Weights and the weighted average
# ---------------------------------------------------------------------------


def attention_logits(q: Array, k: Array, *, scale: float | Array, softcap: float | None = None) -> Array:
    """Scaled affinities q·kᵀ·scale: (..., T, D), (..., S, D) -> (..., T, S), at least float32.

    ``softcap`` (a positive number, or None) bounds them smoothly to
    (-softcap, softcap): softcap·tanh(logits/softcap) (Gemma 2), which is
    close to the identity for logits much smaller than softcap.

    The dot products accumulate in float32 (as jax.nn.dot_product_attention's
    do): in float16 a sum of D products overflows its 65504 range long before
    the inputs do. Float32 logits cost 4 bytes per (t, s) entry; the softmax
    needs them in float32 anyway.
    """
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("...td,...sd->...ts", q, k, preferred_element_type=acc)
    logits = logits * jnp.asarray(scale, acc)
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)


def masked_softmax(logits: Array, mask: Array | None = None, sinks: Array | None = None) -> Array:
    """Softmax over the last axis in float32; masked entries get exactly 0.

    The fill value is the most negative *finite* float32, not -inf: a row whose
    every entry is masked would otherwise give exp(-inf - -inf) = NaN, and NaN
    poisons gradients even where the output is discarded. After the softmax the
    masked entries are set to exactly 0 (they are already ~0; this makes it
    exact, which the causality tests rely on). A fully masked row is all zeros.

    ``sinks`` (attention sinks, gpt-oss; broadcastable to the leading axes
    ``logits.shape[:-2]``, e.g. (H,)): one more logit per row that takes its
    share of the softmax and is then dropped, so a row's weights sum to
    1 - p_sink: a head can put weight "nowhere" instead of on some key.
    """
    logits = logits.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    if sinks is None:
        w = jax.nn.softmax(logits, axis=-1)
    else:
        sink = jnp.broadcast_to(jnp.asarray(sinks, jnp.float32)[..., None, None], (*logits.shape[:-1], 1))
        w = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]
    return w if mask is None else jnp.where(mask, w, 0.0)


def attention_weights(
    q: Array,
    k: Array,
    *,
    scale: float | Array,
    mask: Array | None = None,
    bias: Array | None = None,
    softcap: float | None = None,
    sinks: Array | None = None,
) -> Array:
    """softmax(cap(q·kᵀ·scale) + bias) over keys: (..., T, D), (..., S, D) -> (..., T, S) float32.

    ``sinks``: one extra logit per row that takes weight and is dropped (``masked_softmax``).

    ``softcap``: see ``attention_logits``; the bias is added after the cap, so a
    -inf in it still removes its edge.
    ``mask`` (boolean, broadcastable to (..., T, S), True = keep) zeroes the
    weights of the edges it removes; every row with at least one kept entry sums
    to 1, a row with none is all zeros. ``bias`` (float, broadcastable to
    (..., T, S)) is added to the scaled logits; a -inf in it acts as the most
    negative float32 (no NaN), but only ``mask`` makes a weight exactly 0.
    """
    logits = attention_logits(q, k, scale=scale, softcap=softcap)
    if bias is not None:
        logits = jnp.maximum(logits + jnp.asarray(bias, logits.dtype), jnp.finfo(logits.dtype).min)
    return masked_softmax(logits, as_mask(mask), sinks)


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float | Array,
    mask: Array | None = None,
    bias: Array | None = None,
    weights_hook: Callable[[Array], Array] | None = None,
    softcap: float | None = None,
    sinks: Array | None = None,
) -> Array:
    """Weighted average of values: (..., T, D), (..., S, D), (..., S, Dv) -> (..., T, Dv).

    The dense path: the (..., T, S) weights are materialized, and
    ``weights_hook`` (if given) sees them before they average the values: the
    Flax modules record them there and apply attention-weight dropout.
    """
    w = attention_weights(q, k, scale=scale, mask=mask, bias=bias, softcap=softcap, sinks=sinks)  # (..., T, S) f32
    if weights_hook is not None:
        w = weights_hook(w)
    return jnp.einsum("...ts,...sd->...td", w.astype(v.dtype), v)


# ---------------------------------------------------------------------------
# One dispatcher over the attention backends
# ---------------------------------------------------------------------------

# "dense": the functions above; the only backend that materializes the weights, so the
#          only one that records them and applies dropout to them.
# "xla" / "cudnn": jax.nn.dot_product_attention with that implementation (cudnn: GPU only).
# "blockwise": flash-style tiles in pure JAX (attention_jax.blockwise), causal self-attention
#              without mask or bias only, O(T) memory.
# "splash": the TPU's fused Pallas kernel (attention_jax.splash), self-attention without mask or
#           bias arrays; off TPU interpreted (for tests).
ATTENTION_IMPLS = ("dense", "xla", "cudnn", "blockwise", "splash")


def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float | Array,
    mask: Array | None = None,
    bias: Array | None = None,
    causal: bool = False,
    impl: str = "dense",
    weights_hook: Callable[[Array], Array] | None = None,
    softcap: float | None = None,
    window: int | None = None,
    sinks: Array | None = None,
    alibi: Array | None = None,
    segment_ids: Array | None = None,
) -> Array:
    """Attention by one of ``ATTENTION_IMPLS``: (..., T, D), (..., S, D), (..., S, Dv) -> (..., T, Dv).

    ``impl``: ``"dense"`` (hand-written; the only one that calls
    ``weights_hook``), ``"xla"`` or ``"cudnn"`` (jax.nn.dot_product_attention;
    cudnn needs a GPU and float16/bfloat16), ``"blockwise"`` (flash-style, causal
    self-attention only: it refuses a mask or bias). ``mask`` (boolean,
    broadcastable to (..., T, S), True = attend) and ``causal`` (the
    lower-triangular mask, aligned so the last query sees the last key) combine;
    a query row with no key left gives exactly zero output on every impl.
    ``bias`` (float, broadcastable to (..., T, S)) is added to the logits.
    ``softcap`` caps the scaled logits (see ``attention_logits``): "dense",
    "blockwise" and "splash". ``window`` W (with ``causal``) lets each query see only
    the last W keys, itself included (``causal_mask``); "blockwise" skips the
    tiles outside it, "xla" and "cudnn" take it as jax.nn's ``local_window_size``
    where they can (self-attention without a mask), else as part of the mask.
    ``sinks`` (sink logits, broadcastable to the leading axes: ``masked_softmax``):
    "xla" and "cudnn" take them as one more key of zeros with the sink as its bias.
    ``alibi`` (slopes, broadcastable to the leading axes: ``positions.alibi_bias``)
    adds -slope·|t - s| to the logits, the queries being the last T of S positions.
    ``segment_ids`` (broadcastable to q's (..., T); self-attention): a packed
    sequence, whose tokens see only the tokens of their own segment
    (``segment_mask``); "blockwise" and "splash" take them as ids, not as a mask.
    """
    check_choice("attention impl", impl, ATTENTION_IMPLS)
    if softcap is not None and impl in ("xla", "cudnn"):
        raise ValueError(f"attention impl {impl!r} cannot soft-cap the logits; use impl='dense' or 'blockwise'")
    if window is not None:
        window = as_int("window", window)
        if not causal:
            raise ValueError("window (sliding-window attention) needs causal=True")
    mask = as_mask(mask)
    T, S = q.shape[-2], k.shape[-2]
    if segment_ids is not None:
        segment_ids = segment_runs(check_segment_ids(segment_ids, q.shape[:-1]))  # the kernels compare run indices
        if T != S:
            raise ValueError(f"segment_ids: packed sequences are for self-attention, got {T} queries and {S} keys")
    for name, extra in (("mask", mask), ("bias", bias)):
        if extra is not None and jnp.ndim(extra) > q.ndim:
            raise ValueError(
                f"{name} of shape {jnp.shape(extra)} has more axes than the weights (..., T, S) of queries "
                f"{q.shape}; it must broadcast to (..., {T}, {S})"
            )
    if impl == "splash":
        if mask is not None or bias is not None or alibi is not None or T != S:
            raise ValueError(
                "attention impl 'splash' computes self-attention with static masks only (causal, window) and "
                "takes no mask, bias or ALiBi; use impl='dense', 'xla' or 'blockwise' for those"
            )
        return splash_attention(
            q, k, v, scale=scale, causal=causal, window=window, softcap=softcap, sinks=sinks, segment_ids=segment_ids
        )
    if impl == "blockwise":
        if not causal or mask is not None or bias is not None or T != S:
            raise ValueError(
                "attention impl 'blockwise' computes causal self-attention only and takes no mask or bias; "
                "use impl='dense' or 'xla' for masks, biases, cross-attention or causal=False"
            )
        if not _is_static(scale):  # its custom VJP takes a static scale: fold a runtime one into q
            q, scale = (q * scale).astype(q.dtype), 1.0
        k, v = _to_query_heads(q, k), _to_query_heads(q, v)  # grouped kv heads: copied per query head
        return blockwise_causal_attention(
            q, k, v, scale=scale, softcap=softcap, window=window, sinks=sinks, alibi=alibi, segment_ids=segment_ids
        )
    if segment_ids is not None:
        mask = _and(mask, segment_mask(segment_ids))
    if alibi is not None:
        bias = _add(bias, alibi_bias(alibi, jnp.arange(S - T, S), jnp.arange(S)))
    if impl != "dense" and sinks is not None:  # jax.nn has no sinks: a zero key whose bias is the sink
        return _attend_with_a_sink_key(q, k, v, sinks, scale=scale, mask=mask, bias=bias, causal=causal, impl=impl,
                                       window=window)  # fmt: skip
    if impl != "dense" and causal and mask is None and T == S:  # jax.nn's own causal (and local) masking
        if not _is_static(scale):
            q, scale = (q * scale).astype(q.dtype), 1.0
        local = None if window is None else (window - 1, 0)
        return _jax_nn_attention(q, k, v, scale=scale, bias=bias, implementation=impl, is_causal=True, local=local)
    if causal:
        mask = _and(mask, causal_mask(T, S, window))
    if impl == "dense":
        return dot_product_attention(
            q, k, v, scale=scale, mask=mask, bias=bias, weights_hook=weights_hook, softcap=softcap, sinks=sinks
        )
    if not _is_static(scale):  # jax.nn wants one number; an array (per head, traced) goes into q
        q, scale = (q * scale).astype(q.dtype), 1.0
    out = _jax_nn_attention(q, k, v, scale=scale, mask=mask, bias=bias, implementation=impl)
    if mask is not None:  # jax.nn averages a row with no key uniformly; make it zero like "dense"
        out = jnp.where(jnp.any(mask, axis=-1, keepdims=True), out, 0.0).astype(out.dtype)
    return out


def check_segment_ids(segment_ids: ArrayLike, shape: tuple[int, ...]) -> Array:
    """``segment_ids`` as an integer array broadcastable to ``shape`` (..., T); else one ``ValueError``."""
    segment_ids = jnp.asarray(segment_ids)
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integers (one id per token), got dtype {segment_ids.dtype}")
    try:
        jnp.broadcast_shapes(segment_ids.shape, shape)
    except ValueError:
        raise ValueError(
            f"segment_ids of shape {segment_ids.shape} do not fit the tokens: they must broadcast to {shape}"
        ) from None
    if segment_ids.shape[-1:] != shape[-1:]:
        raise ValueError(f"segment_ids of shape {segment_ids.shape}: one id per token, {shape[-1]} on the last axis")
    return segment_ids


def _to_query_heads(q: Array, x: Array) -> Array:
    """Keys or values (..., S, D) broadcast to the queries' leading axes: a shared kv head copied for each of
    its query heads (what "blockwise" needs; autodiff sums their gradients back)."""
    return jnp.broadcast_to(x, (*jnp.broadcast_shapes(q.shape[:-2], x.shape[:-2]), *x.shape[-2:]))


def _groups(q: Array, k: Array, v: Array) -> int:
    """G when k, v (..., 1, S, D) are shared by the G heads of q (..., G, T, D) (grouped-query attention's
    layout, ``group_heads``), else 1."""
    if q.ndim < 3 or k.ndim != q.ndim or v.ndim != q.ndim or q.shape[-3] == 1:
        return 1
    shared = k.shape[-3] == v.shape[-3] == 1 and k.shape[:-3] == v.shape[:-3] == q.shape[:-3]
    return q.shape[-3] if shared else 1


def _and(mask: Array | None, other: Array) -> Array:
    return other if mask is None else jnp.logical_and(mask, other)


def _add(bias: Array | None, other: Array) -> Array:
    return other if bias is None else bias + other


def _attend_with_a_sink_key(q, k, v, sinks, *, scale, mask, bias, causal, impl, window):
    """Sinks on jax.nn's attention: key S+1 is zeros (logit 0) with the sink as its bias, its value zeros.

    Its weight is then exp(sink) / Z, exactly the sink's share, and it adds nothing to the output.
    """
    *lead, T, S = (*jnp.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]), q.shape[-2], k.shape[-2])
    pad = lambda x: jnp.concatenate([jnp.broadcast_to(x, (*lead, *x.shape[-2:])),
                                     jnp.zeros((*lead, 1, x.shape[-1]), x.dtype)], axis=-2)  # fmt: skip
    keep = jnp.ones((T, S), bool) if not causal else causal_mask(T, S, window)
    keep = jnp.broadcast_to(_and(mask, keep), (*lead, T, S))
    keep = jnp.concatenate([keep, jnp.ones((*lead, T, 1), bool)], axis=-1)  # the sink is always seen
    bias = jnp.zeros((T, S), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    bias = jnp.broadcast_to(bias, (*lead, T, S))
    sink = jnp.broadcast_to(jnp.asarray(sinks, jnp.float32)[..., None, None], (*lead, T, 1))
    if not _is_static(scale):
        q, scale = (q * scale).astype(q.dtype), 1.0
    # Rows the mask empties would put all their weight on the sink and give 0: as the other paths do.
    return _jax_nn_attention(q, pad(k), pad(v), scale=scale, mask=keep, bias=jnp.concatenate([bias, sink], -1),
                             implementation=impl)  # fmt: skip


def _jax_nn_attention(q, k, v, *, scale, bias, implementation, mask=None, is_causal=False, local=None):
    """jax.nn.dot_product_attention on (..., T, D) arrays: leading axes become its batch, one head each.

    Keys and values shared by G query heads (``_groups``: grouped-query attention) become its
    own grouped form, G query heads over one kv head, so they are not copied per head.
    """
    *lead, T, D = q.shape
    S, Dv = k.shape[-2], v.shape[-1]
    G = _groups(q, k, v)
    if G == 1:
        k, v = _to_query_heads(q, k), _to_query_heads(q, v)
    n = math.prod(lead) // G
    heads_last = lambda a, t, d, g: jnp.swapaxes(a.reshape(n, g, t, d), 1, 2)  # (..., g, t, d) -> (n, t, g, d)
    as_bnts = lambda a: None if a is None else jnp.broadcast_to(a, (*lead, T, S)).reshape(n, G, T, S)
    out = jax.nn.dot_product_attention(
        heads_last(q, T, D, G), heads_last(k, S, D, 1), heads_last(v, S, Dv, 1),
        scale=scale, mask=as_bnts(mask), bias=as_bnts(bias), implementation=implementation,
        is_causal=is_causal, local_window_size=local,
    )  # fmt: skip
    return jnp.swapaxes(out, 1, 2).reshape(*lead, T, Dv)


# ---------------------------------------------------------------------------
# Shared by the Linen and NNX shells: projections into heads, the decode cache,
# and one attention layer's core. The shells only own parameters, norms,
# dropout and where the cache lives.
# ---------------------------------------------------------------------------


def _heads_in(x: Array, w: Array) -> Array:
    """x (..., T, C) times w (C, n, H, D) -> (n, ..., H, T, D), the head-major layout.

    Two forms of the same product, picked by XLA's behaviour on CPU: for a
    single position (a decode step) a 2-D matmul against the kernel flattened
    to (C, nHD), because as an einsum XLA transposed the kernel itself at every
    call (in a decode loop, a 200 KB copy per layer per token, and 5x the
    projection's time); for longer inputs the einsum, which XLA lays out about
    10% faster there (forward+backward of a layer at B 8, T 256).
    """
    C, n, H, D = w.shape
    if x.shape[-2] != 1:
        return jnp.einsum("...tc,cnhd->n...htd", x, w)
    y = (x @ w.reshape(C, n * H * D)).reshape(*x.shape[:-1], n, H, D)  # (..., 1, n, H, D)
    return jnp.moveaxis(y, (-3, -2), (0, -3))


def projection_shapes(C: int, H: int, D: int, K: int | None = None, *, bias: bool = False,
                      C_kv: int | None = None) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """The q, k, v projection parameters of an attention layer, name -> shape.

    H query heads and K kv heads (None: H) of size D, from C channels (keys and values from
    ``C_kv``, None: C). One fused kernel ``qkv_kernel`` (C, 3, H, D) when K = H and C_kv = C
    (one matmul for all three; biases ``qkv_bias`` (3, H, D)); else ``query_kernel`` (C, H, D)
    and ``kv_kernel`` (C_kv, 2, K, D) (biases ``query_bias`` (H, D), ``kv_bias`` (2, K, D)).
    """
    K = H if K is None else K
    C_kv = C if C_kv is None else C_kv
    if K == H and C_kv == C:
        shapes = {"qkv_kernel": (C, 3, H, D)}
        return shapes | ({"qkv_bias": (3, H, D)} if bias else {})
    shapes = {"query_kernel": (C, H, D), "kv_kernel": (C_kv, 2, K, D)}
    return shapes | ({"query_bias": (H, D), "kv_bias": (2, K, D)} if bias else {})


def _heads_plus(x: Array, w: Array, b: Array | None) -> Array:
    """``_heads_in`` plus a bias (n, H, D): (n, ..., H, T, D)."""
    y = _heads_in(x, w)
    if b is None:
        return y
    n, H, D = b.shape
    return y + b.reshape(n, *(1,) * (y.ndim - 4), H, 1, D).astype(y.dtype)


def project_qkv(
    params: dict[str, Array], inputs_q: Array, inputs_kv: Array | None = None, dtype: jnp.dtype | None = None
) -> tuple[Array, Array, Array]:
    """Queries, keys, values in head-major layout from an attention layer's ``params`` (``projection_shapes``).

    Self-attention: inputs_q (..., T, C) -> q (..., H, T, D), k, v (..., K, T, D), the layout
    the attention einsums want. Cross-attention: keys and values from inputs_kv (..., S, C_kv),
    C_kv = C for the fused ``qkv_kernel`` (the same kernel's k and v slices).
    """
    dtype = dtype or inputs_q.dtype
    cast = lambda name: None if name not in params else params[name].astype(dtype)
    x_q = inputs_q.astype(dtype)
    x_kv = x_q if inputs_kv is None else inputs_kv.astype(dtype)
    if "qkv_kernel" in params:
        w, b = cast("qkv_kernel"), cast("qkv_bias")
        if inputs_kv is None:
            q, k, v = _heads_plus(x_q, w, b)
            return q, k, v
        if inputs_kv.shape[-1] != w.shape[0]:
            raise ValueError(
                f"inputs_kv must have the same {w.shape[0]} channels as inputs_q (keys and values use the same "
                f"fused kernel; a layer built for inputs_kv of another width has its own), got shape {inputs_kv.shape}"
            )
        (q,) = _heads_plus(x_q, w[:, :1], None if b is None else b[:1])  # (..., H, T, D)
        k, v = _heads_plus(x_kv, w[:, 1:], None if b is None else b[1:])  # (..., H, S, D) each
        return q, k, v
    w_kv = cast("kv_kernel")
    if x_kv.shape[-1] != w_kv.shape[0]:
        raise ValueError(f"inputs_kv must have {w_kv.shape[0]} channels (kv_kernel), got shape {x_kv.shape}")
    b_q = cast("query_bias")
    (q,) = _heads_plus(x_q, cast("query_kernel")[:, None], None if b_q is None else b_q[None])  # (..., H, T, D)
    k, v = _heads_plus(x_kv, w_kv, cast("kv_bias"))  # (..., K, S, D) each
    return q, k, v


def project_out(out: Array, w_out: Array, bias: Array | None = None, dtype: jnp.dtype | None = None) -> Array:
    """Heads back to channels: out (..., H, T, D), w_out (H, D, C') -> (..., T, C'), plus bias (C',).

    Like ``_heads_in``: a 2-D matmul for a single position, an einsum otherwise.
    """
    dtype = dtype or out.dtype
    H, D, C_out = w_out.shape
    out, w_out = out.astype(dtype), w_out.astype(dtype)
    if out.shape[-2] != 1:
        y = jnp.einsum("...htd,hdc->...tc", out, w_out)
    else:
        out = jnp.swapaxes(out, -3, -2)  # (..., 1, H, D)
        y = out.reshape(*out.shape[:-2], H * D) @ w_out.reshape(H * D, C_out)
    return y if bias is None else y + bias.astype(dtype)


def cache_append(cached_k: Array, cached_v: Array, index: Array, k: Array, v: Array) -> tuple[Array, Array, Array]:
    """Write T new keys/values (..., T, D) into slots [index, index + T) of the caches (..., S, D).

    Returns the updated caches and index + T. The caller keeps index + T <= S
    (``lax.dynamic_update_slice`` would clamp, silently overwriting the last slots).
    """
    k_all = lax.dynamic_update_slice_in_dim(cached_k, k.astype(cached_k.dtype), index, axis=-2)
    v_all = lax.dynamic_update_slice_in_dim(cached_v, v.astype(cached_v.dtype), index, axis=-2)
    return k_all, v_all, index + k.shape[-2]


def cache_shape(k: Array, window: int | None = None) -> tuple[int, int, int]:
    """The (N, S, D) shape of a cache for keys k (..., S, D): every leading axis (batch, kv heads) in N.

    One flat leading axis, not batch first (B, K, S, D): measured side by side
    (``benchmarks.decode --layouts``, the same model and code, only the cache's shape
    differs), a batch-first cache decodes as fast at batch 8 but at 0.43x the tokens/s
    at batch 1, where XLA on CPU copies the whole (1, K, S, D) cache at every step
    (a size-1 batch axis; batches of 2 and 4 do not). ``attention_heads`` takes either
    layout, and Flax's (batch..., S, K, D) cache is what the Flax-compatible classes
    keep (``flax_api``), for Flax's beam search. A layer with a ``window`` W keeps at
    most W slots (a ring buffer, ``ring_attend``).
    """
    S = k.shape[-2] if window is None else min(k.shape[-2], window)
    return math.prod(k.shape[:-2]), S, k.shape[-1]


def ring_positions(index: Array, slots: int) -> Array:
    """The position each slot of a ring cache holds after ``index`` tokens: (slots,), negative = empty.

    Position p lives in slot p mod slots, so slot j holds the latest p < index with p = j (mod slots).
    """
    j = jnp.arange(slots)
    return index - 1 - jnp.mod(index - 1 - j, slots)


def ring_attend(
    q, k, v, cache, *, window: int, alibi: Array | None = None, as_keys: Callable = lambda a: a, **attend_kwargs
) -> tuple[Array, tuple[Array, Array, Array]]:
    """Decode through a sliding window's ring cache: q, k, v (..., T, D) new rows, cache (..., W, D) x 2 + index.

    The T new queries (positions index..index+T-1) attend over the W cached
    slots and the T new keys together, each seeing the keys at positions
    p - W < s <= p of its own position p; then the last min(T, W) new keys
    and values overwrite their slots. The cache's memory is W rows whatever
    the context's length, and a chunk longer than W still sees every key it
    needs (a ring of W alone would have overwritten them). ``alibi`` slopes
    (the rows' leading axes) bias each key by its true position. ``as_keys`` turns the
    (..., W + T, D) keys and values into what q reads (grouped queries (..., G, T, D):
    (..., 1, W + T, D)).
    """
    cached_k, cached_v, index = cache
    T, W = q.shape[-2], cached_k.shape[-2]
    key_pos = jnp.concatenate([ring_positions(index, W), index + jnp.arange(T)])  # (W + T,)
    query_pos = (index + jnp.arange(T))[:, None]  # (T, 1)
    mask = (key_pos >= 0) & sees(query_pos, key_pos, window)  # (T, W + T)
    keys = jnp.concatenate([cached_k, k.astype(cached_k.dtype)], axis=-2)
    values = jnp.concatenate([cached_v, v.astype(cached_v.dtype)], axis=-2)
    bias = None if alibi is None else alibi_bias(alibi, query_pos[:, 0], key_pos)  # (N, T, W + T)
    out = attend(q, as_keys(keys), as_keys(values), mask=mask, bias=bias, **attend_kwargs)
    m = min(T, W)  # the newest m keys are the ones a later query can still see
    slots = jnp.mod(index + T - m + jnp.arange(m), W)
    new_k = cached_k.at[..., slots, :].set(k[..., T - m :, :].astype(cached_k.dtype))
    new_v = cached_v.at[..., slots, :].set(v[..., T - m :, :].astype(cached_v.dtype))
    return out, (new_k, new_v, index + T)


def logn_factor(s: float | Array, query_positions: Array, *, causal: bool, window: int | None, n_keys) -> Array:
    """Scalable-Softmax's s·log(n) per query: (..., T, 1) from s (a number or (...)) and positions (..., T).

    n is the number of keys the query may see: position + 1 causally (at most
    ``window``), else ``n_keys``. A query that sees one key gets factor 0,
    which changes nothing: its one weight is 1 at any logit.
    """
    n = query_positions + 1 if causal else jnp.broadcast_to(n_keys, query_positions.shape)
    if window is not None:
        n = jnp.minimum(n, window)
    log_n = jnp.log(n.astype(jnp.float32))[..., None]  # (..., T, 1)
    return jnp.asarray(s, jnp.float32)[..., None, None] * log_n


def decode_mask(index: Array, T: int, S: int, *, causal: bool = True, window: int | None = None) -> Array:
    """(T, S) mask of T new queries at positions index..index+T-1 over S cache slots.

    Slots not yet written (s >= index + T) are masked; with ``causal`` query t
    also sees no slot after its own position (s <= index + t), and with
    ``window`` W none W or more before it (s > index + t - W).
    """
    s = jnp.arange(S)[None, :]
    if causal:
        return sees(index + jnp.arange(T)[:, None], s, window)
    return jnp.broadcast_to(s < index + T, (T, S))


def group_heads(x: ArrayLike | None, num_heads: int, num_kv_heads: int, tail: int) -> ArrayLike | None:
    """A per-head array (..., H, *tail) in grouped-query attention's layout (..., K, G, *tail), G = H / K.

    Query head h = k·G + g uses kv head k = h // G (the order of Flax's and Hugging Face's
    ``repeat_kv``); the K kv heads of keys and values then broadcast over the G axis without
    being copied. ``tail`` counts the axes after the head axis (2 for q (..., H, T, D) and for
    masks (..., H, T, S); 0 for per-head numbers such as sinks (H,)). An array with a head
    axis of 1 gets (1, 1) there; one with too few axes to have a head axis, or a number,
    broadcasts as it is and is returned unchanged.
    """
    if x is None or isinstance(x, numbers.Number) or jnp.ndim(x) <= tail:
        return x
    x = jnp.asarray(x)
    axis = x.ndim - tail - 1
    h = x.shape[axis]
    if h not in (1, num_heads):
        raise ValueError(
            f"an array of shape {x.shape} has {h} heads on axis {axis - x.ndim}; it must have 1 or {num_heads}"
        )
    groups = (num_kv_heads, num_heads // num_kv_heads) if h == num_heads else (1, 1)
    return x.reshape(*x.shape[:axis], *groups, *x.shape[axis + 1 :])


def attention_heads(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float | Array,
    causal: bool,
    impl: str,
    rope: bool,
    mask: Array | None = None,
    bias: Array | None = None,
    cache: tuple[Array, Array, Array] | None = None,
    weights_hook: Callable[[Array], Array] | None = None,
    softcap: float | None = None,
    window: int | None = None,
    sinks: Array | None = None,
    alibi: Array | None = None,
    logn: float | Array | None = None,
    qk_hook: Callable[[Array, Array], None] | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, tuple[Array, Array, Array] | None]:
    """One attention layer after the projections (and the optional q/k norms).

    q (..., T, D), k, v (..., S, D) -> (out (..., T, D), new cache). Applies
    rotary encoding when ``rope``, then attends with ``impl``; with ``cache =
    (cached_k, cached_v, index)`` (decode mode: caches (..., S_cache, D), batch
    first, whose leading axes hold as many rows N as k's (``cache_shape``: (B, K,
    S_cache, D) for a layer; a flat (N, S_cache, D) works too, and a cache comes
    back in the shape it came in); k, v hold the T new positions) it first writes
    k and v into the cache and attends over it.

    In decode mode the new tokens' positions are index..index+T-1 (rope
    rotates by them before caching), the mask is ``decode_mask`` combined with
    ``mask`` (broadcastable to (..., T, S_cache)), an array scale must
    broadcast to (..., 1, 1) (one per head, say), and "blockwise", "cudnn" and
    "splash" run as "dense" (a decode step's few query rows need no tiling). Writing past
    the end of the cache is a caller error; the output is then NaN, not wrong
    numbers. A ``window`` layer whose cache has W slots (``cache_shape``:
    contexts longer than W) decodes through the ring (``ring_attend``): no
    overflow, no ``mask`` or ``bias`` over slots (slots do not stay at one
    position), and the weights it records are over (W cached + T new) keys.

    ``sinks`` (sink logits) and ``alibi`` (slopes), each broadcastable to q's
    leading axes (per head: (H,)), see ``attend``; decoding gives ALiBi the
    tokens' true positions. ``logn`` s (a number, or per head like the sinks)
    is Scalable-Softmax (Nakanishi 2025): query t's logits times s·log(n_t),
    n_t the number of keys it may see (t + 1 causally, at most the window;
    S without a causal mask), applied to q, so every backend takes it.
    ``qk_hook(q, k)``, if given, sees the T queries and keys as attention takes
    them (after rope and log-n): the Flax modules record them for diagnostics.
    ``segment_ids`` (broadcastable to q's (..., T)): a packed sequence of
    documents, each attending only within itself, its positions (rope, log-n)
    restarting at 0 (``positions.segment_positions``); not with a cache.

    Grouped-query attention (Ainslie et al. 2023; multi-query when K = 1, Shazeer 2019): k, v
    (..., K, S, D) with fewer heads K than q's (..., H, T, D), K dividing H; query head h reads
    kv head h // (H / K) (``group_heads``), and the cache holds the K kv heads only.
    """
    H, K = (q.shape[-3], k.shape[-3]) if q.ndim >= 3 and k.ndim == q.ndim else (1, 1)
    if H != K:
        if H % K or v.shape[-3] != K:
            raise ValueError(
                f"grouped-query attention: keys {k.shape} and values {v.shape} must have the same number of heads, "
                f"dividing the queries' {H} ({q.shape})"
            )
        heads = lambda x, tail: group_heads(x, H, K, tail)
        q, k, v = heads(q, 2), k[..., None, :, :], v[..., None, :, :]  # (..., K, G, T, D), (..., K, 1, S, D)
        mask, bias, segment_ids = heads(mask, 2), heads(bias, 2), heads(segment_ids, 1)
        scale = scale if _is_static(scale) else heads(scale, 2)
        sinks, alibi = heads(sinks, 0), heads(alibi, 0)
        logn = logn if logn is None or _is_static(logn) else heads(logn, 0)
        merge = lambda a: a.reshape(*a.shape[:-4], H, *a.shape[-2:])  # (..., K, G, T, X) -> (..., H, T, X)
        if weights_hook is not None:  # the hook sees the weights per query head, (..., H, T, S)
            hook = weights_hook
            weights_hook = lambda w: hook(merge(w)).reshape(w.shape)
        if qk_hook is not None:  # and the queries (..., H, T, D) and the K keys (..., K, S, D)
            qk = qk_hook
            qk_hook = lambda q, k: qk(merge(q), k[..., 0, :, :])
    else:
        K = 0  # not grouped
    out, new = _attention_heads(
        q, k, v, scale=scale, causal=causal, impl=impl, rope=rope, mask=mask, bias=bias, cache=cache,
        weights_hook=weights_hook, softcap=softcap, window=window, sinks=sinks, alibi=alibi, logn=logn,
        qk_hook=qk_hook, segment_ids=segment_ids,
    )  # fmt: skip
    return (out, new) if not K else (merge(out), new)


def _attention_heads(
    q, k, v, *, scale, causal, impl, rope, mask, bias, cache, weights_hook, softcap, window, sinks, alibi, logn,
    qk_hook, segment_ids,
):  # fmt: skip
    """``attention_heads`` after grouping: k, v (..., 1, S, D) shared by the G heads of q (..., G, T, D)."""
    index = 0 if cache is None else cache[2]
    T, S_new = q.shape[-2], k.shape[-2]
    q_pos, k_pos = index + (S_new - T) + jnp.arange(T), index + jnp.arange(S_new)
    n_keys = index + S_new
    if segment_ids is not None:
        if cache is not None:
            raise ValueError(
                "segment_ids: packed sequences are for training and scoring; decode one document at a time"
            )
        segment_ids = check_segment_ids(segment_ids, q.shape[:-1])
        q_pos = k_pos = segment_positions(segment_ids)
    if rope:
        q, k = apply_rope(q, q_pos), apply_rope(k, k_pos)
    if logn is not None:
        if segment_ids is not None and not causal:  # all of its own document's keys
            n_keys = jnp.sum(segment_mask(segment_ids), axis=-1)
        q = (q * logn_factor(logn, q_pos, causal=causal, window=window, n_keys=n_keys)).astype(q.dtype)
    if qk_hook is not None:
        qk_hook(q, k)
    if cache is None:
        out = attend(
            q, k, v, scale=scale, mask=mask, bias=bias, causal=causal, impl=impl, weights_hook=weights_hook,
            softcap=softcap, window=window, sinks=sinks, alibi=alibi, segment_ids=segment_ids,
        )  # fmt: skip
        return out, None
    *lead, T, _ = q.shape
    rows_shape = cache[0].shape[:-2]  # the cache's leading axes: batch first (B, K), or flat (N,)
    S = cache[0].shape[-2]
    N = math.prod(rows_shape)
    G = _groups(q, k, v)  # grouped: the cache rows are batch x kv heads, each read by G query heads
    kv_lead = (*lead[:-1], 1) if G > 1 else lead
    if math.prod(kv_lead) != N:
        raise ValueError(
            f"decode: the cache holds {N} rows (batch x kv heads), the queries {q.shape} need "
            f"{math.prod(kv_lead)}; initialize the cache for this batch size"
        )
    # Everything is laid out on the cache's own leading axes (reshapes that are no-ops for a layer's cache):
    # a batch-first (B, K, S, D) cache read through a flat view was copied at every step by XLA on CPU.
    row_shape = (*rows_shape, G) if G > 1 else rows_shape
    rows = lambda a, *tail: jnp.broadcast_to(a, (*lead, *tail)).reshape(*row_shape, *tail)  # (*rows, [G,] *tail)
    kv_rows = lambda a: jnp.broadcast_to(a, (*kv_lead, *a.shape[-2:])).reshape(*rows_shape, *a.shape[-2:])
    as_keys = (lambda a: a[..., None, :, :]) if G > 1 else (lambda a: a)  # (*rows, S, D) as grouped queries read
    impl = "dense" if impl in ("blockwise", "cudnn", "splash") else impl  # a few rows need no fused kernel
    q, k, v = rows(q, T, q.shape[-1]), kv_rows(k), kv_rows(v)  # (*rows, [G,] T, D), (*rows, T, D)
    if sinks is not None:
        sinks = rows(sinks)  # (*rows, [G])
    if not _is_static(scale) and jnp.ndim(scale):
        scale = rows(scale, 1, 1)
    hook = None
    if weights_hook is not None:  # the hook sees the weights in their (..., T, keys) shape
        hook = lambda w: weights_hook(w.reshape(*lead, T, -1)).reshape(w.shape)
    if window is not None and S == window:  # a ring of the last W keys
        if mask is not None or bias is not None:
            raise ValueError(
                "decode: a window layer's ring cache takes no mask or bias (its slots hold changing positions); "
                "decode without them, or give the layer a cache shorter than its window"
            )
        out, new = ring_attend(
            q, k, v, cache, window=window, scale=scale, impl=impl, weights_hook=hook, softcap=softcap, sinks=sinks,
            alibi=None if alibi is None else rows(alibi), as_keys=as_keys,
        )  # fmt: skip
        return out.reshape(*lead, T, -1), new
    flat_mask = decode_mask(index, T, S, causal=causal, window=window)  # (T, S)
    if mask is not None:
        flat_mask = rows(as_mask(mask), T, S) & flat_mask
    flat_bias = None if bias is None else rows(bias, T, S)
    if alibi is not None:
        flat_bias = _add(flat_bias, rows(alibi_bias(alibi, index + jnp.arange(T), jnp.arange(S)), T, S))
    k, v, new_index = cache_append(cache[0], cache[1], index, k, v)
    out = attend(
        q, as_keys(k), as_keys(v), scale=scale, mask=flat_mask, bias=flat_bias, impl=impl, weights_hook=hook,
        softcap=softcap, sinks=sinks,
    )  # fmt: skip
    out = jnp.where(new_index <= S, out, jnp.nan).reshape(*lead, T, -1)  # overflowing the cache: loud
    return out, (k, v, new_index)


# ---------------------------------------------------------------------------
# The lecture's three equivalent ways for token t to average tokens 0..t.
# They are the teaching entry point: the third is attention with all
# affinities equal to zero, and real attention only replaces those zeros by
# data-dependent q·k.
# ---------------------------------------------------------------------------


def average_past_loop(x: Array) -> Array:
    """Version 1: an explicit loop over time. x (B, T, C) -> (B, T, C).

    out[b, t] = mean(x[b, :t+1]). Clear and slow: T separate reductions.
    """
    T = x.shape[-2]
    rows = [jnp.mean(x[..., : t + 1, :], axis=-2) for t in range(T)]
    return jnp.stack(rows, axis=-2)


def average_past_matmul(x: Array) -> Array:
    """Version 2: one matmul with a row-normalized lower-triangular matrix.

    W[t, s] = 1/(t+1) for s <= t, else 0; out = W @ x. x (B, T, C) -> (B, T, C).
    """
    T = x.shape[-2]
    w = jnp.tril(jnp.ones((T, T), x.dtype))
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    return jnp.einsum("ts,...sc->...tc", w, x)


def average_past_softmax(x: Array) -> Array:
    """Version 3: softmax of a zero matrix whose future is masked to -inf.

    Zero affinities everywhere means uniform weights over the visible past;
    this is attention with q·kᵀ replaced by 0. x (B, T, C) -> (B, T, C).
    """
    T = x.shape[-2]
    affinities = jnp.zeros((T, T), jnp.float32)
    affinities = jnp.where(causal_mask(T), affinities, -jnp.inf)  # every row keeps s=0: no NaN
    w = jax.nn.softmax(affinities, axis=-1).astype(x.dtype)
    return jnp.einsum("ts,...sc->...tc", w, x)
