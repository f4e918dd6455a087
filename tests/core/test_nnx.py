"""NNX twins: the same weights give the same outputs and gradients as Linen, both ways.

And an NNX model trains with ``nnx.Optimizer`` and samples with ``generate``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attention_jax import attention as A
from attention_jax import layers
from attention_jax import nnx as ajx
from attention_jax.generate import generate
from attention_jax.model import Block, ModelConfig, TransformerLM, cross_entropy

B, T, C, V = 2, 6, 16, 11


def x_input(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, C)), jnp.float32)


def tokens(seed=0, shape=(B, T)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


def cfg(**kw):
    return ModelConfig(**{"vocab_size": V, "block_size": T, "n_embd": C, "n_head": 2, "n_layer": 2, **kw})


# (linen module, example input): every twin, over the options that change parameters or math
CASES = {
    "head": (layers.Head(8), x_input),
    "head_rope_qknorm": (layers.Head(8, pos_encoding="rope", qk_norm=True, scale="mup"), x_input),
    "mha": (layers.MultiHeadAttention(2, 8), x_input),
    "mha_rope_qknorm_nobias": (
        layers.MultiHeadAttention(3, 4, pos_encoding="rope", qk_norm=True, use_bias=False, out_features=5),
        x_input,
    ),
    "mha_xla": (layers.MultiHeadAttention(2, 8, attention_impl="xla", scale=0.3), x_input),
    "block": (Block(cfg(pos_encoding="rope", qk_norm=True)), x_input),
    "lm_learned": (TransformerLM(cfg()), tokens),
    "lm_sinusoidal_tied_nobias": (
        TransformerLM(cfg(pos_encoding="sinusoidal", tie_embeddings=True, bias=False)),
        tokens,
    ),
    "lm_rope_qknorm": (TransformerLM(cfg(pos_encoding="rope", qk_norm=True)), tokens),
    "lm_none": (TransformerLM(cfg(pos_encoding="none")), tokens),
}


def loss_of(out):
    return jnp.sum(jnp.sin(out))  # every output element matters, with its own weight


def tree_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", CASES)
def test_from_linen_gives_the_same_outputs_and_gradients(fake_init, case):
    module, make_input = CASES[case]
    x = make_input()
    params = fake_init(module, x, std=0.3)
    twin = ajx.from_linen(module, params)
    np.testing.assert_array_equal(np.asarray(twin(x)), np.asarray(module.apply({"params": params}, x)))
    g_linen = jax.grad(lambda p: loss_of(module.apply({"params": p}, x)))(params)
    g_nnx = nnx.grad(lambda m: loss_of(m(x)))(twin)
    tree_close(nnx.to_pure_dict(g_nnx), g_linen)
    if x.dtype == jnp.float32:  # and with respect to the input
        gx_linen = jax.grad(lambda x: loss_of(module.apply({"params": params}, x)))(x)
        gx_nnx = jax.grad(lambda x: loss_of(twin(x)))(x)
        np.testing.assert_allclose(np.asarray(gx_nnx), np.asarray(gx_linen), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["head_rope_qknorm", "mha_rope_qknorm_nobias", "block", "lm_sinusoidal_tied_nobias"])
def test_to_linen_of_an_nnx_model_gives_the_same_outputs_and_gradients(case):
    module, make_input = CASES[case]
    x = make_input(1)
    twin = ajx.from_linen(module, jax.tree_util.tree_map(jnp.zeros_like, module.init(jax.random.key(0), x)["params"]))
    # a fresh NNX model with its own random weights (not those zeros)
    fresh = type(twin)(*_ctor_args(twin, x), rngs=nnx.Rngs(3))
    linen_module, params = ajx.to_linen(fresh)
    assert type(linen_module) is type(module)
    np.testing.assert_array_equal(np.asarray(linen_module.apply({"params": params}, x)), np.asarray(fresh(x)))
    tree_close(
        nnx.to_pure_dict(nnx.grad(lambda m: loss_of(m(x)))(fresh)),
        jax.grad(lambda p: loss_of(linen_module.apply({"params": p}, x)))(params),
    )
    back = ajx.from_linen(linen_module, params)  # and round trip: the very same arrays
    tree_close(nnx.to_pure_dict(nnx.state(back, nnx.Param)), params, rtol=0, atol=0)


def _ctor_args(twin, x):
    if isinstance(twin, (ajx.Block, ajx.TransformerLM)):
        return (twin.model_config,)
    linen_module, _ = ajx.to_linen(twin)
    fields = {f: getattr(twin, f) for f in ("head_size", "scale", "pos_encoding", "qk_norm")}
    if isinstance(twin, ajx.Head):
        return (x.shape[-1], fields["head_size"])
    return (x.shape[-1], twin.num_heads, twin.head_size)


def test_nnx_constructor_options_match_the_linen_fields():
    mha = ajx.FusedMultiHeadAttention(C, 3, 4, pos_encoding="rope", qk_norm=True, use_bias=False, rngs=nnx.Rngs(0))
    linen_module, params = ajx.to_linen(mha)
    assert (linen_module.num_heads, linen_module.head_size, linen_module.pos_encoding) == (3, 4, "rope")
    assert linen_module.qk_norm and not linen_module.use_bias
    assert set(params) == {"qkv_kernel", "proj_kernel", "query_norm", "key_norm"}


def test_from_linen_refuses_parameters_that_do_not_fit(fake_init):
    module = layers.MultiHeadAttention(2, 8)
    params = dict(fake_init(module, x_input()))
    params["extra"] = jnp.zeros(3)
    with pytest.raises(ValueError, match="unexpected.*extra"):
        ajx.from_linen(module, params)
    with pytest.raises(TypeError, match="from_linen converts"):
        ajx.from_linen(layers.FeedForward(8), {})


def test_attention_weights_are_nnx_intermediates_equal_to_linen(fake_init):
    module = layers.MultiHeadAttention(2, 8, pos_encoding="rope")
    x = x_input()
    params = fake_init(module, x, std=0.3)
    _, state = module.apply({"params": params}, x, mutable=["intermediates"])
    twin = ajx.from_linen(module, params)
    _, off = nnx.capture(twin, nnx.Intermediate)(x)
    assert not off  # off by default
    twin.set_attributes(sow_weights=True)
    _, sown = nnx.capture(twin, nnx.Intermediate)(x)
    (w,) = sown["attention_weights"]
    np.testing.assert_array_equal(np.asarray(w), np.asarray(state["intermediates"]["attention_weights"][0]))


def test_masks_and_cross_attention_in_nnx(fake_init):
    module = layers.MultiHeadAttention(2, 8, causal=False)
    xq, xkv = x_input(0), jnp.asarray(np.random.default_rng(1).normal(size=(B, 9, C)), jnp.float32)
    params = fake_init(module, xq, std=0.3)
    mask = A.padding_mask(jnp.array([9, 4]), 9)
    twin = ajx.from_linen(module, params)
    np.testing.assert_array_equal(
        np.asarray(twin(xq, inputs_kv=xkv, mask=mask)),
        np.asarray(module.apply({"params": params}, xq, inputs_kv=xkv, mask=mask)),
    )
    with pytest.raises(ValueError, match="mask must be a boolean array"):
        twin(xq, mask=jnp.zeros((T, T)))


def test_nnx_options_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"MultiHeadAttention\.pos_encoding: unknown 'rotary'"):
        ajx.FusedMultiHeadAttention(C, 2, 8, pos_encoding="rotary", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Head\.attention_impl: unknown 'flash'"):
        ajx.Head(C, 8, attention_impl="flash", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_nnx_decode_cache_equals_the_full_pass(fake_init, pos_encoding):
    module = TransformerLM(cfg(pos_encoding=pos_encoding, qk_norm=True))
    toks = tokens()
    params = fake_init(module, toks, std=0.3)
    twin = ajx.from_linen(module, params)
    with pytest.raises(ValueError, match="init_cache"):
        twin(toks[:, :1], decode=True)
    twin.init_cache(B)
    got = jnp.concatenate(
        [twin(toks[:, :2], decode=True)] + [twin(toks[:, t : t + 1], decode=True) for t in range(2, T)], 1
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(twin(toks)), rtol=1e-5, atol=1e-5)


def test_nnx_dropout_follows_train_and_eval(fake_init):
    module = TransformerLM(cfg(dropout=0.3))
    toks = tokens()
    params = fake_init(module, toks, std=0.3)
    twin = ajx.from_linen(module, params, rngs=nnx.Rngs(0, dropout=1))
    a, b = twin(toks), twin(toks)  # NNX: training mode until eval()
    assert not np.allclose(np.asarray(a), np.asarray(b))
    twin.eval()
    np.testing.assert_array_equal(np.asarray(twin(toks)), np.asarray(module.apply({"params": params}, toks)))


@pytest.mark.slow
def test_an_nnx_model_trains_with_nnx_optimizer_and_samples_with_generate():
    model = ajx.TransformerLM(cfg(n_layer=1, pos_encoding="rope"), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    data = jnp.asarray(np.tile(np.arange(V), 4)[None, : T + 1].repeat(4, 0))  # 0 1 2 ... : learnable by heart
    x, y = data[:, :T], data[:, 1:]

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    out = ajx.generate(model, jnp.array([[0, 1]]), T - 2, jax.random.key(0), temperature=0.0)
    linen_module, params = ajx.to_linen(model)
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(generate(linen_module, params, jnp.array([[0, 1]]), T - 2, jax.random.key(0), 0.0))
    )
    np.testing.assert_array_equal(np.asarray(out)[0], np.arange(T))  # it learned the sequence
    with pytest.raises(TypeError, match="attention_jax.nnx.generate"):
        generate(model, None, jnp.array([[0, 1]]), 2, jax.random.key(0))
