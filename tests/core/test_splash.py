"""attention_impl="splash": the TPU's Pallas kernel, here in interpret mode, against the dense path.

Float32, tolerance 1e-5 (outputs) and 1e-4 (gradients); every variant splash takes (causal, window,
softcap, sinks, non-causal, log-n on q), T that is and is not a multiple of its block, several blocks,
the window's exact keys by gradients (MaxText issue 4289: LocalMask's window_size counts the keys
*besides* the query's own), the model and its decode, NNX, the refusals, and shard_map over a mesh.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import attention as A
from attention_jax import layers, splash
from attention_jax import nnx as ajx
from attention_jax.model import ModelConfig, TransformerLM
from attention_jax.options import AttentionOptions
from tests.helpers import script_result

pytestmark = pytest.mark.filterwarnings("ignore:attention_impl='splash'")

B, H, T, D, C, V = 2, 3, 13, 8, 16, 11


def qkv(T=T, seed=0, lead=(B, H), d=D):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(*lead, T, d)) * 1.5, jnp.float32) for _ in range(3))


SINKS = np.array([0.3, -1.0, 2.0], np.float32)
CASES = {  # attend keywords
    "causal": dict(causal=True),
    "window": dict(causal=True, window=4),
    "window of one": dict(causal=True, window=1),
    "softcap": dict(causal=True, softcap=1.5),
    "sinks": dict(causal=True, sinks=SINKS),
    "all": dict(causal=True, window=5, softcap=2.0, sinks=SINKS),
    "non-causal": dict(causal=False),
    "non-causal, sinks": dict(causal=False, sinks=SINKS),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_splash_equals_dense_for_every_variant_it_takes(case):
    q, k, v = qkv()
    kw = CASES[case]
    want = A.attend(q, k, v, scale=0.5, impl="dense", **kw)
    got = A.attend(q, k, v, scale=0.5, impl="splash", **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T, block", [(300, 128), (256, 128)])  # 3 blocks (padded), 2 blocks exactly
def test_splash_over_several_blocks_equals_dense_with_gradients(monkeypatch, T, block):
    monkeypatch.setattr(splash, "MAX_BLOCK", block)
    q, k, v = qkv(T, lead=(H,))
    g = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    kw = dict(causal=True, window=150, sinks=SINKS)
    grads = lambda impl: jax.value_and_grad(
        lambda q, k, v, s: jnp.vdot(A.attend(q, k, v, scale=0.3, impl=impl, **{**kw, "sinks": s}), g),
        argnums=(0, 1, 2, 3),
    )(q, k, v, jnp.asarray(SINKS))
    (want, dense), (got, tiled) = grads("dense"), grads("splash")
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for name, a, b in zip(("q", "k", "v", "sinks"), tiled, dense):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4, err_msg=name)


def test_splash_gradients_equal_dense_and_the_window_sees_exactly_w_keys():
    q, k, v = qkv(lead=(H,))
    W = 4
    g = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
    for kw in (dict(window=W), dict(window=W, softcap=1.5, sinks=SINKS)):
        grads = lambda impl, kw=kw: jax.grad(
            lambda q, k, v: jnp.vdot(A.attend(q, k, v, scale=0.5, causal=True, impl=impl, **kw), g), argnums=(0, 1, 2)
        )(q, k, v)
        for name, ours, dense in zip("qkv", grads("splash"), grads("dense")):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(dense), rtol=1e-4, atol=1e-5, err_msg=name)
    jac = jax.jacrev(lambda k: A.attend(q, k, v, scale=0.5, causal=True, impl="splash", window=W))(k)
    dep = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 5))  # (T out, S in), summed over heads and channels
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    seen = (s <= t) & (s > t - W)
    assert np.all(dep[~seen] == 0.0) and np.all(dep[seen & (s < t)] > 0.0)


def test_localmask_window_size_counts_the_keys_besides_the_query():
    # The off-by-one behind MaxText issue 4289: LocalMask(window_size=(W, 0)) lets a query see W + 1
    # keys; a window of W is window_size=(W - 1, 0), which is what splash.py passes.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    W = 4
    t, s = np.arange(16)[:, None], np.arange(16)[None, :]
    ours = masks.LocalMask((16, 16), window_size=(W - 1, 0), offset=0)[:, :]
    np.testing.assert_array_equal(ours, (s <= t) & (s > t - W))
    assert masks.LocalMask((16, 16), window_size=(W, 0), offset=0)[:, :].sum(axis=1).max() == W + 1


def test_splash_says_that_it_runs_interpreted_off_tpu(monkeypatch):
    monkeypatch.setattr(splash, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        A.attend(*qkv(), scale=0.5, causal=True, impl="splash")
        A.attend(*qkv(), scale=0.5, causal=True, impl="splash")
    said = [str(w.message) for w in caught if "splash" in str(w.message)]
    assert len(said) == 1 and "Pallas interpret mode" in said[0]


def lm(**kw):
    return TransformerLM(ModelConfig(vocab_size=V, block_size=12, n_embd=C, n_head=2, n_layer=2, **kw))


@pytest.mark.parametrize(
    "variant", [dict(pos_encoding="rope"), dict(window=(3, None), sinks=True, softcap=4.0, logn_scale=0.4)]
)
def test_a_splash_model_equals_the_dense_model_decodes_alike_and_its_nnx_twin_agrees(fake_init, variant):
    model, dense = lm(attention_impl="splash", **variant), lm(**variant)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, 12)), jnp.int32)
    params = fake_init(model, tokens, std=0.5)
    want = np.asarray(dense.apply({"params": params}, tokens))
    got = np.asarray(model.apply({"params": params}, tokens))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    cache = model.init_cache(B, 12)
    logits, state = model.apply({"params": params, "cache": cache}, tokens[:, :5], decode=True, mutable=["cache"])
    steps = [np.asarray(logits)]
    for t in range(5, 12):
        logits, state = model.apply({"params": params, **state}, tokens[:, t : t + 1], decode=True, mutable=["cache"])
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ajx.from_linen(model, params)(tokens)), want, rtol=1e-5, atol=1e-5)


def test_splash_refusals_are_one_line_naming_what_to_use():
    q, k, v = qkv()
    for kw in (dict(mask=jnp.ones((T, T), bool)), dict(bias=jnp.zeros((T, T))), dict(alibi=jnp.ones(H))):
        with pytest.raises(ValueError, match=r"^attention impl 'splash' computes self-attention with static masks"):
            A.attend(q, k, v, scale=0.5, causal=True, impl="splash", **kw)
    with pytest.raises(ValueError, match="splash"):
        A.attend(q, k[..., :5, :], v[..., :5, :], scale=0.5, impl="splash")  # cross-attention
    with pytest.raises(ValueError, match=r"^AttentionOptions\.pos_encoding: 'alibi' is a bias, and attention_impl"):
        AttentionOptions(attention_impl="splash", pos_encoding="alibi")
    with pytest.raises(ValueError, match=r"^ModelConfig\.pos_encoding: 'alibi' is a bias"):
        ModelConfig(vocab_size=V, attention_impl="splash", pos_encoding="alibi")
    x = jnp.ones((B, T, C))
    with pytest.raises(ValueError, match="static masks"):
        module = layers.MultiHeadAttention(2, D, attention_impl="splash")
        jax.eval_shape(lambda: module.init(jax.random.key(0), x, mask=jnp.ones((T, T), bool)))


SHARDED = """
import json, warnings
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from attention_jax import attention as A
warnings.simplefilter("ignore")
mesh = jax.make_mesh((2, 2), ("data", "tensor"))
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(4, 2, 13, 8)), jnp.float32) for _ in range(3))
sinks = jnp.asarray([0.5, -1.0])
want = A.attend(q, k, v, scale=0.5, causal=True, window=4, sinks=sinks)
f = jax.jit(lambda q, k, v: A.attend(q, k, v, scale=0.5, causal=True, window=4, sinks=sinks, impl="splash"))
with jax.set_mesh(mesh):
    spec = NamedSharding(mesh, P("data", "tensor"))
    args = [jax.device_put(a, spec) for a in (q, k, v)]
    got = f(*args)
    text = str(jax.make_jaxpr(f)(*args))
print(json.dumps({"diff": float(jnp.max(jnp.abs(got - want))), "shard_map": "shard_map" in text,
                  "spec": str(got.sharding.spec), "devices": jax.device_count()}))
"""


def test_splash_under_a_mesh_runs_in_shard_map_over_batch_and_heads():
    result = script_result(SHARDED, devices=4)
    assert result["devices"] == 4 and result["shard_map"]
    assert result["diff"] < 1e-5
    assert "data" in result["spec"] and "tensor" in result["spec"]
