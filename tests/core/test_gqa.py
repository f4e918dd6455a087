"""Grouped-query and multi-query attention (``num_kv_heads``, ``ModelConfig.n_kv_head``), q/k/v biases and
keys and values from inputs of another width: against float64 numpy with each kv head repeated for its
query heads, on every backend; causal by gradients; a cache of the kv heads only that decodes like the full
pass; NNX equal to Linen; the refusals."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_jax import attention as A
from attention_jax import layers
from attention_jax import nnx as ajx
from attention_jax.lab.config import ConfigError, apply_overrides, base_config, model_config
from attention_jax.model import ModelConfig, TransformerLM
from tests.core.test_variants import (
    assert_cached_decode_equals_the_full_pass,
    dependence,
    numpy_attention,
    numpy_heads_out,
)

B, T, C, H, D, V = 2, 7, 16, 4, 8, 11
IMPLS = ("dense", "xla", "blockwise", "splash")


def inputs(seed=0, shape=(B, T, C), scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def numpy_projections(x, x_kv, p):
    """q (B, H, T, D), k, v (B, K, S, D) in float64 from a layer's parameters, whichever layout it has."""
    f64 = lambda name: np.asarray(p[name], np.float64) if name in p else None
    x, x_kv = np.asarray(x, np.float64), np.asarray(x_kv, np.float64)
    if "qkv_kernel" in p:
        w, b = f64("qkv_kernel"), f64("qkv_bias")
        w_q, w_kv, b_q, b_kv = w[:, 0], w[:, 1:], None if b is None else b[0], None if b is None else b[1:]
    else:
        w_q, w_kv, b_q, b_kv = f64("query_kernel"), f64("kv_kernel"), f64("query_bias"), f64("kv_bias")
    q = np.einsum("btc,chd->bhtd", x, w_q) + (0 if b_q is None else b_q[:, None, :])
    k, v = (np.einsum("bsc,chd->bhsd", x_kv, w_kv[:, i]) + (0 if b_kv is None else b_kv[i][:, None, :]) for i in (0, 1))
    return q, k, v


def numpy_gqa_layer(x, p, *, scale, causal=True, x_kv=None):
    """An independent float64 grouped-query attention layer: each kv head repeated for its H / K query heads."""
    q, k, v = numpy_projections(x, x if x_kv is None else x_kv, p)
    G = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)  # query head h reads kv head h // G
    return numpy_heads_out(q, k, v, p, scale=scale, causal=causal)


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("impl", IMPLS)
def test_a_grouped_layer_equals_float64_numpy_with_repeated_kv_heads(fake_init, K, impl):
    module = layers.MultiHeadAttention(H, D, num_kv_heads=K, use_qkv_bias=True, attention_impl=impl)
    x = inputs()
    p = fake_init(module, x, std=0.3)
    if K == H:
        assert p["qkv_kernel"].shape == (C, 3, H, D) and p["qkv_bias"].shape == (3, H, D)  # the fused layout
    else:
        assert p["query_kernel"].shape == (C, H, D) and p["kv_kernel"].shape == (C, 2, K, D)
        assert p["query_bias"].shape == (H, D) and p["kv_bias"].shape == (2, K, D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # splash: interpreted off TPU
        got = module.apply({"params": p}, x)
    np.testing.assert_allclose(np.asarray(got), numpy_gqa_layer(x, p, scale=D**-0.5), rtol=1e-5, atol=1e-5)


def test_keys_and_values_from_inputs_of_another_width(fake_init):
    x, memory = inputs(0), inputs(1, (B, 5, 24))
    for K in (H, 2):  # without grouping too: a layer initialized on 24 channels has its own kv kernel
        module = layers.MultiHeadAttention(H, D, num_kv_heads=K, causal=False)
        p = fake_init(module, x, memory, std=0.3)
        assert p["kv_kernel"].shape == (24, 2, K, D) and p["query_kernel"].shape == (C, H, D)
        want = numpy_gqa_layer(x, p, scale=D**-0.5, causal=False, x_kv=memory)
        np.testing.assert_allclose(np.asarray(module.apply({"params": p}, x, memory)), want, rtol=1e-5, atol=1e-5)
        twin = ajx.from_linen(module, p)
        np.testing.assert_allclose(np.asarray(twin(x, memory)), want, rtol=1e-5, atol=1e-5)


VARIANTS = {  # attention_heads keywords -> numpy_attention keywords, per query head (H = 4)
    "plain": ({}, {}),
    "sinks": (dict(sinks=np.array([-1.0, 0.5, 2.0, 0.0], np.float32)), dict(sinks=[-1.0, 0.5, 2.0, 0.0])),
    "alibi": (dict(alibi=np.array([0.5, 0.25, 1.0, 0.125], np.float32)), dict(alibi=[0.5, 0.25, 1.0, 0.125])),
    "logn": (dict(logn=np.array([0.3, 1.0, 0.6, 0.9], np.float32)), dict(logn=[0.3, 1.0, 0.6, 0.9])),
    "softcap": (dict(softcap=1.5), dict(softcap=1.5)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("window", [None, 3])
def test_grouped_heads_take_every_variant_on_every_backend(variant, window):
    ours, ref = VARIANTS[variant]
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(H, 13, D)) * 1.5, jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 13, D)) * 1.5, jnp.float32) for _ in range(2))  # K = 2
    want = numpy_attention(q, np.repeat(k, 2, axis=0), np.repeat(v, 2, axis=0), 0.5, window=window, **ref)
    for impl in IMPLS:
        if (impl == "xla" and variant == "softcap") or (impl == "splash" and variant == "alibi"):
            continue  # refused in one line (test_options, test_splash)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got, _ = A.attention_heads(q, k, v, scale=0.5, causal=True, impl=impl, rope=False, window=window, **ours)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=impl)


