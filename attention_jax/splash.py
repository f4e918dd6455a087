"""Splash attention, the TPU's fused attention kernel, as the backend ``attention_impl="splash"``.

The kernel is jax's own, ``jax.experimental.pallas.ops.tpu.splash_attention``
(the one MaxText and levanter run on TPU): a Pallas kernel that skips the
blocks its mask leaves empty, with its own backward pass. This module only
adapts it: the leading (batch, head) axes, any T (padded to the kernel's
block), a scale (the kernel takes none: q is scaled first), and a mesh.

What it takes: self-attention (T = S), causal or not, a sliding ``window``
(``LocalMask`` with ``window_size=(W - 1, 0)``: W keys, the query's own
included; MaxText issue 4289 was a window of W + 1 from passing W there, and
``tests/core/test_splash.py`` checks the exact keys by gradients), ``softcap``
(its ``attn_logits_soft_cap``), ``sinks``. Not: a mask or bias array (its
masks are static), ALiBi, cross-attention; ``attention.attend`` refuses those
in one line.

Off TPU the kernel runs only in Pallas's interpret mode: the same program
interpreted with ordinary XLA ops, correct and slow, which is how it is tested
on a CPU; the first call says so in a warning.

Under a mesh set with ``jax.set_mesh`` (and 4-D (B, H, T, D) inputs), the
kernel runs inside ``jax.shard_map``: the batch over the mesh's "data" and
"fsdp" axes, the heads over "tensor" (those the mesh has and that divide the
axis), each device calling the kernel on its own block; a kernel is a custom
call that XLA's partitioner cannot split by itself.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

Array = jax.Array

BATCH_AXES = ("data", "fsdp")  # mesh axes a (B, H, T, D) input's batch may be split over
HEAD_AXES = ("tensor",)  # and its heads
LANES = 128  # the TPU's lane width: the kernel's blocks are multiples of it
MAX_BLOCK = 512  # the block along T, at most (MaxText's default for splash)

_warned = False


def splash_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float | Array,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Array | None = None,
    segment_ids: Array | None = None,
    interpret: bool | None = None,
) -> Array:
    """Splash attention: q, k, v (..., T, D) -> (..., T, D), the leading axes any batch and head axes.

    ``scale`` multiplies q·kᵀ (folded into q); ``window`` W needs ``causal``;
    ``sinks`` broadcast to the leading axes (per head: (H,)); ``segment_ids``
    (broadcastable to (..., T)) are its ``SegmentIds``. ``interpret``:
    None runs the kernel compiled on TPU and interpreted elsewhere.
    Grouped-query attention: k, v (..., 1, T, D) shared by the G heads of q
    (..., G, T, D) run as the kernel's own grouped heads (not copied).
    """
    groups = q.ndim >= 3 and q.shape[-3] > 1 and k.shape[-3] == 1 and k.shape[:-3] == q.shape[:-3]
    kv_shape = (*q.shape[:-3], 1, *q.shape[-2:]) if groups else q.shape
    if k.shape != kv_shape or k.shape[:-1] != v.shape[:-1] or q.ndim < 2:
        raise ValueError(
            f"splash: self-attention only, q and k (..., T, D) of one shape (or k shared by q's heads, "
            f"(..., 1, T, D)) and v (..., T, Dv) like k; got {q.shape}, {k.shape}, {v.shape}"
        )
    if window is not None and not causal:
        raise ValueError("splash: a window needs causal=True")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
        _say_interpreted(interpret)
    q = (q * jnp.asarray(scale, jnp.promote_types(q.dtype, jnp.float32))).astype(q.dtype)
    lead = q.shape[:-2]
    if sinks is not None:
        sinks = jnp.broadcast_to(jnp.asarray(sinks, jnp.float32), lead)
    if segment_ids is not None:
        segment_ids = jnp.broadcast_to(jnp.asarray(segment_ids, jnp.int32), q.shape[:-1])
    run = functools.partial(_on_rows, causal=causal, window=window, softcap=softcap, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if q.ndim in (4, 5) and not mesh.empty:  # (B, H, T, D), or grouped (B, K, G, T, D)
        spec = _spec(mesh, q.shape)
        if spec != P():
            extra = {name: x for name, x in (("sinks", sinks), ("segment_ids", segment_ids)) if x is not None}
            args = (q, k, v, *extra.values())
            extra_specs = {"sinks": P(*spec[:2]), "segment_ids": P(*spec[:3])}
            specs = (spec, spec, spec, *(extra_specs[name] for name in extra))  # grouped: k's K heads as q's
            if _explicit(mesh, spec):  # explicit axes: shard_map takes inputs already laid out as it splits them
                args = tuple(jax.reshard(a, s) for a, s in zip(args, specs))
            body = lambda q, k, v, *rest: run(q, k, v, **dict(zip(extra, rest)))
            return jax.shard_map(body, in_specs=specs, out_specs=spec, check_vma=False)(*args)
    return run(q, k, v, sinks=sinks, segment_ids=segment_ids)


def _say_interpreted(interpret: bool) -> None:
    global _warned
    if interpret and not _warned and jax.default_backend() != "tpu":
        _warned = True
        warnings.warn(
            f"attention_impl='splash' on {jax.default_backend()}: the TPU kernel runs in Pallas interpret mode "
            "here (correct, slow: for tests); on TPU it runs compiled",
            stacklevel=3,
        )


def _spec(mesh, shape) -> P:
    """The (B, H, ...) partition over the mesh's batch and head axes that divide B and H."""

    def axes(names, size):
        chosen = [a for a in names if a in mesh.axis_names and mesh.shape[a] > 1]
        if not chosen or size % math.prod(mesh.shape[a] for a in chosen):
            return None
        return chosen[0] if len(chosen) == 1 else tuple(chosen)

    batch, heads = axes(BATCH_AXES, shape[0]), axes(HEAD_AXES, shape[1])
    return P() if batch is None and heads is None else P(batch, heads, *[None] * (len(shape) - 2))


