"""Masks, biases, cross-attention and leading batch axes, checked against independent numpy computations.

The numpy reference (float64) knows nothing of the library: it projects with
the parameters, applies the mask as "drop these logits", softmaxes the rest,
and defines a row with nothing left as zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import attention as A
from attention_jax.layers import Head, MultiHeadAttention
from attention_jax.model import Block, ModelConfig, TransformerLM

B, T, S, C, H, D = 2, 6, 9, 16, 2, 8
MASK_IMPLS = ["dense", "xla"]  # the impls that take a mask on CPU ("cudnn" takes one too, on a GPU)


def normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def random_mask(seed, shape, p=0.6):
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


def np_attention(q, k, v, scale, mask=None, bias=None):
    """float64 reference: (..., T, D), (..., S, D) -> (..., T, Dv); a row with no key is 0."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = scale * q @ np.swapaxes(k, -1, -2)
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    keep = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), logits.shape)
    logits = np.where(keep, logits, -np.inf)
    top = np.max(logits, axis=-1, keepdims=True)
    e = np.where(keep, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = e.sum(-1, keepdims=True)
    w = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return w @ v


def np_mha(p, xq, xkv, scale, mask=None):
    """MultiHeadAttention by hand: the fused kernel's q slice on xq, k and v slices on xkv."""
    w = np.asarray(p["qkv_kernel"], np.float64)  # (C, 3, H, D)
    heads = lambda x, i: np.einsum("...tc,chd->...htd", np.asarray(x, np.float64), w[:, i])
    out = np_attention(heads(xq, 0), heads(xkv, 1), heads(xkv, 2), scale, mask)  # (..., H, T, D)
    y = np.einsum("...htd,hdc->...tc", out, np.asarray(p["proj_kernel"], np.float64))
    return y + np.asarray(p["proj_bias"], np.float64)


# --- boolean masks only ---------------------------------------------------------------

FLOAT_MASK = jnp.where(A.causal_mask(T), 0.0, -jnp.inf)  # the additive form that used to be read inverted


def _entry_points(fake_init):
    x = normal(0, (B, T, C))
    q = normal(1, (B, T, D))
    mha, head = MultiHeadAttention(H, D), Head(D)
    cfg = ModelConfig(vocab_size=7, block_size=T, n_embd=C, n_head=H, n_layer=1)
    block, lm = Block(cfg), TransformerLM(cfg)
    tokens = jnp.zeros((B, T), jnp.int32)
    call = lambda m, *a: lambda mask: m.apply({"params": fake_init(m, *a)}, *a, mask=mask)
    return {
        "attention_weights": lambda mask: A.attention_weights(q, q, scale=1.0, mask=mask),
        "dot_product_attention": lambda mask: A.dot_product_attention(q, q, q, scale=1.0, mask=mask),
        "attend_dense": lambda mask: A.attend(q, q, q, scale=1.0, mask=mask),
        "attend_xla": lambda mask: A.attend(q, q, q, scale=1.0, mask=mask, impl="xla"),
        "Head": call(head, x),
        "MultiHeadAttention": call(mha, x),
        "Block": call(block, x),
        "TransformerLM": call(lm, tokens),
    }


@pytest.mark.parametrize(
    "entry",
    [
        "attention_weights",
        "dot_product_attention",
        "attend_dense",
        "attend_xla",
        "Head",
        "MultiHeadAttention",
        "Block",
        "TransformerLM",
    ],
)
def test_a_float_mask_is_refused_and_the_error_says_what_to_pass(fake_init, entry):
    run = _entry_points(fake_init)[entry]
    with pytest.raises(
        ValueError, match=r"mask must be a boolean array .*1/0 mask .*mask=\(m != 0\); for an additive mask .*bias=m"
    ):
        run(FLOAT_MASK)
    run(A.causal_mask(T))  # the boolean form of the same mask is accepted


def test_padding_mask_values():
    m = np.asarray(A.padding_mask(np.array([2, 4]), 5))
    assert m.shape == (2, 1, 1, 5) and m.dtype == bool
    np.testing.assert_array_equal(m[:, 0, 0], [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    both = np.asarray(A.padding_mask(jnp.array([2, 4]), 5, mask_queries=True))
    assert both.shape == (2, 1, 5, 5)
    np.testing.assert_array_equal(both[0, 0], np.outer([1, 1, 0, 0, 0], [1, 1, 0, 0, 0]).astype(bool))
    with pytest.raises(ValueError, match="lengths"):
        A.padding_mask(jnp.array([1.5]), 5)


# --- masked attention against numpy ----------------------------------------------------


@pytest.mark.parametrize("impl", MASK_IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_attend_with_a_mask_equals_numpy(impl, causal):
    q, k, v = normal(0, (B, H, T, D)), normal(1, (B, H, T, D)), normal(2, (B, H, T, D))
    mask = random_mask(3, (B, 1, T, T))
    full = np.asarray(mask) & (np.tril(np.ones((T, T), bool)) if causal else True)
    got = A.attend(q, k, v, scale=0.4, mask=mask, causal=causal, impl=impl)
    np.testing.assert_allclose(np.asarray(got), np_attention(q, k, v, 0.4, full), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", MASK_IMPLS)
def test_attend_with_a_bias_equals_numpy(impl):
    q, k, v = normal(0, (B, H, T, D)), normal(1, (B, H, S, D)), normal(2, (B, H, S, D))
    bias = normal(4, (1, H, T, S), 2.0)
    got = A.attend(q, k, v, scale=0.4, bias=bias, impl=impl)
    np.testing.assert_allclose(np.asarray(got), np_attention(q, k, v, 0.4, bias=bias), rtol=1e-5, atol=1e-6)


def test_a_minus_inf_bias_gives_no_nan_on_the_dense_path():
    q = normal(0, (T, D))
    bias = jnp.where(jnp.arange(T) < 2, -jnp.inf, 0.0)[None, :]  # keys 0, 1 pushed out by the bias
    w = np.asarray(A.attention_weights(q, q, scale=1.0, bias=bias))
    assert np.all(np.isfinite(w)) and np.all(w[:, :2] < 1e-30)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("scale", ["sqrt", "mup"])
@pytest.mark.parametrize("causal", [False, True])
def test_mha_with_a_mask_equals_numpy(fake_init, scale, causal):
    x = normal(0, (B, T, C))
    mha = MultiHeadAttention(H, D, scale=scale, causal=causal)
    p = fake_init(mha, x, std=0.3)
    mask = random_mask(1, (B, 1, T, T))
    full = np.asarray(mask) & (np.tril(np.ones((T, T), bool)) if causal else True)
    got = mha.apply({"params": p}, x, mask=mask)
    expected = np_mha(p, x, x, A.resolve_scale(scale, D), full)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_head_mask_has_no_head_axis_and_a_head_axis_mask_is_refused(fake_init):
    x = normal(0, (B, T, C))
    head = Head(D, causal=False)
    p = fake_init(head, x, std=0.3)
    mask = random_mask(1, (B, T, T))
    q, k, v = (np.asarray(x) @ np.asarray(p[n]["kernel"]) for n in ("query", "key", "value"))
    got = head.apply({"params": p}, x, mask=mask)
    np.testing.assert_allclose(np.asarray(got), np_attention(q, k, v, D**-0.5, mask), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="more axes than the weights"):
        head.apply({"params": p}, x, mask=A.padding_mask(jnp.array([3, 4]), T))  # (B, 1, 1, S): MHA's shape


# --- cross-attention -----------------------------------------------------------------


@pytest.mark.parametrize("use_mask", [False, True])
def test_cross_attention_equals_numpy(fake_init, use_mask):
    xq, xkv = normal(0, (B, T, C)), normal(1, (B, S, C))  # S != T
    mha = MultiHeadAttention(H, D, causal=False)
    p = fake_init(mha, xq, std=0.3)  # the same parameters as self-attention
    mask = A.padding_mask(jnp.array([S, 4]), S) if use_mask else None
    got = mha.apply({"params": p}, xq, inputs_kv=xkv, mask=mask)
    assert got.shape == (B, T, C)
    expected = np_mha(p, xq, xkv, D**-0.5, None if mask is None else np.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    # inputs_kv = inputs_q is self-attention
    self_attn = mha.apply({"params": p}, xq, inputs_kv=xq)
    np.testing.assert_allclose(np.asarray(self_attn), np.asarray(mha.apply({"params": p}, xq)), rtol=1e-5, atol=1e-6)


def test_cross_attention_refusals(fake_init):
    xq = normal(0, (B, T, C))
    p = {"params": fake_init(MultiHeadAttention(H, D), xq)}
    with pytest.raises(ValueError, match="inputs_kv must have the same 16 channels"):
        MultiHeadAttention(H, D, causal=False).apply(p, xq, inputs_kv=normal(1, (B, S, C + 1)))
    with pytest.raises(ValueError, match=r"causal=True \(the default here\) masks keys by their position"):
        MultiHeadAttention(H, D).apply(p, xq, inputs_kv=xq)
    for positions in ("rope", "alibi"):
        with pytest.raises(ValueError, match=f"{positions} relates queries and keys.*cross-attention"):
            MultiHeadAttention(H, D, pos_encoding=positions).apply(p, xq, inputs_kv=xq)
    with pytest.raises(ValueError, match="decode caches self-attention"):
        MultiHeadAttention(H, D, decode=True).apply(p, xq, inputs_kv=xq, mutable=["cache"])


# --- fully masked rows: zero output, finite gradients, on every impl that takes a mask ---------


@pytest.mark.parametrize("impl", MASK_IMPLS)
def test_fully_masked_rows_give_zero_output_and_finite_gradients(impl):
    q, k, v = normal(0, (B, H, T, D), 3.0), normal(1, (B, H, T, D), 3.0), normal(2, (B, H, T, D))
    mask = np.array(random_mask(3, (B, 1, T, T)))
    mask[0, :, 2] = False  # row 2 of batch 0 sees nothing, for every head
    mask[1, :, :, 0] = False  # with causal, row 0 of batch 1 sees nothing
    f = lambda q, k, v: A.attend(q, k, v, scale=0.5, mask=mask, causal=True, impl=impl)
    out = np.asarray(f(q, k, v))
    assert np.all(out[0, :, 2] == 0.0) and np.all(out[1, :, 0] == 0.0)
    empty = ~(mask & np.tril(np.ones((T, T), bool))).any(-1)  # (B, 1, T)
    np.testing.assert_array_equal(out[np.broadcast_to(empty, out.shape[:-1])], 0.0)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[0])[0, :, 2] == 0.0)  # the empty row's query gets no gradient


@pytest.mark.parametrize("impl", MASK_IMPLS)
def test_padded_queries_of_mha_output_only_the_projection_bias(fake_init, impl):
    x = normal(0, (B, T, C))
    mha = MultiHeadAttention(H, D, attention_impl=impl)
    p = fake_init(mha, x, std=0.3)
    lengths = jnp.array([3, T])
    mask = A.padding_mask(lengths, T, mask_queries=True)
    y = mha.apply({"params": p}, x, mask=mask)
    np.testing.assert_array_equal(np.asarray(y)[0, 3:], np.broadcast_to(np.asarray(p["proj_bias"]), (T - 3, C)))
    g = jax.grad(lambda x: jnp.sum(mha.apply({"params": p}, x, mask=mask) ** 2))(x)
    assert np.all(np.isfinite(np.asarray(g)))


def test_blockwise_refuses_a_mask_a_bias_and_cross_attention_clearly():
    q = normal(0, (B, T, D))
    for kwargs in (dict(mask=A.causal_mask(T)), dict(bias=jnp.zeros((T, T))), dict(causal=False)):
        with pytest.raises(ValueError, match="'blockwise' computes causal self-attention only"):
            A.attend(q, q, q, scale=1.0, impl="blockwise", **({"causal": True} | kwargs))
    with pytest.raises(ValueError, match="'blockwise'"):
        A.attend(q, normal(1, (B, S, D)), normal(1, (B, S, D)), scale=1.0, causal=True, impl="blockwise")


# --- causality by gradients, with a mask ---------------------------------------------


@pytest.mark.parametrize("pos_encoding", ["none", "rope"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_mha_gradient_is_causal_and_respects_the_mask(influence, fake_init, pos_encoding, qk_norm):
    x = normal(0, (1, T, C))
    mha = MultiHeadAttention(H, D, pos_encoding=pos_encoding, qk_norm=qk_norm)
    p = {"params": fake_init(mha, x, std=0.3)}
    keys = np.array([1, 0, 1, 1, 0, 1], bool)  # keys 1 and 4 are padding
    m = influence(jax.jacrev(lambda x: mha.apply(p, x, mask=jnp.asarray(keys)))(x))
    visible = np.tril(np.ones((T, T), bool)) & keys[None, :]
    # output i depends on input j through a visible key j, and on its own input through its query
    # when it has two visible keys or more (with one, that key gets weight 1 whatever the query)
    expected = visible | (np.eye(T, dtype=bool) & (visible.sum(-1, keepdims=True) >= 2))
    assert np.all(m[~expected] == 0.0), m
    assert np.all(m[expected] > 0.0), m


# --- masks through Block and TransformerLM; leading batch axes ------------------------------


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal", "rope", "none"])
def test_encoder_with_a_padding_mask_ignores_the_padding(fake_init, pos_encoding):
    cfg = ModelConfig(vocab_size=11, block_size=T, n_embd=C, n_head=H, n_layer=2, pos_encoding=pos_encoding)
    cfg = cfg.replace(causal=False)
    lm = TransformerLM(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (B, T)), jnp.int32)
    p = {"params": fake_init(lm, tokens, std=0.3)}
    lengths = [4, T]
    padded = tokens.at[0, 4:].set(7)  # whatever sits in the padding
    logits = np.asarray(lm.apply(p, padded, mask=A.padding_mask(jnp.array(lengths), T)))
    for b, n in enumerate(lengths):
        alone = np.asarray(lm.apply(p, tokens[b : b + 1, :n]))[0]
        np.testing.assert_allclose(logits[b, :n], alone, rtol=1e-5, atol=1e-5)
    # and the mask matters: without it the padding leaks into every position
    unmasked = np.asarray(lm.apply(p, padded))
    assert np.max(np.abs(unmasked[0, :4] - logits[0, :4])) > 1e-3


@pytest.mark.parametrize("kind", ["head", "mha", "block"])
def test_any_leading_batch_axes(fake_init, kind):
    cfg = ModelConfig(vocab_size=7, block_size=T, n_embd=C, n_head=H, n_layer=1, pos_encoding="rope")
    layer = {"head": Head(D), "mha": MultiHeadAttention(H, D, pos_encoding="rope"), "block": Block(cfg)}[kind]
    x = normal(0, (2, 3, T, C))
    p = {"params": fake_init(layer, x[0, 0], std=0.3)}  # initialized unbatched: (T, C)
    many = np.asarray(layer.apply(p, x))
    assert many.shape[:3] == (2, 3, T)
    for i, j in ((0, 0), (1, 2)):
        np.testing.assert_allclose(many[i, j], np.asarray(layer.apply(p, x[i, j])), rtol=1e-5, atol=1e-5)


def test_transformer_lm_any_leading_batch_axes(fake_init):
    cfg = ModelConfig(vocab_size=7, block_size=T, n_embd=C, n_head=H, n_layer=1)
    lm = TransformerLM(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 7, (2, 3, T)), jnp.int32)
    p = {"params": fake_init(lm, tokens[0, 0], std=0.3)}
    many = np.asarray(lm.apply(p, tokens))
    assert many.shape == (2, 3, T, 7)
    np.testing.assert_allclose(many[1, 2], np.asarray(lm.apply(p, tokens[1, 2])), rtol=1e-5, atol=1e-6)


# --- the impl option is not ignored ------------------------------------------------------------


def test_the_xla_impl_reaches_jax_nn_and_dense_does_not(fake_init, monkeypatch):
    # "dense" and "xla" agree to float rounding (the tests above), so only this tells an ignored impl.
    calls = []
    real = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("implementation"))
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, x = normal(0, (B, H, T, D)), normal(1, (B, T, C))
    traced = {  # traced only (eval_shape): nothing compiled
        "attend": lambda impl: jax.eval_shape(lambda q: A.attend(q, q, q, scale=1.0, causal=True, impl=impl), q),
        "mha": lambda impl: jax.eval_shape(
            lambda x: MultiHeadAttention(H, D, attention_impl=impl).init(jax.random.key(0), x), x
        ),
    }
    for entry, trace in traced.items():
        trace("dense")
        assert calls == [], entry
        trace("xla")
        assert calls == ["xla"], entry
        calls.clear()
