"""AttentionOptions, the one schema of the attention options: defaults, refusals, the shells and configs built on it."""

from __future__ import annotations

import pydoc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_jax import attention as A
from attention_jax import layers
from attention_jax import nnx as ajx
from attention_jax.model import ModelConfig, TransformerLM
from attention_jax.options import AttentionOptions
from attention_jax.positions import POS_ENCODINGS

B, T, C, H, D, V = 2, 6, 16, 2, 8, 11


def x_input(seed=0, shape=(B, T, C)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def tree_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- the schema itself ------------------------------------------------------------------------


def test_defaults():
    o = AttentionOptions()
    assert (o.scale, o.causal, o.qk_norm, o.pos_encoding, o.attention_impl) == ("sqrt", True, False, "none", "dense")
    # a model's positions default to a learned table; every other option as AttentionOptions
    assert ModelConfig(vocab_size=V).attention == AttentionOptions(pos_encoding="learned")


@pytest.mark.parametrize(
    "field, bad",
    [
        ("scale", "bogus"),
        ("scale", -1.0),
        ("scale", 0),
        ("scale", float("nan")),
        ("scale", True),
        ("scale", None),
        ("scale", np.array(["a"])),
        ("scale", jnp.array([0.5, -1.0])),
        ("causal", "yes"),
        ("causal", 1),
        ("qk_norm", None),
        ("pos_encoding", "xpos"),
        ("pos_encoding", 3),
        ("attention_impl", "flash"),
    ],
)
def test_every_refusal_is_one_line_naming_the_field(field, bad):
    with pytest.raises(ValueError) as info:
        AttentionOptions(**{field: bad})
    message = str(info.value)
    assert message.startswith(f"AttentionOptions.{field}") and "\n" not in message, message
    if bad is not None:  # to a shell, None means "not given"
        with pytest.raises(ValueError, match=rf"^MultiHeadAttention\.{field}"):  # the shell says it as its own
            layers.MultiHeadAttention(H, D, **{field: bad})
    model_field = "attn_scale" if field == "scale" else field
    with pytest.raises(ValueError, match=rf"^ModelConfig\.{model_field}"):
        ModelConfig(vocab_size=V, **{model_field: bad})


@pytest.mark.parametrize("head_size, options", [(7, AttentionOptions(pos_encoding="rope")), (0, AttentionOptions())])
def test_the_checks_that_need_the_head_size_take_it(head_size, options):
    with pytest.raises(ValueError, match=r"^AttentionOptions\.head_size (must be even for rope|must be a positive)"):
        options.check(head_size)
    AttentionOptions(pos_encoding="rope").check(8)
    assert options.attention_kwargs(16)["scale"] == 0.25  # a rule resolves with D


def test_error_messages_and_help_list_the_choices_from_the_schema():
    doc = pydoc.render_doc(AttentionOptions)
    for choice in (*A.SCALES, *POS_ENCODINGS, *A.ATTENTION_IMPLS):
        assert f'"{choice}"' in doc, choice
    for field, choices in (("pos_encoding", POS_ENCODINGS), ("attention_impl", A.ATTENTION_IMPLS)):
        with pytest.raises(ValueError) as info:
            AttentionOptions(**{field: "bogus"})
        assert all(repr(c) in str(info.value) for c in choices)


def test_hash_and_equality_by_value_and_array_scales_by_identity():
    a = AttentionOptions(scale=0.5, qk_norm=True)
    assert a == AttentionOptions(scale=np.float32(0.5), qk_norm=True)  # numbers stored as floats
    assert hash(a) == hash(AttentionOptions(scale=0.5, qk_norm=True))
    assert a != a.replace(causal=False) and a != AttentionOptions(scale=0.25, qk_norm=True)
    s = jnp.float32(0.5)
    arr = AttentionOptions(scale=s)
    assert arr == AttentionOptions(scale=s) and hash(arr) == hash(AttentionOptions(scale=s))
    assert arr != AttentionOptions(scale=jnp.float32(0.5))  # another array: another identity
    cfg = ModelConfig(vocab_size=V, attn_scale=s)
    assert cfg == cfg.replace() and hash(cfg) == hash(cfg.replace())
    assert cfg != cfg.replace(attn_scale=jnp.float32(0.5))


def test_a_traced_scale_passes_unchecked_and_a_config_is_a_static_jit_argument():
    traces = []

    @jax.jit
    def traced(s):
        opts = AttentionOptions(scale=s)  # a tracer: nothing to check before it runs
        return opts.attention_kwargs(D)["scale"] * 2

    assert float(traced(jnp.float32(-1.0))) == -2.0

    def f(cfg, x):
        traces.append(cfg)
        return x * cfg.attention.attention_kwargs(cfg.head_dim)["scale"]

    g = jax.jit(f, static_argnums=0)
    cfg = ModelConfig(vocab_size=V, n_embd=16, n_head=2, attn_scale="mup")
    assert float(g(cfg, 1.0)) == pytest.approx(1 / 8)
    g(ModelConfig(vocab_size=V, n_embd=16, n_head=2, attn_scale="mup"), 2.0)  # equal: no second trace
    assert len(traces) == 1
    g(cfg.replace(qk_norm=True), 2.0)
    assert len(traces) == 2


# --- ModelConfig holds one --------------------------------------------------------------------


def test_model_config_flat_names_are_views_of_its_attention_options():
    flat = dict(attn_scale="none", qk_norm="layer", pos_encoding="rope", attention_impl="xla", causal=False)
    cfg = ModelConfig(vocab_size=V, **flat)
    opts = AttentionOptions(scale="none", qk_norm=True, pos_encoding="rope", attention_impl="xla", causal=False)
    assert cfg.attention == opts and cfg == ModelConfig(vocab_size=V, attention=opts)
    assert {k: getattr(cfg, k) for k in flat} == flat
    assert cfg.replace(attn_scale=0.5).attention == opts.replace(scale=0.5)
    assert cfg.replace(attention=AttentionOptions()).pos_encoding == "none"
    assert ModelConfig(vocab_size=V, attention=opts, causal=True).causal  # a flat keyword wins
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_heads'"):
        ModelConfig(vocab_size=V, n_heads=2)
    with pytest.raises(ValueError, match=r"^ModelConfig\.attention must be an AttentionOptions"):
        ModelConfig(vocab_size=V, attention={"scale": "none"})
    with pytest.raises(AttributeError):
        cfg.n_heads  # noqa: B018


# --- the shells take one; today's keywords build one ------------------------------------------

LEGACY = dict(scale="mup", causal=False, qk_norm=True, pos_encoding="rope", attention_impl="dense")


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: layers.MultiHeadAttention(H, D, use_bias=False, **kw),
        lambda **kw: layers.Head(D, **kw),
    ],
    ids=["mha", "head"],
)
def test_linen_keywords_equal_the_options_object(make):
    x = x_input()
    by_keywords, by_options = make(**LEGACY), make(options=AttentionOptions(**LEGACY))
    assert by_keywords.options == by_options.options
    p1, p2 = by_keywords.init(jax.random.key(0), x), by_options.init(jax.random.key(0), x)
    tree_equal(p1, p2)  # the same parameter tree, names and numbers
    tree_equal(by_keywords.apply(p1, x), by_options.apply(p1, x))
    with pytest.raises(ValueError, match=r"\.causal=True contradicts options\.causal=False"):
        make(options=AttentionOptions(**LEGACY), causal=True)
    # the default options are those of a layer built with no keyword at all
    tree_equal(make().init(jax.random.key(1), x), make(options=AttentionOptions()).init(jax.random.key(1), x))


