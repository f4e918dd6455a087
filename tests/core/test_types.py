"""Types and dtypes: scales of every kind (numpy, JAX, traced, learnable), dtype objects, float16.

And string options checked at construction, choices in the docstrings, type hints that resolve.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_jax
from attention_jax import attention as A
from attention_jax.generate import generate
from attention_jax.layers import AddPositions, Head, MultiHeadAttention
from attention_jax.model import DTYPES, ModelConfig, TransformerLM
from attention_jax.positions import POS_ENCODINGS

B, T, C, H, D = 2, 5, 16, 2, 8


def normal(seed, shape, scale=1.0, dtype=jnp.float32):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), dtype)


# --- scales -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scale, expected",
    [
        (np.float32(0.25), 0.25),
        (np.float64(0.3), 0.3),
        (np.int64(2), 2.0),
        (0.5, 0.5),
        ("mup", 1 / 8),
    ],
)
def test_resolve_scale_turns_numbers_into_floats(scale, expected):
    got = A.resolve_scale(scale, np.int64(8))
    assert type(got) is float and got == pytest.approx(expected)


@pytest.mark.parametrize("scale", [jnp.float32(0.3), np.array(0.3), np.array([[[0.2]], [[0.4]]]), jnp.array(2)])
def test_resolve_scale_keeps_arrays_as_float_arrays(scale):
    got = A.resolve_scale(scale, 8)
    assert isinstance(got, jax.Array) and jnp.issubdtype(got.dtype, jnp.floating)
    np.testing.assert_allclose(np.asarray(got), np.asarray(scale, np.float64), rtol=1e-6)


@pytest.mark.parametrize(
    "scale, match",
    [
        (np.float32(-1.0), "positive finite"),
        (jnp.array([0.1, -1.0]), "positive and finite"),
        (np.array(np.inf), "positive and finite"),
        (True, r"got (np\.)?True"),
        (np.bool_(True), r"got (np\.)?True"),
        ("rotary", "valid choices are 'mup', 'none', 'sqrt'"),
        (np.array(["a"]), "numeric"),
        (None, "got None"),
    ],
)
def test_resolve_scale_refuses(scale, match):
    with pytest.raises(ValueError, match=match):
        A.resolve_scale(scale, 8)


@pytest.mark.parametrize("impl", ["dense", "xla", "blockwise"])
def test_a_traced_scale_equals_the_static_one_and_has_the_right_gradient(impl):
    q, k, v = normal(0, (B, H, T, D)), normal(1, (B, H, T, D)), normal(2, (B, H, T, D))
    f = lambda s: A.attend(q, k, v, scale=A.resolve_scale(s, D), causal=True, impl=impl)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(0.3)), np.asarray(f(0.3)), rtol=1e-5, atol=1e-6)
    loss = lambda s: jnp.sum(jnp.sin(f(s)))
    grad = float(jax.grad(loss)(jnp.float32(0.3)))
    h = 1e-2
    finite_difference = (float(loss(0.3 + h)) - float(loss(0.3 - h))) / (2 * h)
    assert abs(grad) > 1e-3
    assert grad == pytest.approx(finite_difference, rel=2e-2)


def test_a_per_head_scale_array_scales_each_head(fake_init):
    x = normal(0, (B, T, C))
    scales = np.array([0.2, 0.9])
    per_head = MultiHeadAttention(H, D, scale=jnp.asarray(scales)[:, None, None])
    p = {"params": fake_init(per_head, x, std=0.3)}
    _, st = per_head.apply(p, x, mutable=["intermediates"])
    w = np.asarray(st["intermediates"]["attention_weights"][0])  # (B, H, T, T)
    for h, s in enumerate(scales):
        _, st1 = MultiHeadAttention(H, D, scale=float(s)).apply(p, x, mutable=["intermediates"])
        np.testing.assert_allclose(w[:, h], np.asarray(st1["intermediates"]["attention_weights"][0])[:, h], rtol=1e-6)


def test_a_learnable_temperature_trains_through_the_module(fake_init):
    class Tempered(nn.Module):
        @nn.compact
        def __call__(self, x):
            t = self.param("temperature", nn.initializers.constant(0.5), (), jnp.float32)
            return MultiHeadAttention(H, D, scale=t, name="attn")(x)

    x = normal(0, (B, T, C))
    model = Tempered()
    params = dict(model.init(jax.random.key(0), x)["params"])
    params["attn"] = fake_init(MultiHeadAttention(H, D), x, std=0.3)
    loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
    g = float(jax.grad(loss)(params)["temperature"])
    h = 1e-2
    shift = lambda d: {**params, "temperature": jnp.float32(0.5 + d)}
    assert abs(g) > 1e-4
    assert g == pytest.approx((float(loss(shift(h))) - float(loss(shift(-h)))) / (2 * h), rel=2e-2)


# --- ModelConfig.attn_scale as a runtime value (population training) ----------------------------


def lm_config(**kw):
    return ModelConfig(**{"vocab_size": 11, "block_size": 8, "n_embd": C, "n_head": H, "n_layer": 2, **kw})


def test_model_config_takes_a_jax_scalar_scale_and_checks_concrete_ones():
    assert float(lm_config(attn_scale=jnp.float32(0.3)).attn_scale) == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"ModelConfig\.attn_scale: .*positive"):
        lm_config(attn_scale=jnp.float32(-0.3))
    with pytest.raises(ValueError, match=r"ModelConfig\.attn_scale: an array scale must be a scalar"):
        lm_config(attn_scale=jnp.ones(2))


def test_vmap_over_attention_scales_equals_separate_applies(fake_init):
    cfg = lm_config(pos_encoding="rope")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (B, 8)), jnp.int32)
    params = {"params": fake_init(TransformerLM(cfg), tokens, std=0.3)}
    scales = jnp.array([0.05, 0.35, 1.0])

    def logits(scale):  # the scale is a tracer here: ModelConfig must accept it unchecked
        return TransformerLM(cfg.replace(attn_scale=scale)).apply(params, tokens)

    batched = np.asarray(jax.jit(jax.vmap(logits))(scales))
    for i, s in enumerate(np.asarray(scales)):
        alone = np.asarray(TransformerLM(cfg.replace(attn_scale=float(s))).apply(params, tokens))
        np.testing.assert_allclose(batched[i], alone, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(batched[0] - batched[2])) > 1e-2  # the scale reaches the logits


def test_a_model_with_an_array_scale_is_a_static_argument_of_generate(fake_init):
    cfg = lm_config(attn_scale=jnp.float32(0.4))
    model = TransformerLM(cfg)
    params = fake_init(model, jnp.zeros((1, 8), jnp.int32), std=0.3)
    same = TransformerLM(lm_config(attn_scale=0.4))
    out = generate(model, params, jnp.zeros((1, 2), jnp.int32), 4, jax.random.key(0), 0.0)
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(generate(same, params, jnp.zeros((1, 2), jnp.int32), 4, jax.random.key(0), 0.0))
    )


# --- dtypes ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, name", [(jnp.bfloat16, "bfloat16"), (np.float16, "float16"), ("float32", "float32")])
def test_model_config_dtypes_accept_jax_dtypes_or_names(dtype, name):
    cfg = lm_config(dtype=dtype, param_dtype=dtype)
    assert (cfg.dtype, cfg.param_dtype) == (name, name)


@pytest.mark.parametrize("field", ["dtype", "param_dtype"])
def test_model_config_refuses_other_dtypes(field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}: unknown .*valid choices are"):
        lm_config(**{field: "float64"})
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}"):
        lm_config(**{field: "fp8"})


def test_param_dtype_sets_the_parameters_and_dtype_the_compute():
    model = TransformerLM(lm_config(dtype="bfloat16", param_dtype=jnp.bfloat16, qk_norm=True))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert {x.dtype for x in jax.tree_util.tree_leaves(shapes["params"])} == {jnp.dtype(jnp.bfloat16)}
    mha = MultiHeadAttention(H, D, dtype="bfloat16", param_dtype="float16")
    x = normal(0, (B, T, C))
    v = mha.init(jax.random.key(0), x)
    assert {a.dtype for a in jax.tree_util.tree_leaves(v["params"])} == {jnp.dtype(jnp.float16)}
    assert mha.apply(v, x).dtype == jnp.bfloat16


def test_float16_logits_stay_finite_where_jax_nn_does():
    # k close to q: q·k ~ 64 * 60² = 230,000, beyond float16's 65,504 if the products accumulate in float16
    q = normal(0, (1, T, 1, 64), 60.0, jnp.float16)
    k = (q + normal(1, (1, T, 1, 64), 5.0, jnp.float16)).astype(jnp.float16)
    v = normal(2, (1, T, 1, 64), 1.0, jnp.float16)
    assert not np.all(np.isfinite(np.asarray(jnp.einsum("btnd,bsnd->bnts", q, k))))  # the naive product overflows
    reference = jax.nn.dot_product_attention(q, k, v, scale=0.125, is_causal=True)
    assert np.all(np.isfinite(np.asarray(reference, np.float32)))
    heads = lambda a: jnp.swapaxes(a, 1, 2)  # (B, T, N, D) -> (B, N, T, D)
    for impl in ("dense", "xla"):
        ours = heads(A.attend(heads(q), heads(k), heads(v), scale=0.125, causal=True, impl=impl))
        assert ours.dtype == jnp.float16 and np.all(np.isfinite(np.asarray(ours, np.float32)))
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(reference, np.float32), atol=2e-2)
    logits = A.attention_logits(q[:, :, 0], k[:, :, 0], scale=0.125)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))


# --- string options checked at construction, choices in the docstrings -------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: MultiHeadAttention(H, D, pos_encoding="rotary"),
            r"MultiHeadAttention\.pos_encoding: unknown 'rotary'",
        ),
        (lambda: MultiHeadAttention(H, D, attention_impl="flash"), r"MultiHeadAttention\.attention_impl: unknown"),
        (lambda: MultiHeadAttention(H, D, scale="sqr"), r"MultiHeadAttention\.scale: unknown attention scale"),
        (lambda: MultiHeadAttention(H, 7, pos_encoding="rope"), r"head_size must be even for rope"),
        (lambda: MultiHeadAttention(0, D), r"num_heads must be a positive integer"),
        (lambda: Head(D, pos_encoding="xpos"), r"Head\.pos_encoding: unknown 'xpos'"),
        (lambda: Head(D, scale=-1.0), r"Head\.scale: attention scale must be a positive"),
        (lambda: AddPositions("rotary", 8), r"AddPositions\.kind: unknown 'rotary'"),
        (lambda: lm_config(pos_encoding="rotary"), r"ModelConfig\.pos_encoding: unknown 'rotary'"),
    ],
)
def test_string_options_are_checked_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("obj", [MultiHeadAttention, Head, ModelConfig])
def test_docstrings_list_the_choices(obj):
    doc = inspect.getdoc(obj)
    for choice in (*A.ATTENTION_IMPLS, *A.SCALES):
        assert f'"{choice}"' in doc, (obj.__name__, choice)
    if obj is not Head:
        for choice in POS_ENCODINGS:
            assert f'"{choice}"' in doc, (obj.__name__, choice)
    if obj is ModelConfig:
        for choice in DTYPES:
            assert f'"{choice}"' in doc


# --- type hints, py.typed ---------------------------------------------------------------------


def _public(module):
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield name, obj


@pytest.mark.parametrize("module_name", ["attention_jax", "attention_jax.nnx"])
def test_type_hints_resolve(module_name):
    import importlib

    module = importlib.import_module(module_name)
    for _, obj in _public(module):
        typing.get_type_hints(obj)
        for method in ("__call__", "__init__", "init_cache"):
            if inspect.isclass(obj) and method in vars(obj):
                typing.get_type_hints(getattr(obj, method))


def test_the_package_ships_py_typed():
    assert (Path(attention_jax.__file__).parent / "py.typed").is_file()
