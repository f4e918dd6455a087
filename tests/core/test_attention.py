"""Pure attention functions: masks, scales, weights, the three averaging forms, scaling laws."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import attention as A


def normal(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def np_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def np_attention_weights(q, k, scale, mask=None):
    """Independent float64 reference: softmax over visible keys, 0 elsewhere."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    logits = np.einsum("...td,...sd->...ts", q, k) * scale
    if mask is None:
        return np_softmax(logits)
    logits = np.where(mask, logits, -np.inf)
    return np_softmax(logits)  # exp(-inf) = 0 exactly


# --- causal_mask -------------------------------------------------------------


def test_causal_mask_values():
    expected = np.array(
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],
        dtype=bool,
    )
    m = A.causal_mask(4)
    assert m.dtype == jnp.bool_ and m.shape == (4, 4)
    np.testing.assert_array_equal(np.asarray(m), expected)


def test_causal_mask_with_longer_keys_aligns_queries_to_the_end():
    # 2 queries that are the last 2 of 4 positions: query 0 is position 2.
    expected = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(np.asarray(A.causal_mask(2, 4)), expected)


# --- resolve_scale -----------------------------------------------------------


@pytest.mark.parametrize(
    "scale, head_size, expected",
    [
        ("sqrt", 16, 0.25),
        ("sqrt", 64, 0.125),
        ("none", 16, 1.0),
        ("mup", 16, 1 / 16),
        ("mup", 64, 1 / 64),
        (0.5, 16, 0.5),
        (3, 16, 3.0),
    ],
)
def test_resolve_scale_values(scale, head_size, expected):
    got = A.resolve_scale(scale, head_size)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bad", ["bogus", "SQRT", "", None, True, [1.0]])
def test_resolve_scale_bad_name_lists_valid_choices(bad):
    with pytest.raises(ValueError) as info:
        A.resolve_scale(bad, 16)
    msg = str(info.value)
    for choice in ("sqrt", "none", "mup"):
        assert choice in msg, msg


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_resolve_scale_bad_number(bad):
    with pytest.raises(ValueError, match="positive"):
        A.resolve_scale(bad, 16)


# --- attention_weights / dot_product_attention ---------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 16, 3.0])
@pytest.mark.parametrize("T, S", [(6, 6), (3, 6)])
def test_attention_weights_masked_rows_and_reference(scale, T, S):
    q = normal(2, 3, T, 16, seed=0)  # (B, H, T, D)
    k = normal(2, 3, S, 16, seed=1)  # (B, H, S, D)
    mask = A.causal_mask(T, S)
    w = np.asarray(A.attention_weights(q, k, scale=scale, mask=mask))
    assert w.shape == (2, 3, T, S) and w.dtype == np.float32
    m = np.broadcast_to(np.asarray(mask), w.shape)
    assert np.all(w[~m] == 0.0)  # exactly zero, not merely small
    assert np.all(w >= 0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=0, atol=1e-6)  # rows sum to 1 to f32 rounding
    ref = np_attention_weights(q, k, scale, np.asarray(mask))
    np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-7)


def test_attention_weights_unmasked_reference():
    q, k = normal(4, 5, 8, seed=0), normal(4, 7, 8, seed=1)
    w = A.attention_weights(q, k, scale=8**-0.5)
    np.testing.assert_allclose(np.asarray(w), np_attention_weights(q, k, 8**-0.5), rtol=1e-5, atol=1e-7)


def test_fully_masked_row_is_zero_and_has_finite_gradient():
    q = jnp.ones((3, 4))
    k = jnp.ones((3, 4))
    mask = jnp.array([[False, False, False], [True, False, False], [True, True, False]])
    w = A.attention_weights(q, k, scale=1.0, mask=mask)
    np.testing.assert_array_equal(np.asarray(w[0]), 0.0)
    g = jax.jit(jax.grad(lambda q: (A.attention_weights(q, k, scale=1.0, mask=mask) ** 2).sum()))(q)
    assert np.all(np.isfinite(np.asarray(g)))


