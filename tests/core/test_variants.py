"""The attention variants of current models, each an AttentionOptions field: against float64 numpy
references on hand-made inputs, causal by gradients, decode equal to the full pass, NNX equal to Linen,
and their config keys round-tripping through config.json. (softcap, the first, is in test_options.)"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import attention as A
from attention_jax import layers
from attention_jax import nnx as ajx
from attention_jax.blockwise import blockwise_causal_attention
from attention_jax.generate import generate
from attention_jax.model import ModelConfig, TransformerLM
from attention_jax.options import AttentionOptions, from_keywords
from attention_jax.positions import alibi_slopes

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
    return numpy_heads_out(q, k, v, params, scale=scale, causal=causal)


def numpy_heads_out(q, k, v, params, *, scale, causal=True):
    """Softmax attention of float64 q, k, v (B, H, T, D), then the layer's output projection: (B, T, C)."""
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


# --- window: sliding-window (local) attention ---------------------------------------------------


def numpy_window_attention(q, k, v, scale, window):
    """An independent float64 reference: query t averages the values of keys t - W < s <= t."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    T = q.shape[-2]
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    logits = np.where((s <= t) & (s > t - window), q @ np.swapaxes(k, -1, -2) * scale, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def window_qkv(T, seed=0, lead=(2,), d=4):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(*lead, T, d)) * 1.5, jnp.float32) for _ in range(3))


# (T, W, block_q, block_k): tiles that divide T and tiles that do not, windows inside one tile,
# across several, of one key, and as long as the sequence
WINDOW_TILINGS = [(13, 4, 4, 4), (13, 4, 3, 5), (17, 1, 4, 4), (20, 7, 8, 3), (9, 9, 4, 4), (33, 20, 4, 8)]


def test_window_equals_a_float64_numpy_reference_on_hand_made_inputs():
    # hand-made: 5 keys, window 2; query 3 sees keys 2 and 3 only, so key 0's huge logit must not win
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, -1.0]])
    k = np.array([[9.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    v = np.array([[100.0, 0.0], [1.0, 1.0], [2.0, -1.0], [3.0, 5.0], [4.0, 2.0]])
    want = numpy_window_attention(q, k, v, 1.0, 2)
    by_hand = (np.e**2 * v[2] + 1 * v[3]) / (np.e**2 + 1)  # query 3: logits 2 (key 2) and 0 (key 3)
    np.testing.assert_allclose(want[3], by_hand)
    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    for impl in ("dense", "xla", "blockwise"):
        got = A.attend(*args, scale=1.0, causal=True, impl=impl, window=2)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize("T, W, bq, bk", WINDOW_TILINGS)
def test_window_every_backend_and_tiling_equals_the_numpy_reference(T, W, bq, bk):
    q, k, v = window_qkv(T)
    want = numpy_window_attention(q, k, v, 0.5, W)
    for impl in ("dense", "xla"):
        got = A.attend(q, k, v, scale=0.5, causal=True, impl=impl, window=W)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=impl)
    got = blockwise_causal_attention(q, k, v, scale=0.5, window=W, block_q=bq, block_k=bk)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T, W, bq, bk", WINDOW_TILINGS[1::2])
def test_window_blockwise_gradients_equal_dense(T, W, bq, bk):
    q, k, v = window_qkv(T, seed=1)
    g = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
    grads = lambda fn: jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v), g), argnums=(0, 1, 2))(q, k, v)
    dense = grads(lambda q, k, v: A.attend(q, k, v, scale=0.5, causal=True, window=W))
    tiled = grads(lambda q, k, v: blockwise_causal_attention(q, k, v, scale=0.5, window=W, block_q=bq, block_k=bk))
    for got, want in zip(tiled, dense):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["dense", "xla", "blockwise"])
def test_window_causality_by_gradients_sees_exactly_the_last_w_inputs(fake_init, impl):
    W = 3
    module = layers.MultiHeadAttention(H, D, options=AttentionOptions(window=W, attention_impl=impl))
    x = x_input()
    dep = dependence(module, fake_init(module, x, std=0.5), x)  # (B, T_out, T_in)
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    seen = (s <= t) & (s > t - W)  # inputs t - W + 1 .. t
    assert np.all(dep[:, ~seen] == 0.0)  # exactly zero before the window and after t
    assert np.all(dep[:, seen] > 0.0)


def window_lm(window=(3, None), pos_encoding="rope", block=12, **kw):
    return TransformerLM(lm_config(block_size=block, window=window, pos_encoding=pos_encoding, **kw))


@pytest.mark.parametrize("window, pos_encoding", [(3, "rope"), ((3, None), "learned"), (1, "none")])
def test_window_decode_equals_the_full_pass_past_the_window_with_a_cache_of_w_keys(fake_init, window, pos_encoding):
    model = window_lm(window, pos_encoding)
    tokens = tokens_input(shape=(B, 12))
    params = fake_init(model, tokens, std=0.5)
    cache = model.init_cache(B, 12)
    windows = window if isinstance(window, tuple) else (window,)
    for i in range(2):  # the memory: W rows for a window layer, the context for a full one
        w = windows[i % len(windows)]
        assert cache[f"block_{i}"]["attn"]["cached_key"].shape == (B * H, w or 12, D)
    full = assert_cached_decode_equals_the_full_pass(model, params, tokens, first=5)  # a prompt longer than W
    params_full = TransformerLM(lm_config(block_size=12, pos_encoding=pos_encoding))
    assert np.max(np.abs(full - np.asarray(params_full.apply({"params": params}, tokens)))) > 1e-3  # it acts
    for chunks in ((2, 6, 4), (7, 5)):  # chunks longer than the window, after the ring has wrapped
        state, outs, i = {"cache": model.init_cache(B, 12)}, [], 0
        for c in chunks:
            chunk = tokens[:, i : i + c]
            logits, state = model.apply({"params": params, **state}, chunk, decode=True, mutable=["cache"])
            outs.append(np.asarray(logits))
            i += c
        np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_window_nnx_equals_linen_also_when_decoding(fake_init):
    model = window_lm((2, None, 4), n_layer=3)
    tokens = tokens_input(shape=(B, 12))
    params = fake_init(model, tokens, std=0.5)
    twin = ajx.from_linen(model, params)
    full = np.asarray(model.apply({"params": params}, tokens))
    np.testing.assert_array_equal(np.asarray(twin(tokens)), full)
    assert [getattr(twin, f"block_{i}").attn.options.window for i in range(3)] == [2, None, 4]
    twin.init_cache(B, 12)
    steps = [np.asarray(twin(tokens[:, :5], decode=True))]
    steps += [np.asarray(twin(tokens[:, t : t + 1], decode=True)) for t in range(5, 12)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
    back = ajx.to_linen(twin)
    assert back[0].model_config == model.model_config


def test_window_generate_with_the_cache_equals_the_full_window_path(fake_init):
    model = window_lm((3, None))
    prompt = tokens_input(shape=(B, 4))
    params = fake_init(model, prompt, std=0.5)
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=4)):
        full = generate(model, params, prompt, 7, jax.random.key(3), use_cache=False, **kw)
        cached = generate(model, params, prompt, 7, jax.random.key(3), **kw)
        np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4", (), (4, 0), np.array(4)])
def test_window_refuses_bad_values_in_one_line(bad):
    with pytest.raises(ValueError) as info:
        AttentionOptions(window=bad)
    assert str(info.value).startswith("AttentionOptions.window must") and "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^ModelConfig\.window must"):
        ModelConfig(vocab_size=V, window=bad)


def test_window_refusals_of_combinations_name_the_field():
    with pytest.raises(ValueError, match=r"^AttentionOptions\.window: a sliding window needs causal=True"):
        AttentionOptions(window=4, causal=False)
    with pytest.raises(ValueError, match=r"^ModelConfig\.window=64: a window longer than block_size=32"):
        ModelConfig(vocab_size=V, block_size=32, window=64)
    with pytest.raises(ValueError, match=r"^ModelConfig\.window=\(8, 64\): a window longer than block_size"):
        ModelConfig(vocab_size=V, block_size=32, window=(8, 64))
    with pytest.raises(ValueError, match=r"^MultiHeadAttention\.window=\(2, None\): one window per layer is for"):
        layers.MultiHeadAttention(H, D, options=AttentionOptions(window=(2, None)))
    with pytest.raises(ValueError, match="needs causal=True"):
        A.attend(*window_qkv(5), scale=1.0, window=2)
    model = window_lm(3)
    tokens = tokens_input(shape=(B, 12))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
    with pytest.raises(ValueError, match="ring cache takes no mask or bias"):
        jax.eval_shape(
            lambda p: model.apply(
                {"params": p, "cache": model.init_cache(B, 12)}, tokens[:, :2], mask=jnp.ones((2, 3), bool),
                decode=True, mutable=["cache"],
            ),
            params,
        )  # fmt: skip


def test_window_config_key_round_trips_and_is_checked_before_anything_compiles():
    from attention_jax.lab.config import ConfigError, apply_overrides, base_config, from_dict, model_config, to_dict

    assert model_config(base_config(), V).window is None
    config = apply_overrides(base_config(), {"model.window": "[64, null]", "model.block_size": "128"})
    cfg = model_config(config, V)
    assert cfg.window == (64, None) and [cfg.attention.layer(i).window for i in range(3)] == [64, None, 64]
    saved = to_dict(config)
    assert saved["model"]["window"] == [64, None]  # JSON keeps a list
    assert model_config(from_dict(saved), V) == cfg  # config.json round trip
    del saved["model"]["window"]  # a run trained before the option existed
    assert model_config(from_dict(saved), V).window is None
    assert model_config(apply_overrides(base_config(), {"model.window": "32"}), V).window == 32
    with pytest.raises(ConfigError, match=r"^model\.window=512: a window longer than block_size=256"):
        model_config(apply_overrides(base_config(), {"model.window": "512"}), V)
    with pytest.raises(ConfigError, match=r"^model\.window must be a positive integer"):
        model_config(apply_overrides(base_config(), {"model.window": "wide"}), V)


# --- sinks, ALiBi and log-n scaling: one float64 reference for all three ------------------------


def numpy_attention(q, k, v, scale, *, window=None, sinks=None, alibi=None, logn=None, softcap=None):
    """Independent float64 causal attention with the variants: q, k, v (H, T, D); sinks, alibi, logn (H,) or None."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    H, T = q.shape[0], q.shape[-2]
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    logits = q @ np.swapaxes(k, -1, -2) * scale  # (H, T, T)
    if logn is not None:  # Scalable-Softmax: times s·log(n_t), n_t = keys query t sees
        n = t + 1 if window is None else np.minimum(t + 1, window)
        logits = logits * np.asarray(logn, np.float64).reshape(H, 1, 1) * np.log(n)
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    if alibi is not None:  # -m_h (t - s)
        logits = logits - np.asarray(alibi, np.float64).reshape(H, 1, 1) * (t - s)
    seen = (s <= t) if window is None else (s <= t) & (s > t - window)
    logits = np.where(seen, logits, -np.inf)
    if sinks is not None:  # one more column, dropped after the softmax
        sink = np.broadcast_to(np.asarray(sinks, np.float64).reshape(H, 1, 1), (H, T, 1))
        logits = np.concatenate([logits, sink], axis=-1)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True))[..., :T]
    return p @ v


