"""Blockwise causal attention computes what the dense causal path computes.

References are ``attention.dot_product_attention`` with ``causal_mask``. Only
the order of float additions differs, so float32 results agree to 2e-5
(absolute and relative, on O(1) inputs: observed ~1e-6) and float64 ones to 1e-12.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import attention, blockwise
from attention_jax.blockwise import blockwise_causal_attention
from attention_jax.layers import MultiHeadAttention

TOL32 = dict(rtol=2e-5, atol=2e-5)


def _inputs(T: int, D: int, Dv: int | None = None, lead=(2, 3), dtype=np.float32, seed: int = 0):
    """q, k (*lead, T, D), v and the output cotangent g (*lead, T, Dv), N(0, 1) drawn with numpy.

    numpy, not jax.random: no threefry program compiled per shape.
    """
    rng = np.random.default_rng(seed)
    Dv = D if Dv is None else Dv
    shapes = [(*lead, T, D), (*lead, T, D), (*lead, T, Dv), (*lead, T, Dv)]
    return tuple(jnp.asarray(rng.standard_normal(shape).astype(dtype)) for shape in shapes)


def _dense(q, k, v, *, scale):
    return attention.dot_product_attention(q, k, v, scale=scale, mask=attention.causal_mask(q.shape[-2]))


def _value_and_vjp(fn, q, k, v, g):
    """fn's output and its vjp with cotangent g: (out, dq, dk, dv), as one compiled call."""

    def run(q, k, v, g):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(g))

    return jax.jit(run)(q, k, v, g)


def _reference_f64(q, k, v, *, scale):
    """Causal softmax attention kept in float64 throughout (the dense path's softmax is float32)."""
    s = jnp.einsum("...td,...sd->...ts", q, k) * scale
    s = jnp.where(attention.causal_mask(q.shape[-2]), s, -jnp.inf)  # every row keeps s = 0: no NaN
    return jnp.einsum("...ts,...sd->...td", jax.nn.softmax(s, axis=-1), v)


def _assert_matches_dense(q, k, v, g, *, scale, tol, reference=_dense, **blocks):
    got = _value_and_vjp(lambda q, k, v: blockwise_causal_attention(q, k, v, scale=scale, **blocks), q, k, v, g)
    want = _value_and_vjp(lambda q, k, v: reference(q, k, v, scale=scale), q, k, v, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol, err_msg=name)


# (T, tiles): one token and T shorter than a tile (default tiles: one tile);
# T a multiple of the tile; ragged T; tiles square, taller than wide, wider than tall.
GRID = [(1, None), (5, None), (16, (8, 8)), (37, (8, 8)), (37, (4, 16)), (21, (8, 4))]


@pytest.mark.parametrize("T, blocks", GRID, ids=[f"T{T}-{'x'.join(map(str, b or ('default',)))}" for T, b in GRID])
def test_forward_and_gradients_match_dense(T, blocks):
    q, k, v, g = _inputs(T, D=16, seed=T)
    kwargs = {} if blocks is None else dict(block_q=blocks[0], block_k=blocks[1])
    _assert_matches_dense(q, k, v, g, scale=16**-0.5, tol=TOL32, **kwargs)


@pytest.mark.parametrize("D, Dv, scale, lead", [(4, 4, 1.0, ()), (8, 24, 1 / 8, (3,))])
def test_head_sizes_scales_and_leading_axes(D, Dv, scale, lead):
    q, k, v, g = _inputs(23, D, Dv, lead=lead)
    _assert_matches_dense(q, k, v, g, scale=scale, tol=TOL32, block_q=8, block_k=8)


def test_float64_agrees_to_float64_precision():
    with jax.enable_x64(True):
        q, k, v, g = _inputs(29, 8, lead=(2,), dtype=np.float64)
        tol = dict(rtol=1e-12, atol=1e-12)
        _assert_matches_dense(q, k, v, g, scale=8**-0.5, tol=tol, reference=_reference_f64, block_q=8, block_k=4)