def test_dot_product_attention_matches_numpy():
    q, k, v = normal(2, 6, 8, seed=0), normal(2, 6, 8, seed=1), normal(2, 6, 5, seed=2)
    mask = A.causal_mask(6)
    out = A.dot_product_attention(q, k, v, scale=0.5, mask=mask)
    ref = np_attention_weights(q, k, 0.5, np.asarray(mask)) @ np.asarray(v, np.float64)
    assert out.shape == (2, 6, 5)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)


def test_dot_product_attention_gradient_is_causal(causal_check):
    # Input x feeds q, k and v; output t may depend only on x[s], s <= t.
    x = normal(1, 6, 4)
    f = lambda x: A.dot_product_attention(x, x, x, scale=0.5, mask=A.causal_mask(6))
    causal_check(jax.jacrev(f)(x))


@pytest.mark.parametrize("wrong_mask", ["flipped", "none", "strict"])
def test_causal_check_detects_a_wrong_mask(causal_check, wrong_mask):
    # The causality assertion itself must fail on an upper-triangular mask, on
    # no mask, and on a mask that hides the diagonal.
    x = normal(1, 6, 4)
    mask = {"flipped": A.causal_mask(6).T, "none": None, "strict": jnp.tril(jnp.ones((6, 6), bool), -1)}
    f = lambda x: A.dot_product_attention(x, x, x, scale=0.5, mask=mask[wrong_mask])
    with pytest.raises(AssertionError):
        causal_check(jax.jacrev(f)(x))


# --- the three ways of averaging the past -------------------------------------


def test_three_averaging_forms_agree_with_cumulative_mean():
    x = normal(4, 8, 2)  # the lecture's (B, T, C)
    ref = np.cumsum(np.asarray(x, np.float64), axis=1) / np.arange(1, 9)[None, :, None]
    outs = [A.average_past_loop(x), A.average_past_matmul(x), A.average_past_softmax(x)]
    for out in outs:
        assert out.shape == x.shape
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[2]), rtol=1e-6, atol=1e-6)


def test_averaging_is_attention_with_zero_affinities():
    x = normal(2, 7, 3)
    zeros = jnp.zeros((2, 7, 4))
    out = A.dot_product_attention(zeros, zeros, x, scale=1.0, mask=A.causal_mask(7))
    np.testing.assert_allclose(np.asarray(out), np.asarray(A.average_past_softmax(x)), rtol=1e-6, atol=1e-6)


# --- scaling ------------------------------------------------------------------


@pytest.mark.parametrize("head_size", [16, 64])
@pytest.mark.parametrize("scale, expected_var", [("none", "D"), ("sqrt", 1.0), ("mup", "1/D")])
def test_logit_variance_follows_the_scale(head_size, scale, expected_var):
    # q, k ~ N(0, 1): var(q·k) = D unscaled, 1 with 1/sqrt(D), 1/D with muP.
    # 20k independent pairs: the variance estimate's relative std is ~1-2%,
    # so a 10% tolerance is > 5 sigma and the seed is fixed anyway.
    n = 20_000
    q, k = normal(n, 1, head_size, seed=0), normal(n, 1, head_size, seed=1)
    logits = A.attention_logits(q, k, scale=A.resolve_scale(scale, head_size))  # (n, 1, 1)
    expected = {"D": head_size, "1/D": 1 / head_size}.get(expected_var, expected_var)
    assert float(jnp.var(logits)) == pytest.approx(expected, rel=0.10)


def test_growing_logit_scale_drives_softmax_to_one_hot():
    q, k = normal(1, 16, seed=0), normal(8, 16, seed=1)
    factors = [0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
    weights = [np.asarray(A.attention_weights(q, k, scale=f))[0] for f in factors]
    peaks = np.array([w.max() for w in weights])
    assert peaks[0] < 0.2  # nearly uniform over 8 keys
    assert np.all(np.diff(peaks) >= 0), peaks
    assert np.all(np.diff(peaks[:5]) > 0), peaks  # strictly, before saturating
    assert peaks[-1] > 0.999
    # the winner is always the largest affinity
    winner = int(np.argmax(np.asarray(q @ k.T)))
    assert all(int(np.argmax(w)) == winner for w in weights)