VARIANTS = {  # AttentionOptions fields -> (attention_heads keywords, numpy_attention keywords) for 3 heads
    "sinks": (dict(sinks=np.array([-1.0, 0.5, 2.0], np.float32)), dict(sinks=[-1.0, 0.5, 2.0])),
    "alibi": (dict(alibi=np.array([0.5, 0.25, 1.0], np.float32)), dict(alibi=[0.5, 0.25, 1.0])),
    "logn": (dict(logn=np.array([0.3, 1.0, 0.6], np.float32)), dict(logn=[0.3, 1.0, 0.6])),
}


def test_sinks_alibi_and_logn_equal_float64_numpy_on_hand_made_inputs():
    # Two keys with logit 0 and a sink of 0: each key gets 1/3, the sink the last third (and no value).
    q, k = jnp.zeros((1, 2, 2)), jnp.ones((1, 2, 2))
    v = jnp.asarray([[[3.0, 0.0], [0.0, 6.0]]])
    for impl in ("dense", "xla", "blockwise"):
        out = A.attend(q, k, v, scale=1.0, causal=True, impl=impl, sinks=jnp.zeros((1,)))
        np.testing.assert_allclose(np.asarray(out[0, 1]), [1.0, 2.0], rtol=1e-6, err_msg=impl)  # (3 + 0)/3, (0 + 6)/3
        np.testing.assert_allclose(np.asarray(out[0, 0]), [1.5, 0.0], rtol=1e-6, err_msg=impl)  # 1/2 of key 0
    # ALiBi with slope log 2 and equal logits: key s gets weight proportional to 2^-(t - s).
    out = A.attend(q, k, v, scale=1.0, causal=True, alibi=jnp.asarray([np.log(2.0)]))
    np.testing.assert_allclose(np.asarray(out[0, 1]), [3.0 / 3, 6.0 * 2 / 3], rtol=1e-6)
    # Log-n: query 1 sees n = 2 keys; with logits (1, 0) and s = 1/log 2 they become (1/log2 · log2 = 1, 0).
    q2, k2 = jnp.asarray([[[1.0, 0.0], [1.0, 0.0]]]), jnp.asarray([[[1.0, 0.0], [0.0, 0.0]]])
    out, _ = A.attention_heads(q2, k2, v, scale=1.0, causal=True, impl="dense", rope=False, logn=1 / np.log(2.0))
    np.testing.assert_allclose(np.asarray(out[0, 1]), (np.e * v[0, 0] + v[0, 1]) / (np.e + 1), rtol=1e-6)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("T, W, bq, bk", [(13, None, 4, 4), (13, 4, 3, 5), (20, 7, 8, 3)])