def test_large_logits_stay_finite():
    """Scores of a few hundred overflow a naive float32 exp; the running max keeps every tile finite.

    Both paths then carry float32 rounding of scores ~300 (~3e-5), hence the looser tolerance.
    """
    q, k, v, g = _inputs(40, 8, lead=(2,))
    tol = dict(rtol=5e-4, atol=5e-4)
    _assert_matches_dense(10.0 * q, 10.0 * k, v, g, scale=8**-0.5, tol=tol, block_q=8, block_k=8)


def test_causal_by_gradients(causal_check, influence):
    """Output t has exactly zero gradient w.r.t. inputs s > t (and nonzero w.r.t. values s <= t)."""
    q, k, v, _ = _inputs(13, 4, lead=(1,))
    fn = lambda q, k, v: blockwise_causal_attention(q, k, v, scale=1.0, block_q=4, block_k=4)
    jac_q, jac_k, jac_v = jax.jit(jax.jacrev(fn, argnums=(0, 1, 2)))(q, k, v)  # each (1, T, D, 1, T, D)
    causal_check(jac_v)
    # Keys and queries: the future must not matter. (Output 0 sees a single key, so its
    # softmax is constant and d out_0 / d k_0 = 0; query s only acts on output s.)
    future = np.triu(np.ones((13, 13), bool), k=1)
    for jac in (jac_q, jac_k):
        assert np.all(influence(jac)[future] == 0.0)
    assert np.all(influence(jac_k)[1:][~future[1:]] > 0.0)


def test_backward_never_materializes_T_by_T():
    """XLA's scratch memory for forward+backward at T = 2048 is far below one (T, T) float32 matrix."""
    T = 2048
    q, k, v, g = (x[0] for x in _inputs(T, 16, lead=(1,)))  # (T, D)
    loss = lambda q, k, v: jnp.vdot(blockwise_causal_attention(q, k, v, scale=0.25, block_q=128, block_k=128), g)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend gives no memory analysis")
    assert analysis.temp_size_in_bytes < T * T * 4 / 8, analysis.temp_size_in_bytes


def test_rejects_mismatched_shapes():
    q, k, v, _ = _inputs(8, 4, lead=(1,))
    with pytest.raises(ValueError, match="expected q, k"):
        blockwise_causal_attention(q, k[:, :4], v, scale=1.0)
    with pytest.raises(ValueError, match="block sizes"):
        blockwise_causal_attention(q, k, v, scale=1.0, block_q=0)


def test_multi_head_attention_blockwise_equals_dense(fake_init, monkeypatch):
    """Same parameters, same output and parameter gradients (with rotary q, k).

    Tiles of 8 against T = 21: several tiles and a ragged last one through the module path.
    """
    calls = []

    def small_tiles(*args, **kwargs):  # counted: an impl option the module ignored would pass the comparison
        calls.append(1)
        return blockwise.blockwise_causal_attention(*args, **kwargs, block_q=8, block_k=8)

    monkeypatch.setattr(attention, "blockwise_causal_attention", small_tiles)  # the dispatcher's reference
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 21, 32)), jnp.float32)
    make = lambda impl: MultiHeadAttention(num_heads=4, head_size=8, pos_encoding="rope", attention_impl=impl)
    params = {"params": fake_init(make("dense"), x, std=0.3)}  # O(1) logits: a generic point

    def output_and_grads(impl):  # y (B, T, C) and d sum(sin(y)) / d params
        def loss(p):
            y = make(impl).apply(p, x)
            return jnp.sum(jnp.sin(y)), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return y, grads

    got = output_and_grads("blockwise")
    assert calls, "attention_impl='blockwise' never reached blockwise_causal_attention"
    n_calls = len(calls)
    want = output_and_grads("dense")
    assert len(calls) == n_calls  # and the dense side never did
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL32)


def test_module_blockwise_rejects_non_causal():
    x = jnp.ones((1, 4, 8))
    module = MultiHeadAttention(num_heads=2, head_size=4, causal=False, attention_impl="blockwise")
    with pytest.raises(ValueError, match="causal"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), x))  # raised while tracing: nothing compiled
