"""Statistics of attention: how peaked the softmax is, and how much gradient reaches q and k.

Pure functions over arrays, shapes in the legend of :mod:`attention_jax`.
``weights`` are softmax outputs (..., T, S) and ``mask`` the (T, S) boolean
mask of visible edges (None = all visible). Every statistic is a mean over
rows with at least two visible keys: a causal row of length 1 (the first
token) has a single weight of 1 by construction and says nothing about the
softmax, so it is excluded everywhere.

The lecture's claim this measures: with unit-variance q and k, q·k has
variance D, so without the 1/sqrt(D) scale the softmax sharpens towards
one-hot as D grows, and each token attends to a single other token.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax import attention
from attention_jax import model as model_lib

Array = jax.Array


def _row_lengths(shape: tuple[int, ...], mask: Array | None) -> Array:
    """Visible keys per row: (T,) from a (T, S) mask (or S everywhere)."""
    T, S = shape[-2:]
    if mask is None:
        return jnp.full((T,), S, jnp.float32)
    return jnp.broadcast_to(mask, (T, S)).sum(-1).astype(jnp.float32)


def _mean_over_rows(values: Array, lengths: Array) -> Array:
    """Mean of per-row values (..., T) over rows whose length is > 1 (and over leading axes)."""
    keep = jnp.broadcast_to(lengths > 1, values.shape)
    return jnp.sum(jnp.where(keep, values, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def row_entropy(weights: Array, mask: Array | None = None) -> Array:
    """Entropy of each row divided by log(row length): (..., T, S) -> (..., T) in [0, 1].

    1 = uniform over the visible keys, 0 = one-hot. Rows of length 1 give 0/0
    and are set to NaN (callers average over the other rows).
    """
    w = weights.astype(jnp.float32)
    h = -jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0), axis=-1)  # (..., T)
    n = _row_lengths(w.shape, mask)
    return jnp.where(n > 1, h / jnp.log(jnp.maximum(n, 2.0)), jnp.nan)


def mean_entropy(weights: Array, mask: Array | None = None) -> Array:
    """Mean normalized row entropy over rows of length > 1 and all leading axes: ()."""
    n = _row_lengths(weights.shape, mask)
    return _mean_over_rows(jnp.nan_to_num(row_entropy(weights, mask)), n)


def mean_max_weight(weights: Array, mask: Array | None = None) -> Array:
    """Mean over rows (length > 1) of the largest weight: () in [1/S, 1]."""
    return _mean_over_rows(jnp.max(weights.astype(jnp.float32), axis=-1), _row_lengths(weights.shape, mask))


def saturated_share(weights: Array, mask: Array | None = None, threshold: float = 0.99) -> Array:
    """Share of rows (length > 1) whose largest weight exceeds ``threshold``: () in [0, 1]."""
    peaked = (jnp.max(weights.astype(jnp.float32), axis=-1) > threshold).astype(jnp.float32)
    return _mean_over_rows(peaked, _row_lengths(weights.shape, mask))


def logit_variance(logits: Array, mask: Array | None = None) -> Array:
    """Mean over rows (length > 1) of the variance of a row's visible logits: ().

    The softmax only sees differences within a row, so this within-row
    variance is what sets how peaked it is; for unit-Gaussian q, k it is
    D * scale**2 (D unscaled, 1 with 1/sqrt(D), 1/D with muP).
    """
    x = logits.astype(jnp.float32)
    T, S = x.shape[-2:]
    m = jnp.ones((T, S), bool) if mask is None else jnp.broadcast_to(mask, (T, S))
    n = m.sum(-1).astype(jnp.float32)  # (T,)
    mean = jnp.sum(jnp.where(m, x, 0.0), -1) / jnp.maximum(n, 1)
    var = jnp.sum(jnp.where(m, (x - mean[..., None]) ** 2, 0.0), -1) / jnp.maximum(n, 1)  # (..., T)
    return _mean_over_rows(var, n)


def weight_stats(weights: Array, mask: Array | None = None) -> dict[str, float]:
    """Entropy, mean max weight and saturated share of (..., T, S) weights, as floats."""
    return {
        "entropy": float(mean_entropy(weights, mask)),
        "max_weight": float(mean_max_weight(weights, mask)),
        "saturated": float(saturated_share(weights, mask)),
    }


# ---------------------------------------------------------------------------
# Unit-Gaussian q and k: the lecture's setting
# ---------------------------------------------------------------------------

# The statistics of ``gaussian_qk_stats`` and ``model_qk_stats``, in report order.
STAT_KEYS = ("logit_var", "entropy", "max_weight", "saturated", "grad_q", "grad_k")


def normalize(x: Array, eps: float = 1e-5) -> Array:
    """LayerNorm without learned parameters over the last axis (QK-norm at init)."""
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.var(x, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def gaussian_qk_stats(
    key: Array, *, head_size: int, scale: str | float, qk_norm: bool = False, B: int = 8, H: int = 4, T: int = 64
) -> dict[str, float]:
    """Attention statistics for q, k, v ~ N(0, 1) of shape (B, H, T, D), causal.

    Gradients: the loss is sum(out * g) with g ~ N(0, 1) fixed, i.e. a random
    upstream gradient of unit size per output entry; ``grad_q``/``grad_k`` are
    the mean L2 norms of dL/dq_t, dL/dk_s per token (through the norm when
    ``qk_norm``). A saturated softmax passes almost no gradient to q and k.
    """
    s = attention.resolve_scale(scale, head_size)
    out = _gaussian_core(key, s, shape=(B, H, T, head_size), qk_norm=qk_norm)
    return {k: float(v) for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("shape", "qk_norm"))
def _gaussian_core(key: Array, s: Array, *, shape: tuple[int, int, int, int], qk_norm: bool) -> dict[str, Array]:
    kq, kk, kv, kg = jax.random.split(key, 4)
    q, k, v, g = (jax.random.normal(x, shape) for x in (kq, kk, kv, kg))  # each (B, H, T, D)
    mask = attention.causal_mask(shape[2])

    def logits_fn(q, k):
        if qk_norm:
            q, k = normalize(q), normalize(k)
        return attention.attention_logits(q, k, scale=s)

    def loss(q, k):
        w = attention.masked_softmax(logits_fn(q, k), mask)
        return jnp.sum(jnp.einsum("bhts,bhsd->bhtd", w, v) * g)

    logits = logits_fn(q, k)
    w = attention.masked_softmax(logits, mask)
    gq, gk = jax.grad(loss, argnums=(0, 1))(q, k)
    return {
        "logit_var": logit_variance(logits, mask),
        "entropy": mean_entropy(w, mask),
        "max_weight": mean_max_weight(w, mask),
        "saturated": saturated_share(w, mask),
        "grad_q": jnp.mean(jnp.linalg.norm(gq, axis=-1)),
        "grad_k": jnp.mean(jnp.linalg.norm(gk, axis=-1)),
    }


# ---------------------------------------------------------------------------
# A TransformerLM: weights per layer from its sown intermediates
# ---------------------------------------------------------------------------


def sown_attention_weights(model, params: Any, tokens: Array) -> list[Array]:
    """The attention weights of every layer, [(B, H, T, T)] in layer order (dense path)."""
    _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    inter = model_lib.unstack_layers(state["intermediates"])  # a scanned model's, per layer
    blocks = sorted((k for k in inter if k.startswith("block_")), key=lambda k: int(k.split("_")[1]))
    return [inter[b]["attn"]["attention_weights"][0] for b in blocks]


def layer_mask(model, layer: int, T: int) -> Array:
    """The (T, T) keys a query of ``layer`` may see: causal, within the layer's window if it has one."""
    cfg = getattr(model, "model_config", None)
    options = None if cfg is None else cfg.attention.layer(layer)
    if options is not None and not options.causal:
        return jnp.ones((T, T), bool)
    return attention.causal_mask(T, T, None if options is None else options.window)


