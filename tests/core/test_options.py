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
        ("pos_encoding", "alibi"),
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
    flat = dict(attn_scale="none", qk_norm=True, pos_encoding="rope", attention_impl="xla", causal=False)
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
    kw = ajx.MultiHeadAttention(C, H, D, **LEGACY, rngs=nnx.Rngs(0))
    op = ajx.MultiHeadAttention(C, H, D, options=AttentionOptions(**LEGACY), rngs=nnx.Rngs(0))
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