def test_grouped_masks_biases_and_packed_documents_reach_their_query_heads():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(B, H, T, D)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, 2, T, D)), jnp.float32) for _ in range(2))
    rep = lambda a: jnp.repeat(a, 2, axis=1)
    mask = jnp.asarray(rng.random((B, H, T, T)) > 0.3)  # one mask per query head
    bias = jnp.asarray(rng.normal(size=(1, H, T, T)), jnp.float32)
    segments = jnp.asarray([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 2]])[:, None, :]  # (B, 1, T)
    for impl in ("dense", "xla"):
        kw = dict(scale=0.5, causal=True, impl=impl, rope=True, mask=mask, bias=bias)
        np.testing.assert_allclose(
            np.asarray(A.attention_heads(q, k, v, **kw)[0]), np.asarray(A.attention_heads(q, rep(k), rep(v), **kw)[0]),
            rtol=1e-6, atol=1e-6, err_msg=impl,
        )  # fmt: skip
    for impl in IMPLS:
        kw = dict(scale=0.5, causal=True, impl=impl, rope=True, segment_ids=segments)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = A.attention_heads(q, k, v, **kw)[0]
        want = A.attention_heads(q, rep(k), rep(v), **{**kw, "impl": "dense"})[0]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=impl)


def test_blockwise_gradients_of_shared_kv_heads_equal_dense():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(B, H, 13, D)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, 1, 13, D)), jnp.float32) for _ in range(2))  # multi-query
    g = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    grads = lambda impl: jax.grad(
        lambda q, k, v: jnp.vdot(A.attention_heads(q, k, v, scale=0.5, causal=True, impl=impl, rope=True)[0], g),
        argnums=(0, 1, 2),
    )(q, k, v)
    for name, got, want in zip("qkv", grads("blockwise"), grads("dense")):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_grouped_layer_is_causal_by_exact_gradients(fake_init):
    module = layers.MultiHeadAttention(H, D, num_kv_heads=2, use_qkv_bias=True, pos_encoding="rope")
    x = inputs(3)
    dep = dependence(module, fake_init(module, x, std=0.5), x)  # (B, T_out, T_in)
    future = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(dep[:, future] == 0.0) and np.all(dep[:, ~future] > 0.0)