def layer_entropies(model, params: Any, tokens: Array) -> list[float]:
    """Mean normalized row entropy of each layer on ``tokens`` (B, T), over the keys each row may see."""
    T = tokens.shape[-1]
    weights = sown_attention_weights(model, params, tokens)
    return [float(mean_entropy(w, layer_mask(model, i, T))) for i, w in enumerate(weights)]


@functools.partial(jax.jit, static_argnums=0)
def _weights_and_grads(model, params, tokens, targets):
    """Sown weights of every layer and the next-token loss's gradient, in one compiled call."""
    from attention_jax.model import cross_entropy

    def loss(p):
        return cross_entropy(model.apply({"params": p}, tokens), targets)

    return sown_attention_weights(model, params, tokens), jax.grad(loss)(params)


def model_qk_stats(model, params: Any, tokens: Array, targets: Array) -> dict[str, float]:
    """Attention statistics of a TransformerLM on real tokens, averaged over layers.

    Logits are read back from the weights: log w differs from the logits by a
    per-row constant, so their within-row variance is the logits' (weights
    that underflow to 0 are clipped at the float32 minimum, which understates
    the variance of a fully saturated row). ``grad_q``/``grad_k`` are the
    Frobenius norms of the next-token loss's gradient w.r.t. the query and key
    projections (the ``[:, 0]`` and ``[:, 1]`` slices of ``qkv_kernel``),
    averaged over layers: the gradient that reaches q and k.
    """
    T = tokens.shape[-1]
    weights, grads = _weights_and_grads(model, params, tokens, targets)
    tiny = jnp.finfo(jnp.float32).tiny
    per_layer = []
    for i, w in enumerate(weights):
        mask = layer_mask(model, i, T)
        row = weight_stats(w, mask)
        row["logit_var"] = float(logit_variance(jnp.log(jnp.maximum(w, tiny)), mask))
        per_layer.append(row)
    grads = model_lib.unstack_layers(grads)
    blocks = sorted((k for k in grads if k.startswith("block_")), key=lambda k: int(k.split("_")[1]))
    gq = [float(jnp.linalg.norm(_projection(grads[b]["attn"], 0))) for b in blocks]
    gk = [float(jnp.linalg.norm(_projection(grads[b]["attn"], 1))) for b in blocks]
    out = {key: float(np.mean([r[key] for r in per_layer])) for key in per_layer[0]}
    out.update(grad_q=float(np.mean(gq)), grad_k=float(np.mean(gk)))
    return out