def test_nnx_keywords_equal_the_options_object_and_convert_to_linen():
    x = x_input()
    kw = ajx.FusedMultiHeadAttention(C, H, D, **LEGACY, rngs=nnx.Rngs(0))
    op = ajx.FusedMultiHeadAttention(C, H, D, options=AttentionOptions(**LEGACY), rngs=nnx.Rngs(0))
    assert kw.options == op.options and (kw.scale, kw.pos_encoding) == ("mup", "rope")
    tree_equal(nnx.to_pure_dict(nnx.state(kw, nnx.Param)), nnx.to_pure_dict(nnx.state(op, nnx.Param)))
    tree_equal(kw(x), op(x))
    linen_module, params = ajx.to_linen(op)
    assert linen_module.options == op.options
    tree_equal(linen_module.apply({"params": params}, x), op(x))
    assert ajx.from_linen(linen_module, params).options == op.options
    head = ajx.Head(C, D, options=AttentionOptions(**LEGACY), rngs=nnx.Rngs(0))
    tree_equal(ajx.to_linen(head)[0].apply({"params": ajx.to_linen(head)[1]}, x), head(x))


def test_a_model_built_from_flat_names_equals_one_built_from_options():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)), jnp.int32)
    base = dict(vocab_size=V, block_size=T, n_embd=C, n_head=H, n_layer=2)
    flat = TransformerLM(ModelConfig(**base, attn_scale="none", qk_norm=True, pos_encoding="rope"))
    options = AttentionOptions(scale="none", qk_norm=True, pos_encoding="rope")
    opts = TransformerLM(ModelConfig(**base, attention=options))
    p1, p2 = flat.init(jax.random.key(0), tokens), opts.init(jax.random.key(0), tokens)
    tree_equal(p1, p2)
    tree_equal(flat.apply(p1, tokens), opts.apply(p1, tokens))