def test_each_variant_on_every_backend_and_tiling_equals_the_numpy_reference(variant, T, W, bq, bk):
    ours, ref = VARIANTS[variant]
    q, k, v = window_qkv(T, lead=(3,))
    want = numpy_attention(q, k, v, 0.5, window=W, **ref)
    for impl in ("dense", "xla", "blockwise"):
        got, _ = A.attention_heads(q, k, v, scale=0.5, causal=True, impl=impl, rope=False, window=W, **ours)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=impl)
    if variant != "logn":  # (log-n acts on q before any backend)
        kw = {name: jnp.asarray(value) for name, value in ours.items()}
        got = blockwise_causal_attention(q, k, v, scale=0.5, window=W, block_q=bq, block_k=bk, **kw)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_sinks_with_softcap_the_sink_is_not_capped():
    q, k, v = window_qkv(9, lead=(3,))
    sinks = np.array([-1.0, 0.5, 2.0], np.float32)
    want = numpy_attention(q, k, v, 2.0, sinks=sinks, softcap=1.5)
    for impl in ("dense", "blockwise"):
        got = A.attend(q, k, v, scale=2.0, causal=True, impl=impl, softcap=1.5, sinks=sinks)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize("W, bq, bk", [(None, 4, 4), (5, 3, 5)])