def _projection(attn: dict, which: int) -> Array:
    """The query (0) or key (1) projection kernel of an attention layer's parameters (or their gradients)."""
    if "qkv_kernel" in attn:
        return attn["qkv_kernel"][:, which]  # (C, H, D)
    return attn["query_kernel"] if which == 0 else attn["kv_kernel"][:, 0]  # (C, H, D), (C, K, D)


# ---------------------------------------------------------------------------
# Stability diagnostics of a TransformerLM (Wortsman et al. 2023; Zhai et al. 2023)
# ---------------------------------------------------------------------------

# name -> how a layer's heads are summarized into one number (TensorBoard, reports)
DIAGNOSTICS = {"max_logit": "max", "entropy": "mean", "q_norm": "mean", "k_norm": "mean"}


def stability_diagnostics(model, params: Any, tokens: Array) -> dict[str, Array]:
    """What grows before a transformer's training diverges, on ``tokens`` (B, T); jit-able.

    Per layer and head, (L, H) float32:
      ``max_logit``  the largest attention logit q·kᵀ·scale over the pairs a query
                     may see (causal, within its window), before any soft-cap: the
                     attention-logit growth of Dehghani et al. and Wortsman et al.;
      ``entropy``    the mean normalized entropy of the attention rows (1 uniform,
                     0 one-hot; rows of one key left out; with sinks, of the keys' weights
                     renormalized): entropy collapse (Zhai et al.);
      ``q_norm``, ``k_norm``  the mean L2 norm of the queries and keys as attention
                     takes them (after the q/k norm, rope and log-n).
    And (): ``log_z`` the mean and ``log_z_max`` the largest log-normalizer
    logsumexp of the output logits, which the z-loss keeps near 0.

    The model runs once on the dense path (a twin with attention_impl="dense",
    same parameters), which materializes the (B, H, T, T) weights: give it a few
    rows of modest length. A model without attention layers gives the log Z only.
    """
    cfg = getattr(model, "model_config", None)
    if cfg is not None and cfg.attention_impl != "dense":
        model = model.clone(model_config=cfg.replace(attention_impl="dense"))
    logits, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # (B, T)
    out = {"log_z": jnp.mean(log_z), "log_z_max": jnp.max(log_z)}
    inter = model_lib.unstack_layers(state.get("intermediates", {}))
    blocks = sorted((k for k in inter if k.startswith("block_")), key=lambda k: int(k.split("_")[1]))
    if not blocks:
        return out
    T = tokens.shape[-1]
    rows = {name: [] for name in DIAGNOSTICS}
    for i, b in enumerate(blocks):
        layer = inter[b]["attn"]
        (q,), (k,), (w,) = layer["queries"], layer["keys"], layer["attention_weights"]  # (B, H, T, D), (B, H, T, T)
        k = jnp.repeat(k, q.shape[1] // k.shape[1], axis=1)  # grouped (B, K, T, D): each query head's keys
        options = model_lib.block_options(cfg, i)[0]["options"]  # the layer's, its scale by layer included
        scale = attention.resolve_scale(options.scale, q.shape[-1])
        mask = layer_mask(model, i, T)
        if options.sinks:  # the keys' weights sum to 1 - the sink's share: the entropy of how they split it
            w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
        raw = attention.attention_logits(q, k, scale=scale)  # (B, H, T, T), uncapped
        rows["max_logit"].append(jnp.max(jnp.where(mask, raw, -jnp.inf), axis=(0, 2, 3)))
        n = _row_lengths(w.shape, mask)
        entropy = jnp.nan_to_num(row_entropy(w, mask))  # (B, H, T)
        keep = (n > 1).astype(jnp.float32)
        rows["entropy"].append(jnp.sum(entropy * keep, axis=(0, 2)) / jnp.maximum(keep.sum() * w.shape[0], 1))
        rows["q_norm"].append(jnp.mean(jnp.linalg.norm(q.astype(jnp.float32), axis=-1), axis=(0, 2)))
        rows["k_norm"].append(jnp.mean(jnp.linalg.norm(k.astype(jnp.float32), axis=-1), axis=(0, 2)))
    return out | {name: jnp.stack(values) for name, values in rows.items()}


def summarize_diagnostics(diagnostics: dict[str, Any]) -> dict[str, float]:
    """Flat numbers of ``stability_diagnostics``: per layer, the heads summarized (``DIAGNOSTICS``).

    ``{"max_logit/layer_0": ..., "entropy/layer_0": ..., "log_z": ..., "log_z_max": ...}``.
    """
    flat = {}
    for name, value in diagnostics.items():
        value = np.asarray(value, np.float64)
        if value.ndim == 0:
            flat[name] = float(value)
            continue
        how = np.max if DIAGNOSTICS.get(name) == "max" else np.mean
        for layer, heads in enumerate(value):
            flat[f"{name}/layer_{layer}"] = float(how(heads))
    return flat