def _explicit(mesh, spec: P) -> bool:
    """Whether every mesh axis ``spec`` names is of the Explicit type (else Auto: XLA moves the data)."""
    named = [a for entry in spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))]
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    return all(types[a] == jax.sharding.AxisType.Explicit for a in named)


def _on_rows(q, k, v, *, sinks=None, segment_ids=None, causal, window, softcap, interpret):
    """The kernel over the flattened leading axes: each row one head of one example (grouped: G query heads
    of one example over its one kv head)."""
    *lead, T, D = q.shape
    Dv = v.shape[-1]
    G = q.shape[-3] if q.ndim >= 3 and k.shape[-3] == 1 else 1
    N = math.prod(lead) // G
    block = min(MAX_BLOCK, -(-T // LANES) * LANES)
    Tp = -(-T // block) * block  # padded at the end; the padded keys are masked (causally: unseen anyway)
    pad = lambda x, g: jnp.pad(x.reshape(N, g, T, x.shape[-1]), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
    kernel = _kernel(T, Tp, block, G, causal, window, softcap, interpret)
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    args = (pad(q, G), pad(k, 1), pad(v, 1))
    sinks = None if sinks is None else sinks.reshape(N, G)
    if segment_ids is not None:  # the padding gets an id of its own (-1): a padded query sees itself
        segment_ids = segment_ids.reshape(N, G, T)[:, 0]  # one document layout per example, all heads
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, Tp - T)), constant_values=-1)

    def one(q, k, v, s, seg):
        return kernel(q, k, v, segment_ids=None if seg is None else SegmentIds(q=seg, kv=seg), sinks=s)

    out = jax.vmap(one)(*args, sinks, segment_ids)  # (N, G, Tp, Dv)
    return out[:, :, :T].reshape(*lead, T, Dv)


@functools.lru_cache(maxsize=64)
def _kernel(T: int, Tp: int, block: int, heads: int, causal: bool, window, softcap, interpret: bool):
    """A splash kernel for q (heads, Tp, D) over k, v (1, Tp, D) (T real, padded to Tp), its mask built once."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    if window is not None:
        mask = masks.LocalMask((Tp, Tp), window_size=(window - 1, 0), offset=0)  # keys t - W < s <= t
    elif causal:
        mask = masks.CausalMask((Tp, Tp))
    elif Tp == T:
        mask = masks.FullMask((Tp, Tp))
    else:  # without a causal mask the padded keys must be masked out
        mask = masks.NumpyMask(np.broadcast_to(np.arange(Tp)[None, :] < T, (Tp, Tp)))
    sizes = kernels.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    with jax.ensure_compile_time_eval():  # its mask arrays concrete, not tracers of the first caller's trace
        return kernels.make_splash_mha(
            masks.MultiHeadMask([mask] * heads), block_sizes=sizes, attn_logits_soft_cap=softcap,
            head_shards=1, q_seq_shards=1, interpret=interpret,
        )  # fmt: skip