def test_blockwise_gradients_with_sinks_and_alibi_equal_dense_sinks_included(W, bq, bk):
    q, k, v = window_qkv(13, seed=3, lead=(3,))
    g = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)
    sinks, slopes = jnp.asarray([-1.0, 0.5, 2.0]), jnp.asarray([0.5, 0.25, 1.0])
    grads = lambda fn: jax.grad(lambda q, k, v, s: jnp.vdot(fn(q, k, v, s), g), argnums=(0, 1, 2, 3))(q, k, v, sinks)
    dense = grads(lambda q, k, v, s: A.attend(q, k, v, scale=0.5, causal=True, window=W, sinks=s, alibi=slopes))
    tiled = grads(
        lambda q, k, v, s: blockwise_causal_attention(
            q, k, v, scale=0.5, window=W, sinks=s, alibi=slopes, block_q=bq, block_k=bk
        )
    )
    for name, got, want in zip("qkv", tiled, dense):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.asarray(tiled[3]), np.asarray(dense[3]), rtol=1e-4, atol=1e-6, err_msg="sinks")
    assert np.all(np.abs(np.asarray(dense[3])) > 1e-4)  # the sinks do get a gradient


def test_a_row_with_no_key_left_gives_zero_with_sinks_on_every_backend():
    q, k, v = window_qkv(4, lead=(3,))
    mask = jnp.asarray(np.array([True, False, True, True])[:, None] & np.ones((1, 4), bool))  # query 1 sees nothing
    for impl in ("dense", "xla"):
        out = A.attend(q, k, v, scale=1.0, causal=True, mask=mask, impl=impl, sinks=jnp.zeros(3))
        np.testing.assert_array_equal(np.asarray(out[:, 1]), 0.0)
        assert np.all(np.abs(np.asarray(out[:, 2])) > 0)