@pytest.mark.parametrize(
    "fields",
    [dict(n_kv_head=2, pos_encoding="rope"), dict(n_kv_head=1, qkv_bias=True), dict(n_kv_head=2, window=(3, None))],
    ids=["gqa-rope", "mqa-bias", "gqa-window"],
)
def test_a_grouped_lm_caches_only_its_kv_heads_decodes_like_its_full_pass_and_nnx_equals_linen(fake_init, fields):
    cfg = ModelConfig(vocab_size=V, block_size=12, n_embd=C, n_head=H, n_layer=2, **fields)
    model = TransformerLM(cfg)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, V, (B, 12)), jnp.int32)
    params = fake_init(model, tokens, std=0.5)
    cache = model.init_cache(B, 12)
    K = fields["n_kv_head"]
    window = fields.get("window", (None,))[0]
    assert cache["block_0"]["attn"]["cached_key"].shape == (B * K, window or 12, C // H)  # K heads, not H
    full = assert_cached_decode_equals_the_full_pass(model, params, tokens, first=5)
    twin = ajx.from_linen(model, params)
    np.testing.assert_allclose(np.asarray(twin(tokens)), full, rtol=1e-6, atol=1e-6)
    twin.init_cache(B, 12)
    assert twin.block_0.attn.cached_key[...].shape == cache["block_0"]["attn"]["cached_key"].shape
    steps = [np.asarray(twin(tokens[:, :5], decode=True))]
    steps += [np.asarray(twin(tokens[:, t : t + 1], decode=True)) for t in range(5, 12)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
    assert ajx.to_linen(twin)[0].model_config == cfg


def test_grouped_refusals_are_one_line_naming_the_argument():
    with pytest.raises(ValueError, match=r"^ModelConfig\.n_kv_head=3 must divide n_head=4"):
        ModelConfig(vocab_size=V, n_embd=C, n_head=H, n_kv_head=3)
    with pytest.raises(ValueError, match=r"^ModelConfig\.n_kv_head must be a positive integer"):
        ModelConfig(vocab_size=V, n_embd=C, n_head=H, n_kv_head=0)
    with pytest.raises(ValueError, match=r"^MultiHeadAttention\.num_kv_heads=3 must divide num_heads=4"):
        layers.MultiHeadAttention(H, D, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"^FusedMultiHeadAttention\.num_kv_heads=3 must divide num_heads=4"):
        ajx.FusedMultiHeadAttention(C, H, D, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"^model\.n_kv_head=4 must divide n_head=6"):
        model_config(apply_overrides(base_config(), {"model.n_kv_head": "4"}), V)
    assert model_config(apply_overrides(base_config(), {"model.n_kv_head": "2"}), V).kv_heads == 2
    q, k = jnp.zeros((B, H, T, D)), jnp.zeros((B, 2, T, D))
    with pytest.raises(ValueError, match=r"has 3 heads on axis -3; it must have 1 or 4"):
        A.attention_heads(q, k, k, scale=1.0, causal=True, impl="dense", rope=False, mask=jnp.ones((3, T, T), bool))
    with pytest.raises(ValueError, match=r"^grouped-query attention: keys .* must have the same number of heads"):
        A.attention_heads(q, jnp.zeros((B, 3, T, D)), jnp.zeros((B, 3, T, D)), scale=1.0, causal=True, impl="dense",
                          rope=False)  # fmt: skip


def test_grouped_diagnostics_read_each_query_heads_keys(fake_init):
    from attention_jax import stats

    cfg = ModelConfig(vocab_size=V, block_size=T, n_embd=C, n_head=H, n_kv_head=2, n_layer=1)
    model = TransformerLM(cfg)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, V, (B, T)), jnp.int32)
    params = fake_init(model, tokens, std=0.5)
    diag = stats.stability_diagnostics(model, params, tokens)
    _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    inter = state["intermediates"]["block_0"]["attn"]
    (q,), (k,) = inter["queries"], inter["keys"]
    assert q.shape[1] == H and k.shape[1] == 2  # the sown keys are the kv heads
    logits = np.einsum("bhtd,bhsd->bhts", np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, 1))
    logits *= (C // H) ** -0.5
    want = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf).max(axis=(0, 2, 3))
    np.testing.assert_allclose(np.asarray(diag["max_logit"][0]), want, rtol=1e-5)
