"""The attention variants of current models, each an AttentionOptions field: against float64 numpy
references on hand-made inputs, causal by gradients, decode equal to the full pass, NNX equal to Linen,
and their config keys round-tripping through config.json. (softcap, the first, is in test_options.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import layers
from attention_jax import nnx as ajx
from attention_jax.model import ModelConfig, TransformerLM
from attention_jax.options import AttentionOptions, from_keywords

B, T, C, H, D, V = 2, 6, 16, 2, 8, 11


def x_input(seed=0, shape=(B, T, C)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def tokens_input(seed=1, shape=(B, T)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


def lm_config(**kw):
    return ModelConfig(**{"vocab_size": V, "block_size": T, "n_embd": C, "n_head": H, "n_layer": 2, **kw})


def dependence(module, params, x):
    """|d out_t / d x_s| summed over channels, per batch row: (B, T_out, T_in), from the exact Jacobian."""
    jac = jax.jacrev(lambda x: module.apply({"params": params}, x))(x)  # (B, T, C, B, T, C)
    return np.abs(np.asarray(jac)).sum(axis=(2, 5))[np.arange(B), :, np.arange(B), :]


def assert_cached_decode_equals_the_full_pass(model, params, tokens, first=2):
    """A prompt of ``first`` tokens, then one token per call, against one full forward pass."""
    full = np.asarray(model.apply({"params": params}, tokens))
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    logits, state = model.apply({"params": params, "cache": cache}, tokens[:, :first], decode=True, mutable=["cache"])
    steps = [np.asarray(logits)]
    for t in range(first, tokens.shape[1]):
        logits, state = model.apply({"params": params, **state}, tokens[:, t : t + 1], decode=True, mutable=["cache"])
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
    return full


def numpy_mha(x, params, *, scale, norm=None, causal=True):
    """An independent float64 multi-head attention from a MultiHeadAttention's parameters.

    ``norm(a, which)`` normalizes q ("query") or k ("key") over D, or None for no q/k norm.
    """
    x = np.asarray(x, np.float64)
    w = np.asarray(params["qkv_kernel"], np.float64)  # (C, 3, H, D)
    q, k, v = (np.einsum("btc,chd->bhtd", x, w[:, i]) for i in range(3))  # (B, H, T, D)
    if norm is not None:
        q, k = norm(q, "query"), norm(k, "key")
    logits = q @ np.swapaxes(k, -1, -2) * scale  # (B, H, T, T)
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    out = (p / p.sum(-1, keepdims=True)) @ v  # (B, H, T, D)
    proj = np.einsum("bhtd,hdc->btc", out, np.asarray(params["proj_kernel"], np.float64))
    return proj + np.asarray(params["proj_bias"], np.float64)


# --- qk_norm: "layer" (True) or "rms", with or without a learned gain --------------------------


def numpy_qk_norm(kind, params, gain):
    def norm(a, which):
        if kind == "rms":
            out = a / np.sqrt(np.mean(a**2, -1, keepdims=True) + 1e-6)
        else:
            mean = a.mean(-1, keepdims=True)
            out = (a - mean) / np.sqrt(np.mean((a - mean) ** 2, -1, keepdims=True) + 1e-5)
        if gain:
            p = params[f"{which}_norm"]
            out = out * np.asarray(p["scale"], np.float64) + np.asarray(p.get("bias", 0.0), np.float64)
        return out

    return norm


@pytest.mark.parametrize("kind, gain", [("rms", True), ("rms", False), ("layer", False), ("layer", True)])
def test_qk_norm_equals_a_float64_numpy_reference(fake_init, kind, gain):
    module = layers.MultiHeadAttention(H, D, options=AttentionOptions(qk_norm=kind, qk_norm_gain=gain, scale=0.12))
    x = x_input() * 3.0 + 1.0  # a mean offset: LayerNorm and RMSNorm differ on it
    params = fake_init(module, x, std=0.5)
    assert ("query_norm" in params) == gain and ("bias" in params.get("key_norm", {})) == (gain and kind == "layer")
    got = np.asarray(module.apply({"params": params}, x))
    want = numpy_mha(x, params, scale=0.12, norm=numpy_qk_norm(kind, params, gain))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    other = numpy_mha(x, params, scale=0.12, norm=numpy_qk_norm("layer" if kind == "rms" else "rms", params, gain))
    assert np.max(np.abs(got - other)) > 1e-3  # the two norms are told apart on these inputs


def test_qk_norm_true_is_layer_norm_as_before():
    assert AttentionOptions(qk_norm=True) == AttentionOptions(qk_norm="layer")
    assert AttentionOptions(qk_norm=np.bool_(True)).qk_norm == "layer"
    assert AttentionOptions(qk_norm=False).qk_norm is False
    assert ModelConfig(vocab_size=V, qk_norm=True).qk_norm == "layer"
    # a keyword True agrees with options holding "layer" (the same option, as stored)
    assert from_keywords("Head", AttentionOptions(qk_norm="layer"), D, qk_norm=True).qk_norm == "layer"
    with pytest.raises(ValueError, match=r"^Head\.qk_norm=True contradicts options\.qk_norm='rms'"):
        from_keywords("Head", AttentionOptions(qk_norm="rms"), D, qk_norm=True)
    x = x_input()
    shapes = lambda **kw: jax.tree.map(jnp.shape, layers.MultiHeadAttention(H, D, **kw).init(jax.random.key(0), x))
    assert shapes(qk_norm=True) == shapes(options=AttentionOptions(qk_norm="layer"))


@pytest.mark.parametrize(
    "field, bad", [("qk_norm", "batch"), ("qk_norm", 1), ("qk_norm", None), ("qk_norm_gain", "no")]
)
def test_qk_norm_refuses_bad_values_in_one_line(field, bad):
    with pytest.raises(ValueError) as info:
        AttentionOptions(**{field: bad})
    assert str(info.value).startswith(f"AttentionOptions.{field}") and "\n" not in str(info.value)
    if field == "qk_norm":
        assert "'rms'" in str(info.value)  # the choices, from the schema
    with pytest.raises(ValueError, match=rf"^ModelConfig\.{field}"):
        ModelConfig(vocab_size=V, **{field: bad})


@pytest.mark.parametrize("gain", [True, False])
def test_qk_rms_norm_model_decodes_like_its_full_pass_and_nnx_equals_linen(fake_init, gain):
    model = TransformerLM(lm_config(qk_norm="rms", qk_norm_gain=gain, attn_scale=0.12, pos_encoding="rope"))
    tokens = tokens_input()
    params = fake_init(model, tokens, std=0.5)
    full = assert_cached_decode_equals_the_full_pass(model, params, tokens)
    np.testing.assert_array_equal(np.asarray(ajx.from_linen(model, params)(tokens)), full)


def test_qk_rms_norm_keeps_causality_exact_by_gradients(fake_init):
    module = layers.MultiHeadAttention(H, D, options=AttentionOptions(qk_norm="rms"))
    x = x_input()
    dep = dependence(module, fake_init(module, x, std=0.5), x)
    future, past = np.triu(np.ones((T, T), bool), 1), np.tril(np.ones((T, T), bool))
    assert np.all(dep[:, future] == 0.0) and np.all(dep[:, past] > 0.0)


def test_qk_norm_config_keys_round_trip():
    from attention_jax.lab.config import ConfigError, apply_overrides, base_config, from_dict, model_config, to_dict

    config = base_config()
    assert model_config(config, V).qk_norm is False and model_config(config, V).qk_norm_gain is True
    for text, want in (("rms", "rms"), ("true", "layer"), ("layer", "layer"), ("false", False)):
        assert model_config(apply_overrides(base_config(), {"model.qk_norm": text}), V).qk_norm == want
    config = apply_overrides(base_config(), {"model.qk_norm": "rms", "model.qk_norm_gain": "false"})
    saved = to_dict(config)
    assert model_config(from_dict(saved), V) == model_config(config, V)  # config.json round trip
    assert model_config(from_dict(saved), V).attention == AttentionOptions(
        qk_norm="rms", qk_norm_gain=False, pos_encoding="learned"
    )
    saved["model"]["qk_norm"] = True  # a run written before "rms" existed: True still loads as LayerNorm
    del saved["model"]["qk_norm_gain"]
    assert model_config(from_dict(saved), V).attention == AttentionOptions(qk_norm="layer", pos_encoding="learned")
    with pytest.raises(ConfigError, match=r"^model\.qk_norm: unknown 'maybe', valid choices are False, True"):
        model_config(apply_overrides(base_config(), {"model.qk_norm": "maybe"}), V)