def test_alibi_slopes_are_the_papers():
    np.testing.assert_allclose(alibi_slopes(8), [2.0**-i for i in range(1, 9)])
    np.testing.assert_allclose(alibi_slopes(4), [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])
    # not a power of two (Press et al.'s rule): the 4 slopes of 4 heads, then every other one of 8's
    np.testing.assert_allclose(alibi_slopes(6), [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3])
    assert alibi_slopes(1).tolist() == [2.0**-8]


VARIANT_LMS = {  # ModelConfig fields of each variant's language model
    "sinks": dict(sinks=True, pos_encoding="rope"),
    "alibi": dict(pos_encoding="alibi"),
    "logn": dict(logn_scale=0.4, logn_learned=True, pos_encoding="learned"),
    "all, windowed": dict(sinks=True, pos_encoding="alibi", logn_scale=0.4, window=(3, None)),
}


@pytest.mark.parametrize("variant", sorted(VARIANT_LMS))
def test_variant_lm_decodes_like_its_full_pass_and_nnx_equals_linen(fake_init, variant):
    model = TransformerLM(lm_config(block_size=12, **VARIANT_LMS[variant]))
    tokens = tokens_input(shape=(B, 12))
    params = fake_init(model, tokens, std=0.5)
    attn = params["block_0"]["attn"]
    assert ("sinks" in attn) == model.model_config.sinks and ("logn_scale" in attn) == model.model_config.logn_learned
    assert ("positions" in params) == (model.model_config.pos_encoding == "learned")  # alibi: no table
    full = assert_cached_decode_equals_the_full_pass(model, params, tokens, first=5)
    if variant != "alibi":  # the variant acts: the same weights without it give other logits
        plain = TransformerLM(lm_config(block_size=12, pos_encoding=model.model_config.pos_encoding))
        drop = lambda tree: {
            name: drop(sub) if isinstance(sub, dict) else sub
            for name, sub in tree.items()
            if name not in ("sinks", "logn_scale")
        }
        assert np.max(np.abs(full - np.asarray(plain.apply({"params": drop(params)}, tokens)))) > 1e-3
    twin = ajx.from_linen(model, params)
    np.testing.assert_allclose(np.asarray(twin(tokens)), full, rtol=1e-6, atol=1e-6)
    twin.init_cache(B, 12)
    steps = [np.asarray(twin(tokens[:, :5], decode=True))]
    steps += [np.asarray(twin(tokens[:, t : t + 1], decode=True)) for t in range(5, 12)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
    assert ajx.to_linen(twin)[0].model_config == model.model_config


def test_variant_lms_stay_causal_by_exact_gradients(fake_init):
    module = layers.MultiHeadAttention(
        3, D, options=AttentionOptions(sinks=True, pos_encoding="alibi", logn_scale=0.5, logn_learned=True)
    )
    x = x_input()
    dep = dependence(module, fake_init(module, x, std=0.5), x)  # (B, T_out, T_in)
    future = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(dep[:, future] == 0.0) and np.all(dep[:, ~future] > 0.0)


def test_generate_with_the_cache_equals_the_full_window_path_for_the_variants(fake_init):
    model = TransformerLM(lm_config(block_size=8, sinks=True, pos_encoding="alibi", logn_scale=0.4))
    prompt = tokens_input(shape=(B, 3))
    params = fake_init(model, prompt, std=0.5)
    full = generate(model, params, prompt, 9, jax.random.key(3), 1.0, top_k=4, use_cache=False)
    cached = generate(model, params, prompt, 9, jax.random.key(3), 1.0, top_k=4, refill_to=8)  # refills past 8
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))


@pytest.mark.parametrize(
    "field, bad, why",
    [
        ("sinks", 1, "must be True or False"),
        ("logn_scale", 0.0, "must be a positive finite number"),
        ("logn_scale", "log", "must be a positive finite number"),
        ("logn_learned", True, "needs logn_scale"),
    ],
)
def test_sinks_and_logn_refuse_bad_values_in_one_line(field, bad, why):
    with pytest.raises(ValueError) as info:
        AttentionOptions(**{field: bad})
    assert str(info.value).startswith(f"AttentionOptions.{field}") and why in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=rf"^ModelConfig\.{field}"):
        ModelConfig(vocab_size=V, **{field: bad})


