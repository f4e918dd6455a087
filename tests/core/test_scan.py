"""ModelConfig.scan_layers and remat: a scanned model equals the unrolled one with its parameters stacked (logits
with masks and packed documents, gradients, cached decoding, generate, the diagnostics), remat changes no
number and does rematerialize, and what cannot be scanned is refused in one line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import stats
from attention_jax.generate import generate
from attention_jax.lab.config import ConfigError, apply_overrides, base_config, model_config
from attention_jax.model import ModelConfig, TransformerLM, stack_layers, unstack_layers
from tests.core.test_variants import assert_cached_decode_equals_the_full_pass

V, T = 11, 10
CFG = ModelConfig(vocab_size=V, block_size=T, n_embd=16, n_head=4, n_kv_head=2, n_layer=3, pos_encoding="rope",
                  sinks=True, window=(4, 4))  # fmt: skip


def tokens(seed=0, shape=(2, T)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


def assert_trees_close(a, b, **tol):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol), a, b)


@pytest.fixture(scope="module")
def unrolled(fake_init):
    model = TransformerLM(CFG)
    return model, fake_init(model, tokens(), std=0.3)


@pytest.mark.parametrize("remat", [None, "nothing_saveable"])
def test_a_scanned_model_equals_the_unrolled_one_with_its_parameters_stacked(unrolled, remat):
    model, params = unrolled
    scanned = TransformerLM(CFG.replace(scan_layers=True, remat=remat))
    stacked = stack_layers(params, CFG.n_layer)
    shapes = jax.eval_shape(lambda: scanned.init(jax.random.key(0), tokens()))["params"]
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(stacked)  # its own init's tree
    assert stacked["blocks"]["attn"]["query_kernel"].shape == (3, 16, 4, 4)  # a leading layers axis
    assert unstack_layers(stacked).keys() == params.keys()
    x = tokens(1)
    mask = jnp.asarray(np.random.default_rng(2).random((2, 1, T, T)) > 0.2)
    segments = jnp.asarray([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3])
    for kw in ({}, {"mask": mask}, {"segment_ids": segments}):
        want = model.apply({"params": params}, x, **kw)
        np.testing.assert_allclose(np.asarray(scanned.apply({"params": stacked}, x, **kw)), np.asarray(want),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, x) ** 2)
    grads = jax.grad(loss(scanned))(stacked)
    assert_trees_close(unstack_layers(grads), jax.grad(loss(model))(params), rtol=1e-4, atol=1e-6)


def test_a_scanned_model_decodes_like_its_full_pass_and_generates_the_cached_tokens(unrolled):
    _, params = unrolled
    scanned = TransformerLM(CFG.replace(scan_layers=True))
    stacked = stack_layers(params, CFG.n_layer)
    cache = scanned.init_cache(2, T)
    assert cache["blocks"]["attn"]["cached_key"].shape == (3, 2 * 2, 4, 4)  # layers x (B·K, window, D)
    assert_cached_decode_equals_the_full_pass(scanned, stacked, tokens(3), first=3)
    prompt = tokens(4, (2, 2))
    full = generate(scanned, stacked, prompt, 12, jax.random.key(0), 1.0, top_k=3, use_cache=False)
    np.testing.assert_array_equal(np.asarray(generate(scanned, stacked, prompt, 12, jax.random.key(0), 1.0, top_k=3,
                                                      refill_to=T)), np.asarray(full))  # fmt: skip


def test_remat_rematerializes():
    x = tokens()
    model = TransformerLM(CFG.replace(remat="dots_saveable"))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x))))(params))
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= CFG.n_layer  # one per block
    plain = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(TransformerLM(CFG).apply({"params": p}, x))))(params))
    assert "checkpoint[" not in plain and "remat" not in plain


def test_the_diagnostics_of_a_scanned_model_are_the_unrolled_ones(unrolled):
    model, params = unrolled
    scanned = TransformerLM(CFG.replace(scan_layers=True))
    x = tokens(5)
    want = stats.stability_diagnostics(model, params, x)
    got = stats.stability_diagnostics(scanned, stack_layers(params, CFG.n_layer), x)
    assert got["max_logit"].shape == (3, 4)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-5)


def test_what_cannot_be_scanned_or_rematerialized_is_one_line():
    from flax import nnx

    from attention_jax import nnx as ajx

    with pytest.raises(ValueError, match=r"^ModelConfig\.remat: unknown 'all', valid choices are None, \("):
        CFG.replace(remat="all")
    with pytest.raises(ValueError, match=r"^ModelConfig\.scan_layers: one scanned block serves every layer, but wind"):
        CFG.replace(scan_layers=True, window=(4, None))
    with pytest.raises(ValueError, match=r"^ModelConfig\.scan_layers: .* attn_scale_by_layer"):
        CFG.replace(scan_layers=True, attn_scale_by_layer=True, window=None)
    with pytest.raises(ValueError, match=r"^ModelConfig\.scan_layers and remat are for the Linen TransformerLM"):
        ajx.TransformerLM(CFG.replace(scan_layers=True), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"^model\.remat: unknown 'everything'"):
        model_config(apply_overrides(base_config(), {"model.remat": "everything"}), V)
    cfg = model_config(apply_overrides(base_config(), {"model.scan_layers": "true", "model.remat": "dots_saveable"}), V)
    assert cfg.scan_layers and cfg.remat == "dots_saveable"
