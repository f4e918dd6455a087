"""Blockwise (online-softmax, flash-style) causal attention in pure JAX.

``blockwise_causal_attention(q, k, v, scale=...)`` takes q, k (..., T, D) and
v (..., T, Dv), any leading batch/head axes, and returns (..., T, Dv): the same
numbers as ``attention.dot_product_attention(q, k, v, scale=scale,
mask=causal_mask(T))``, computed without ever forming the (T, T) matrix.

How. Queries are cut into blocks of ``block_q`` rows and keys/values into
blocks of ``block_k``. For one query block the loop visits only the key blocks
that hold some key s <= t, i.e. the blocks on or below the diagonal (a
``fori_loop`` whose trip count depends on the query block); blocks above it
are never touched, which halves the work of a causal product. Blocks strictly
below the diagonal need no mask; only the diagonal ones are masked.

Why it equals the dense path. Softmax over a row is exp(s - m) / sum exp(s - m)
for any constant m. Walking the key blocks left to right we keep, per query
row, the running max m, the running denominator l = sum exp(s - m) and the
running numerator acc = sum exp(s - m) v. When a block raises the max from m
to m', the old sums are rescaled by exp(m - m'), so after the last block acc / l
is exactly the softmax-weighted average; only the order of the float additions
differs from the dense path (differences ~1e-6 relative in float32).

Gradients. A ``jax.custom_vjp`` saves only q, k, v, the output and the per-row
logsumexp L = m + log l (..., T). The backward pass walks the same blocks,
recomputes each block's probabilities p = exp(s - L) and forms dv += pᵀ·dO,
dp = dO·vᵀ, ds = p·(dp - rowsum(dO·O)), dq += ds·k·scale, dk += dsᵀ·q·scale
(FlashAttention-2, Dao 2023). Differentiating through the loops instead would
make autodiff store every block's intermediates: T² memory again.

Cost. Memory O(T·D) (inputs, output, logsumexp, gradients and one
(block_q, block_k) tile per leading axis) against O(T²) for the dense path,
whose (..., T, T) logits and weights, kept for the backward pass, take
4·H·T² bytes each in float32 (4 GiB each at H = 4, T = 16384). Time: about
half the matmul FLOPs of the dense path, since the upper triangle is skipped.
Accumulation (scores, softmax sums, gradients) is in float32, or float64 when
the inputs are float64.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# Tile sizes. On a 2-core CPU (benchmarks/long_context.py, T = 4096, 4 heads,
# D = 64) 256 x 256 tiles were among the fastest for forward+backward: 512 and
# up spill the (heads, 256, 256) float32 score tile (1 MiB at 4 heads) out of
# cache in the backward pass, 128 pays more loop overhead in the forward pass.
# A sequence shorter than a tile is one tile (no padding).
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256


def blockwise_causal_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    sinks: Array | None = None,
    alibi: Array | None = None,
    segment_ids: Array | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> Array:
    """Causal softmax attention, tile by tile: (..., T, D), (..., T, D), (..., T, Dv) -> (..., T, Dv).

    Query t attends to keys s <= t. ``scale`` multiplies q·kᵀ; ``softcap``
    (None, or a positive number) caps the scaled scores to softcap·tanh(s/softcap)
    as ``attention.attention_logits`` does. ``window`` W (None: all of the past)
    lets query t see only keys t - W < s <= t, and the loops then visit only
    the tiles that hold such keys: O(T·W) work instead of O(T²). ``sinks``
    (broadcastable to the leading axes, e.g. (H,)) are sink logits that take
    weight in each row's softmax and give none to the values: the running max
    and sum of every row start at the sink instead of at -inf and 0.
    ``alibi`` (slopes, broadcastable to the leading axes) adds -slope·(t - s) to
    each score, tile by tile. ``segment_ids`` (integers broadcastable to the
    leading axes and T) pack documents: a query sees only keys of its own
    segment (every visited tile is then masked). ``block_q`` and ``block_k`` are tile sizes
    (clipped to T); T need not be a multiple of them. Differentiable (w.r.t.
    q, k, v and the sinks; the slopes are constants) with an O(T·D)-memory
    backward pass.
    """
    if q.ndim < 2 or q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"expected q, k (..., T, D) of equal shape and v (..., T, Dv); got {q.shape}, {k.shape}, {v.shape}"
        )
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    *lead, T, D = q.shape
    Dv = v.shape[-1]
    N = math.prod(lead)  # all leading (batch, head) axes flattened into one
    bq, bk = min(block_q, T), min(block_k, T)
    cap = None if softcap is None else float(softcap)
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
        raise ValueError(f"window must be a positive integer, got {window!r}")
    W = None if window is None else int(window)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    rows = lambda x: None if x is None else jnp.broadcast_to(jnp.asarray(x, acc), lead).reshape(N)  # (N,)
    flat = lambda x, d: x.reshape(N, T, d)
    segments = None if segment_ids is None else jnp.broadcast_to(segment_ids, (*lead, T)).reshape(N, T)
    out = _attention(
        flat(q, D), flat(k, D), flat(v, Dv), rows(sinks), rows(alibi), segments, float(scale), cap, W, bq, bk
    )
    return out.reshape(*lead, T, Dv)  # (..., T, Dv)


# ---------------------------------------------------------------------------
# Tiling helpers. Arrays are laid out tile-major, (n_tiles, N, tile, D), so that
# picking tile i is a contiguous dynamic slice along the leading axis.
# ---------------------------------------------------------------------------


def _to_tiles(x: Array, b: int) -> Array:
    """(N, T, ...) -> (ceil(T/b), N, b, ...), zero-padded at the end of T."""
    N, T = x.shape[:2]
    n = -(-T // b)
    x = jnp.pad(x, [(0, 0), (0, n * b - T)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(N, n, b, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_tiles(x: Array, T: int) -> Array:
    """Inverse of ``_to_tiles``: (n, N, b, ...) -> (N, T, ...)."""
    n, N, b = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(N, n * b, *x.shape[3:])[:, :T]


def _tile(x: Array, i) -> Array:
    return lax.dynamic_index_in_dim(x, i, axis=0, keepdims=False)


def _tile_positions(i, j, bq: int, bk: int) -> tuple[Array, Array]:
    """(bq, bk) query and key positions t, s of query tile i against key tile j."""
    t = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    s = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    return t, s


def _causal_tile_mask(i, j, bq: int, bk: int, window: int | None, segments=None) -> Array:
    """(bq, bk) mask of query tile i against key tile j: True where s <= t (and t - W < s).

    With ``segments`` (the tiled (nq, N, bq) and (nk, N, bk) ids), (N, bq, bk): also of one segment.
    """
    t, s = _tile_positions(i, j, bq, bk)
    mask = (s <= t) if window is None else (s <= t) & (s > t - window)
    if segments is None:
        return mask
    q_seg, k_seg = _tile(segments[0], i), _tile(segments[1], j)  # (N, bq), (N, bk)
    return mask & (q_seg[:, :, None] == k_seg[:, None, :])


def _scores(q_i: Array, k_j: Array, scale: float, softcap: float | None, acc_dtype) -> Array:
    """(N, bq, D), (N, bk, D) -> (N, bq, bk) scaled (and capped) scores in the accumulation dtype."""
    s = jnp.einsum("ntd,nsd->nts", q_i, k_j, preferred_element_type=acc_dtype)
    s = s * jnp.asarray(scale, acc_dtype)
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


def _alibi_tile(alibi: Array | None, i, j, bq: int, bk: int):
    """(N, bq, bk) ALiBi bias -slope·|t - s| of query tile i against key tile j, or 0 without slopes."""
    if alibi is None:
        return 0.0
    t, s = _tile_positions(i, j, bq, bk)
    return -alibi[:, None, None] * jnp.abs(t - s).astype(alibi.dtype)


def _key_tile_range(i, bq: int, bk: int, nk: int, window: int | None):
    """Key tiles seen by query tile i: [lo, a) and [b, n_seen) need a mask, [a, b) don't.

    Query tile i holds t in [i·bq, (i+1)·bq). Causally, key tile j is fully
    visible when its last key (j+1)·bk - 1 <= i·bq, and partly visible when
    j·bk <= (i+1)·bq - 1. A window W adds a lower edge: tile j holds keys some
    row sees when (j+1)·bk - 1 > i·bq - W, and only keys every row sees when
    j·bk > (i+1)·bq - 1 - W. Without a window lo = a = 0.
    """
    n_seen = jnp.minimum(((i + 1) * bq - 1) // bk + 1, nk)
    b = jnp.minimum((i * bq + 1) // bk, n_seen)
    if window is None:
        return 0, 0, b, n_seen
    lo = jnp.clip((i * bq - window + 1) // bk, 0, b)  # floor: the tile of the earliest key any row sees
    a = jnp.clip(-(-((i + 1) * bq - window) // bk), lo, b)  # ceil: the first tile every row sees whole
    return lo, a, b, n_seen


def _query_tile_range(j, bq: int, bk: int, nq: int, window: int | None):
    """Query tiles that see key tile j: [first, a) and [b, end) need a mask, [a, b) don't.

    The same partition as ``_key_tile_range``, seen from the key side: with a
    window W the last query that sees key s is s + W - 1.
    """
    first = (j * bk) // bq
    a = jnp.clip(((j + 1) * bk - 1 + bq - 1) // bq, first, nq)
    if window is None:
        return first, a, nq, nq
    end = jnp.clip(((j + 1) * bk - 1 + window - 1) // bq + 1, a, nq)
    b = jnp.clip((j * bk + window) // bq, a, end)  # tiles whose last row (i+1)·bq - 1 <= j·bk + W - 1
    return first, a, b, end


# ---------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------


def _forward(q, k, v, sinks, alibi, segments, scale: float, softcap, window: int | None, bq: int, bk: int):
    """q, k (N, T, D), v (N, T, Dv), sinks and alibi (N,) or None -> out (N, T, Dv), logsumexp (N, T) in acc dtype.

    The logsumexp counts the sink: L = log(exp(sink) + sum_s exp(score)).
    """
    N, T, _ = q.shape
    Dv = v.shape[-1]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qt, kt, vt = _to_tiles(q, bq), _to_tiles(k, bk), _to_tiles(v, bk)  # (nq, N, bq, D), (nk, N, bk, D)
    nq, nk = qt.shape[0], kt.shape[0]
    seg = None if segments is None else (_to_tiles(segments, bq), _to_tiles(segments, bk))
    # Padded keys (s >= T) sit above the diagonal of every real query, so the
    # causal mask already hides them; padded query rows are sliced off.

    def query_tile(i, carry):
        out, lse = carry
        q_i = _tile(qt, i)  # (N, bq, D)

        def key_tile(j, state, masked: bool):
            m, l, o = state  # (N, bq), (N, bq), (N, bq, Dv)
            s = _scores(q_i, _tile(kt, j), scale, softcap, acc) + _alibi_tile(alibi, i, j, bq, bk)  # (N, bq, bk)
            if masked:
                mask = _causal_tile_mask(i, j, bq, bk, window, seg)
                s = jnp.where(mask, s, jnp.finfo(acc).min)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # Without a window every row sees key 0 in the first tile visited, so
            # m_new is a real score from then on. A row that sees nothing in a tile
            # (below its window) gets m_new = finfo.min there and p = 0 by the mask;
            # its first real score then rescales those zeros by exp(min - m) = 0.
            p = jnp.exp(s - m_new[..., None])
            if masked:
                p = jnp.where(mask, p, 0.0)
            rescale = jnp.exp(m - m_new)
            v_j = _tile(vt, j)
            pv = jnp.einsum("nts,nsd->ntd", p.astype(v_j.dtype), v_j, preferred_element_type=acc)
            return m_new, l * rescale + jnp.sum(p, axis=-1), o * rescale[..., None] + pv

        if sinks is None:  # running max -inf, sum 0
            m0, l0 = jnp.full((N, bq), -jnp.inf, acc), jnp.zeros((N, bq), acc)
        else:  # the sink is a key seen first: max = sink, sum = exp(sink - sink), no value
            m0, l0 = jnp.broadcast_to(sinks[:, None], (N, bq)), jnp.ones((N, bq), acc)
        state = (m0, l0, jnp.zeros((N, bq, Dv), acc))
        lo, a, b, n_seen = _key_tile_range(i, bq, bk, nk, window)
        if seg is not None:  # no tile is whole: every one compares segment ids
            a = b = lo
        state = lax.fori_loop(lo, a, functools.partial(key_tile, masked=True), state)
        state = lax.fori_loop(a, b, functools.partial(key_tile, masked=False), state)
        m, l, o = lax.fori_loop(b, n_seen, functools.partial(key_tile, masked=True), state)
        out = lax.dynamic_update_index_in_dim(out, (o / l[..., None]).astype(out.dtype), i, axis=0)
        lse = lax.dynamic_update_index_in_dim(lse, m + jnp.log(l), i, axis=0)
        return out, lse

    out = jnp.zeros((nq, N, bq, Dv), q.dtype)
    lse = jnp.zeros((nq, N, bq), acc)
    out, lse = lax.fori_loop(0, nq, query_tile, (out, lse))
    return _from_tiles(out, T), _from_tiles(lse, T)


# ---------------------------------------------------------------------------
# Backward pass: outer loop over key tiles, inner over the query tiles that
# see them. dk, dv of the key tile are carried locally; dq is a full-size
# accumulator updated tile by tile (an in-place dynamic-update-slice).
# ---------------------------------------------------------------------------


def _backward(q, k, v, sinks, alibi, segments, out, lse, g, scale: float, softcap, window, bq: int, bk: int):
    N, T, D = q.shape
    acc = lse.dtype
    # delta_t = sum_d dO[t, d] O[t, d] = sum_s p[t, s] dp[t, s]: the softmax
    # Jacobian's correction term, one number per query row.
    delta = jnp.sum(g.astype(acc) * out.astype(acc), axis=-1)  # (N, T)
    qt, gt = _to_tiles(q, bq), _to_tiles(g, bq)  # (nq, N, bq, D), (nq, N, bq, Dv)
    lset, deltat = _to_tiles(lse, bq), _to_tiles(delta, bq)  # (nq, N, bq)
    kt, vt = _to_tiles(k, bk), _to_tiles(v, bk)  # (nk, N, bk, D), (nk, N, bk, Dv)
    nq, nk = qt.shape[0], kt.shape[0]
    seg = None if segments is None else (_to_tiles(segments, bq), _to_tiles(segments, bk))
    # Padded query rows have q = 0 and dO = 0, hence p·(dp - delta) = 0: they add
    # nothing to dk, dv of real keys.

    def key_tile(j, carry):
        dq, dk, dv = carry
        k_j, v_j = _tile(kt, j), _tile(vt, j)

        def query_tile(i, state, masked: bool):
            dq, dk_j, dv_j = state
            q_i, g_i = _tile(qt, i), _tile(gt, i)
            s = _scores(q_i, k_j, scale, softcap, acc)  # (N, bq, bk), capped, without the ALiBi bias
            p = jnp.exp(s + _alibi_tile(alibi, i, j, bq, bk) - _tile(lset, i)[..., None])
            if masked:
                p = jnp.where(_causal_tile_mask(i, j, bq, bk, window, seg), p, 0.0)
            dv_j = dv_j + jnp.einsum("nts,ntd->nsd", p.astype(g_i.dtype), g_i, preferred_element_type=acc)
            dp = jnp.einsum("ntd,nsd->nts", g_i, v_j, preferred_element_type=acc)
            ds = p * (dp - _tile(deltat, i)[..., None])  # d loss / d s, (N, bq, bk)
            if softcap is not None:  # through the cap: d(c·tanh(x/c))/dx = 1 - tanh², with tanh = s/c
                ds = ds * (1 - jnp.square(s / softcap))
            dk_j = dk_j + jnp.einsum("nts,ntd->nsd", ds.astype(q_i.dtype), q_i, preferred_element_type=acc)
            dq_i = jnp.einsum("nts,nsd->ntd", ds.astype(k_j.dtype), k_j, preferred_element_type=acc)
            dq = lax.dynamic_update_index_in_dim(dq, _tile(dq, i) + dq_i, i, axis=0)
            return dq, dk_j, dv_j

        state = (dq, jnp.zeros((N, bk, D), acc), jnp.zeros((N, bk, v.shape[-1]), acc))
        first, a, b, end = _query_tile_range(j, bq, bk, nq, window)
        if seg is not None:
            a = b = first
        state = lax.fori_loop(first, a, functools.partial(query_tile, masked=True), state)
        state = lax.fori_loop(a, b, functools.partial(query_tile, masked=False), state)
        dq, dk_j, dv_j = lax.fori_loop(b, end, functools.partial(query_tile, masked=True), state)
        dk = lax.dynamic_update_index_in_dim(dk, dk_j, j, axis=0)
        dv = lax.dynamic_update_index_in_dim(dv, dv_j, j, axis=0)
        return dq, dk, dv

    dq = jnp.zeros((nq, N, bq, D), acc)
    dk = jnp.zeros((nk, N, bk, D), acc)
    dv = jnp.zeros((nk, N, bk, v.shape[-1]), acc)
    dq, dk, dv = lax.fori_loop(0, nk, key_tile, (dq, dk, dv))
    # s = scale·q·kᵀ, so the chain rule puts one factor of scale on dq and dk.
    scale = jnp.asarray(scale, acc)
    dq = (_from_tiles(dq, T) * scale).astype(q.dtype)
    dk = (_from_tiles(dk, T) * scale).astype(k.dtype)
    # The sink's weight in row t is p_sink = exp(sink - L_t) and it adds nothing to O, so
    # d loss / d sink = sum_t p_sink(t) · (0 - delta_t).
    dsinks = None if sinks is None else -jnp.sum(jnp.exp(sinks[:, None] - lse) * delta, axis=-1)
    dalibi = None if alibi is None else jnp.zeros_like(alibi)  # constants: no gradient
    return dq, dk, _from_tiles(dv, T).astype(v.dtype), dsinks, dalibi, None  # (integer segment ids: no gradient)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _attention(q, k, v, sinks, alibi, segments, scale, softcap, window, bq, bk):
    return _forward(q, k, v, sinks, alibi, segments, scale, softcap, window, bq, bk)[0]


def _attention_fwd(q, k, v, sinks, alibi, segments, scale, softcap, window, bq, bk):
    out, lse = _forward(q, k, v, sinks, alibi, segments, scale, softcap, window, bq, bk)
    return out, (q, k, v, sinks, alibi, segments, out, lse)


def _attention_bwd(scale, softcap, window, bq, bk, residuals, g):
    q, k, v, sinks, alibi, segments, out, lse = residuals
    return _backward(q, k, v, sinks, alibi, segments, out, lse, g, scale, softcap, window, bq, bk)


_attention.defvjp(_attention_fwd, _attention_bwd)