# --- the sample option added through the schema: softcap --------------------------------------


def numpy_softcap_attention(q, k, v, scale, softcap, causal=True):
    """An independent float64 reference: softmax(softcap·tanh(q·kᵀ·scale/softcap), masked) · v."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = q @ np.swapaxes(k, -1, -2) * scale
    logits = softcap * np.tanh(logits / softcap)
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


def hand_made_qkv():
    # logits up to ~±40 at scale 1: a cap of 5 changes the weights a lot
    q = np.array([[3.0, -1.0], [0.5, 4.0], [-2.0, 2.0], [6.0, 1.0]])
    k = np.array([[2.0, 1.0], [-3.0, 5.0], [1.0, -4.0], [4.0, 3.0]])
    v = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [3.0, -2.0, 0.5], [-1.0, 4.0, 1.0]])
    return q, k, v


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_softcap_equals_a_float64_numpy_reference(impl):
    q, k, v = hand_made_qkv()
    want = numpy_softcap_attention(q, k, v, scale=1.0, softcap=5.0)
    assert np.max(np.abs(want - numpy_softcap_attention(q, k, v, 1.0, 1e9))) > 0.1  # the cap matters here
    got = A.attend(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), scale=1.0, causal=True, impl=impl, softcap=5.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    w = A.attention_weights(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), scale=1.0, softcap=5.0)
    capped = A.attention_logits(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), scale=1.0, softcap=5.0)
    np.testing.assert_allclose(np.asarray(capped), 5.0 * np.tanh(q @ k.T / 5.0), rtol=1e-6)
    assert np.all(np.abs(np.log(np.asarray(w))) < 2 * 5.0 + np.log(4))  # capped logits: bounded log-weights


def test_blockwise_softcap_gradients_equal_dense():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 10, 4)) * 3, jnp.float32) for _ in range(3))
    g = jnp.asarray(rng.normal(size=(2, 10, 4)), jnp.float32)

    def loss(impl):
        fn = lambda q, k, v: jnp.vdot(A.attend(q, k, v, scale=0.7, causal=True, impl=impl, softcap=2.0), g)
        return jax.grad(fn, argnums=(0, 1, 2))(q, k, v)

    for got, want in zip(loss("blockwise"), loss("dense")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def softcap_model(**kw):
    return ModelConfig(
        **{"vocab_size": V, "block_size": T, "n_embd": C, "n_head": H, "n_layer": 2, "softcap": 1.5, **kw}
    )


def test_softcap_keeps_causality_exact_by_gradients(fake_init):
    module = layers.MultiHeadAttention(H, D, options=AttentionOptions(softcap=1.5, pos_encoding="rope"))
    x = x_input()
    params = fake_init(module, x, std=0.5)
    jac = jax.jacrev(lambda x: module.apply({"params": params}, x))(x)  # (B, T, C, B, T, C)
    dep = np.abs(np.asarray(jac)).sum(axis=(2, 5))[np.arange(B), :, np.arange(B), :]  # (B, T_out, T_in)
    assert np.all(dep[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0.0)  # exactly: no future
    assert np.all(dep[:, np.tril_indices(T)[0], np.tril_indices(T)[1]] > 0.0)


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_softcap_cached_decode_equals_the_full_pass(fake_init, pos_encoding):
    model = TransformerLM(softcap_model(pos_encoding=pos_encoding))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, T)), jnp.int32)
    params = fake_init(model, tokens, std=0.5)
    full = np.asarray(model.apply({"params": params}, tokens))
    uncapped = TransformerLM(softcap_model(softcap=None, pos_encoding=pos_encoding))
    assert np.max(np.abs(full - np.asarray(uncapped.apply({"params": params}, tokens)))) > 1e-3  # the cap acts
    cache = model.init_cache(B, T)
    logits, state = model.apply({"params": params, "cache": cache}, tokens[:, :2], decode=True, mutable=["cache"])
    steps = [np.asarray(logits)]
    for t in range(2, T):
        logits, state = model.apply({"params": params, **state}, tokens[:, t : t + 1], decode=True, mutable=["cache"])
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def test_softcap_nnx_equals_linen(fake_init):
    model = TransformerLM(softcap_model(pos_encoding="rope", qk_norm=True))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, V, (B, T)), jnp.int32)
    params = fake_init(model, tokens, std=0.5)
    twin = ajx.from_linen(model, params)
    np.testing.assert_array_equal(np.asarray(twin(tokens)), np.asarray(model.apply({"params": params}, tokens)))
    mha = layers.MultiHeadAttention(H, D, options=AttentionOptions(softcap=2.0))
    x = x_input()
    p = fake_init(mha, x, std=0.5)
    np.testing.assert_array_equal(np.asarray(ajx.from_linen(mha, p)(x)), np.asarray(mha.apply({"params": p}, x)))


def test_softcap_model_config_round_trip():
    from attention_jax.lab.config import ConfigError, apply_overrides, base_config, from_dict, model_config, to_dict

    cfg = softcap_model()
    assert cfg.softcap == cfg.attention.softcap == 1.5 and cfg.replace(softcap=None).softcap is None
    assert ModelConfig(vocab_size=V).softcap is None
    config = base_config()
    assert config.model.softcap is None and model_config(config, V).softcap is None
    config = apply_overrides(config, {"model.softcap": "30"})  # from the command line
    assert model_config(config, V).attention.softcap == 30.0
    saved = to_dict(config)
    assert model_config(from_dict(saved), V) == model_config(config, V)  # config.json round trip
    del saved["model"]["softcap"]  # a run trained before the option existed
    assert model_config(from_dict(saved), V).softcap is None
    with pytest.raises(ConfigError, match=r"^model\.softcap must be a positive"):
        model_config(apply_overrides(base_config(), {"model.softcap": "-1"}), V)


@pytest.mark.parametrize("bad", [0, -1.0, 0.0, float("inf"), float("nan"), True, "30", np.array(3.0)])
def test_softcap_refuses_bad_values_in_one_line(bad):
    with pytest.raises(ValueError) as info:
        AttentionOptions(softcap=bad)
    assert str(info.value).startswith("AttentionOptions.softcap must be a positive finite number"), str(info.value)
    with pytest.raises(ValueError, match=r"^ModelConfig\.softcap must be"):
        ModelConfig(vocab_size=V, softcap=bad)


@pytest.mark.parametrize("impl", ["xla", "cudnn"])
def test_softcap_is_refused_at_construction_where_the_backend_cannot_cap(impl):
    with pytest.raises(ValueError, match=rf"^AttentionOptions\.softcap: attention_impl '{impl}' cannot soft-cap"):
        AttentionOptions(softcap=5.0).replace(attention_impl=impl)
    with pytest.raises(ValueError, match=rf"^ModelConfig\.softcap: attention_impl '{impl}'"):
        ModelConfig(vocab_size=V, softcap=5.0, attention_impl=impl)
    x = x_input()
    with pytest.raises(ValueError, match="cannot soft-cap"):  # the pure function refuses it too
        A.attend(x, x, x, scale=1.0, impl=impl, softcap=5.0)