def test_variant_config_keys_round_trip_and_are_checked_before_anything_compiles():
    from attention_jax.lab.config import ConfigError, apply_overrides, base_config, from_dict, model_config, to_dict

    plain = model_config(base_config(), V)
    assert (plain.sinks, plain.logn_scale, plain.logn_learned) == (False, None, False)
    overrides = {"model.sinks": "true", "model.pos_encoding": "alibi", "model.logn_scale": "0.3",
                 "model.logn_learned": "true"}  # fmt: skip
    config = apply_overrides(base_config(), overrides)
    cfg = model_config(config, V)
    assert (cfg.sinks, cfg.pos_encoding, cfg.logn_scale, cfg.logn_learned) == (True, "alibi", 0.3, True)
    saved = to_dict(config)
    assert model_config(from_dict(saved), V) == cfg  # config.json round trip
    for key in ("sinks", "logn_scale", "logn_learned"):
        del saved["model"][key]  # a run trained before the options existed
    assert model_config(from_dict(saved), V).attention == cfg.attention.replace(
        sinks=False, logn_scale=None, logn_learned=False
    )
    with pytest.raises(ConfigError, match=r"^model\.logn_scale must be a positive"):
        model_config(apply_overrides(base_config(), {"model.logn_scale": "-1"}), V)
    with pytest.raises(ConfigError, match=r"^model\.logn_learned: a learned log-n scale needs logn_scale"):
        model_config(apply_overrides(base_config(), {"model.logn_learned": "true"}), V)


# --- packed sequences: segment_ids ----------------------------------------------------------------


def test_segment_positions_restart_per_document():
    from attention_jax.positions import segment_positions

    ids = jnp.asarray([[7, 7, 7, 2, 2, 7], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(segment_positions(ids)), [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])


def numpy_packed_attention(q, k, v, scale, segments, window=None):
    """float64: causal (and windowed) attention within each segment only."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    T = q.shape[-2]
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    seg = np.asarray(segments)
    seen = (s <= t) & (seg[..., :, None] == seg[..., None, :])
    if window is not None:
        seen &= s > t - window
    logits = np.where(seen, q @ np.swapaxes(k, -1, -2) * scale, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


PACKED = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7, 7]])


@pytest.mark.parametrize("W, bq, bk", [(None, 4, 4), (None, 3, 5), (5, 4, 3)])
def test_segment_ids_on_every_backend_equal_the_numpy_reference(W, bq, bk):
    q, k, v = window_qkv(13, lead=(2, 3))
    seg = jnp.asarray(PACKED)[:, None, :]  # (B, 1, T): one id per token for every head
    want = numpy_packed_attention(q, k, v, 0.5, np.broadcast_to(PACKED[:, None, :], (2, 3, 13)), W)
    for impl in ("dense", "xla", "blockwise", "splash"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # splash: interpret mode
            got = A.attend(q, k, v, scale=0.5, causal=True, impl=impl, window=W, segment_ids=seg)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=impl)
    got = blockwise_causal_attention(q, k, v, scale=0.5, window=W, segment_ids=seg, block_q=bq, block_k=bk)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    g = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32)
    grads = lambda fn: jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v), g), argnums=(0, 1, 2))(q, k, v)
    dense = grads(lambda q, k, v: A.attend(q, k, v, scale=0.5, causal=True, window=W, segment_ids=seg))
    tiled = grads(lambda q, k, v: blockwise_causal_attention(q, k, v, scale=0.5, window=W, segment_ids=seg,
                                                             block_q=bq, block_k=bk))  # fmt: skip
    for a, b in zip(tiled, dense):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal", "rope", "alibi", "none"])
def test_a_packed_row_gives_each_document_the_logits_it_has_alone(fake_init, pos_encoding):
    # Three documents of 4, 5 and 3 tokens in one row of 12: positions restart, nothing crosses a boundary.
    model = TransformerLM(lm_config(block_size=12, pos_encoding=pos_encoding, logn_scale=0.5))
    tokens = tokens_input(shape=(2, 12))
    params = fake_init(model, tokens, std=0.5)
    bounds = [(0, 4), (4, 9), (9, 12)]
    seg = jnp.asarray(np.repeat(np.arange(3), [4, 5, 3])[None].repeat(2, 0), jnp.int32)
    packed = np.asarray(model.apply({"params": params}, tokens, segment_ids=seg))
    for a, b in bounds:
        alone = np.asarray(model.apply({"params": params}, tokens[:, a:b]))
        np.testing.assert_allclose(packed[:, a:b], alone, rtol=1e-5, atol=1e-5, err_msg=f"document {a}:{b}")
    assert np.max(np.abs(packed - np.asarray(model.apply({"params": params}, tokens)))) > 1e-3  # packing acts
    twin = ajx.from_linen(model, params)
    np.testing.assert_allclose(np.asarray(twin(tokens, segment_ids=seg)), packed, rtol=1e-5, atol=1e-5)


def test_no_gradient_crosses_a_document_boundary(fake_init):
    from attention_jax.model import Block

    block = Block(lm_config(block_size=T, pos_encoding="rope", window=4))
    x = x_input()
    seg = jnp.asarray([[0, 0, 1, 1, 1, 1], [3, 3, 3, 3, 3, 9]], jnp.int32)
    params = fake_init(block, x, std=0.5)
    jac = jax.jacrev(lambda x: block.apply({"params": params}, x, segment_ids=seg))(x)  # (B, T, C, B, T, C)
    dep = np.abs(np.asarray(jac)).sum(axis=(2, 5))[np.arange(B), :, np.arange(B), :]  # (B, T out, T in)
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    ids = np.asarray(seg)
    seen = (s <= t) & (s > t - 4) & (ids[:, :, None] == ids[:, None, :])  # (B, T, T)
    assert np.all(dep[~seen] == 0.0)  # exactly: no earlier document, nothing outside the window, no future
    assert np.all(dep[seen] > 0.0)


@pytest.mark.parametrize(
    "bad, why",
    [
        (jnp.zeros((2, 11), jnp.int32), r"segment_ids of shape \(2, 11\) must have the tokens' shape \(2, 12\)"),
        (jnp.zeros((2, 12), jnp.float32), r"segment_ids must be integers"),
    ],
)
def test_bad_segment_ids_are_refused_in_one_line_before_anything_compiles(bad, why):
    model = TransformerLM(lm_config(block_size=12))
    tokens = tokens_input(shape=(2, 12))
    with pytest.raises(ValueError, match=why):
        jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, segment_ids=bad))
    with pytest.raises(ValueError, match="decode one document at a time"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, segment_ids=jnp.zeros((2, 12), int), decode=True))
    with pytest.raises(ValueError, match=r"segment_ids must be integers"):
        A.attend(*window_qkv(5), scale=1.0, causal=True, segment_ids=jnp.zeros(5))


def test_a_reused_segment_id_starts_a_new_document(fake_init):
    # [7, 7, 7, 2, 2, 7]: three documents (runs), the last one token long, for the mask and the positions alike
    from attention_jax.positions import segment_runs

    ids = jnp.asarray([[7, 7, 7, 2, 2, 7]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(segment_runs(ids)), [[0, 0, 0, 1, 1, 2]])
    assert not bool(A.segment_mask(ids)[0, 5, 0])
    model = TransformerLM(lm_config(block_size=T, pos_encoding="rope"))
    tokens = tokens_input(shape=(1, T))
    params = fake_init(model, tokens, std=0.5)
    packed = np.asarray(model.apply({"params": params}, tokens, segment_ids=ids))
    alone = np.asarray(model.apply({"params": params}, tokens[:, 5:]))
    np.testing.assert_allclose(packed[:, 5:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["dense", "xla", "blockwise"])
def test_a_single_head_takes_the_per_head_options_batched_or_not(fake_init, impl):
    x = x_input()
    for kw in (dict(pos_encoding="alibi"), dict(sinks=True), dict(logn_scale=0.5, logn_learned=True)):
        head = layers.Head(D, options=AttentionOptions(attention_impl=impl, **kw))
        params = fake_init(head, x, std=0.5)
        assert all(np.ndim(p) == 0 for n, p in params.items() if n in ("sinks", "logn_scale"))  # one head: scalars
        batched = np.asarray(head.apply({"params": params}, x))
        alone = np.asarray(head.apply({"params": params}, x[0]))
        assert batched.shape == (B, T, D) and alone.shape == (T, D), kw
        np.testing.assert_allclose(alone, batched[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_attend_refuses_a_bad_window_on_every_backend(bad):
    q, k, v = window_qkv(5)
    for impl in ("dense", "xla", "blockwise"):
        with pytest.raises(ValueError, match="window must be a positive integer"):
            A.attend(q, k, v, scale=1.0, causal=True, impl=impl, window=bad)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        blockwise_causal_attention(q, k, v, scale=1.0, window=bad)
