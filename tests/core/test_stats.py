"""attention_jax.stats: exact values on hand-made weights, the Gaussian theory, a model's sown weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import attention, stats
from attention_jax.model import ModelConfig, TransformerLM, init_params


def causal_uniform(T):
    m = np.tril(np.ones((T, T)))
    return m / m.sum(-1, keepdims=True)


def test_entropy_is_one_for_uniform_and_zero_for_one_hot_rows_of_length_one_excluded():
    T = 5
    mask = attention.causal_mask(T)
    h = np.asarray(stats.row_entropy(jnp.asarray(causal_uniform(T)), mask))
    assert np.isnan(h[0])  # a row of length 1 says nothing about the softmax
    np.testing.assert_allclose(h[1:], 1.0, rtol=1e-6)
    one_hot = np.eye(T)  # token t attends to itself only
    assert float(stats.mean_entropy(jnp.asarray(one_hot), mask)) == pytest.approx(0.0, abs=1e-7)
    assert float(stats.saturated_share(jnp.asarray(one_hot), mask)) == 1.0


def test_hand_made_weights_give_hand_computed_statistics():
    # rows of length 1, 2, 3; row 0 is excluded from every statistic
    w = np.array([[1.0, 0, 0], [0.5, 0.5, 0], [0.995, 0.004, 0.001]])
    mask = attention.causal_mask(3)
    h2 = 1.0  # uniform over 2
    p = np.array([0.995, 0.004, 0.001])
    h3 = -(p * np.log(p)).sum() / np.log(3)
    assert float(stats.mean_entropy(jnp.asarray(w), mask)) == pytest.approx((h2 + h3) / 2, rel=1e-5)
    assert float(stats.mean_max_weight(jnp.asarray(w), mask)) == pytest.approx((0.5 + 0.995) / 2, rel=1e-6)
    assert float(stats.saturated_share(jnp.asarray(w), mask)) == pytest.approx(0.5)


def test_logit_variance_matches_numpy_float64_within_visible_rows():
    rng = np.random.default_rng(0)
    T = 6
    x = rng.normal(size=(2, 3, T, T)) * 3
    mask = np.tril(np.ones((T, T), bool))
    expected = np.mean([x[b, h, t, : t + 1].var() for b in range(2) for h in range(3) for t in range(1, T)])
    got = float(stats.logit_variance(jnp.asarray(x, jnp.float32), jnp.asarray(mask)))
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("scale,power", [("none", 1), ("sqrt", 0), ("mup", -1)])
@pytest.mark.parametrize("D", [4, 64])
def test_gaussian_logit_variance_is_d_times_scale_squared(scale, power, D):
    T = 32
    out = stats.gaussian_qk_stats(jax.random.key(0), head_size=D, scale=scale, B=2, H=2, T=T)
    # within-row (population) variance of n samples has expectation (n-1)/n of the variance
    shrink = np.mean([(n - 1) / n for n in range(2, T + 1)])
    assert out["logit_var"] == pytest.approx(D**power * shrink, rel=0.15)


def test_unscaled_softmax_saturates_with_head_size_and_sqrt_does_not():
    key = jax.random.key(1)
    none = [stats.gaussian_qk_stats(key, head_size=D, scale="none", B=2, H=2, T=32) for D in (4, 256)]
    sqrt = [stats.gaussian_qk_stats(key, head_size=D, scale="sqrt", B=2, H=2, T=32) for D in (4, 256)]
    assert none[1]["entropy"] < 0.2 < none[0]["entropy"]
    assert none[1]["saturated"] > 0.5
    assert abs(sqrt[1]["entropy"] - sqrt[0]["entropy"]) < 0.05
    assert sqrt[1]["saturated"] < 0.05
    # a saturated softmax passes (relatively) less gradient to q: per unit of logit scale
    assert none[1]["grad_q"] / 256**0.5 < sqrt[1]["grad_q"]


@pytest.mark.slow
def test_model_weights_per_layer_and_near_uniform_at_gpt_init():
    cfg = ModelConfig(vocab_size=11, block_size=8, n_embd=32, n_head=2, n_layer=2, head_size=64, attn_scale="none")
    model = TransformerLM(cfg)
    params = init_params(model, jax.random.key(0), 8)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 11)
    ws = stats.sown_attention_weights(model, params, tokens)
    assert [w.shape for w in ws] == [(2, 2, 8, 8)] * 2
    # GPT-2 init (N(0, 0.02)) makes q, k tiny: even unscaled, D=64 attention is near uniform at init
    assert min(stats.layer_entropies(model, params, tokens)) > 0.95
    out = stats.model_qk_stats(model, params, tokens, tokens)
    assert set(out) == set(stats.STAT_KEYS) and out["grad_q"] > 0


# --- stability diagnostics: against numpy from the parameters of a one-layer model --------------


def _numpy_diagnostics(params, tokens, scale, window):
    """float64: embeddings + positions -> LayerNorm -> q, k (B, H, T, D) -> the diagnostics of layer 0."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = p["token_embedding"]["embedding"][np.asarray(tokens)] + p["positions"]["embedding"][: tokens.shape[1]]
    ln = p["block_0"]["ln_attn"]
    h = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * ln["scale"] + ln["bias"]
    w = p["block_0"]["attn"]["qkv_kernel"]
    q, k = (np.einsum("btc,chd->bhtd", h, w[:, i]) for i in range(2))
    T = tokens.shape[1]
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    seen = (s <= t) if window is None else (s <= t) & (s > t - window)
    logits = np.where(seen, q @ np.swapaxes(k, -1, -2) * scale, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    n = seen.sum(-1)  # keys per row
    ent = -np.sum(np.where(weights > 0, weights * np.log(np.where(weights > 0, weights, 1)), 0), -1)  # (B, H, T)
    ent = (ent[..., n > 1] / np.log(n[n > 1])).mean(axis=(0, 2))
    norm = lambda a: np.linalg.norm(a, axis=-1).mean(axis=(0, 2))
    return {"max_logit": logits.max(axis=(0, 2, 3)), "entropy": ent, "q_norm": norm(q), "k_norm": norm(k)}


@pytest.mark.parametrize("kw", [dict(), dict(window=3, attention_impl="blockwise", attn_scale=0.7)])
def test_stability_diagnostics_equal_numpy_from_the_parameters(fake_init, kw):
    stability_diagnostics, summarize_diagnostics = stats.stability_diagnostics, stats.summarize_diagnostics
    cfg = ModelConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2, n_layer=1, **kw)
    model = TransformerLM(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (3, 8)), jnp.int32)
    params = fake_init(model, tokens, std=0.5)
    got = jax.jit(lambda p: stability_diagnostics(model, p, tokens))(params)
    want = _numpy_diagnostics(params, tokens, attention.resolve_scale(cfg.attn_scale, cfg.head_dim), cfg.window)
    for name, value in want.items():
        assert got[name].shape == (1, 2)
        np.testing.assert_allclose(np.asarray(got[name][0]), value, rtol=2e-5, err_msg=name)
    log_z = jax.nn.logsumexp(model.apply({"params": params}, tokens), axis=-1)
    np.testing.assert_allclose([float(got["log_z"]), float(got["log_z_max"])], [log_z.mean(), log_z.max()], rtol=1e-6)
    flat = summarize_diagnostics(got)
    assert flat["max_logit/layer_0"] == pytest.approx(float(np.max(want["max_logit"])), rel=2e-5)
    assert flat["entropy/layer_0"] == pytest.approx(float(np.mean(want["entropy"])), rel=2e-5)
    assert set(flat) == {"log_z", "log_z_max"} | {f"{n}/layer_0" for n in ("max_logit", "entropy", "q_norm", "k_norm")}


def test_layer_entropies_count_only_the_keys_inside_a_window(fake_init):
    # At std 0 q = k = 0: every visible key gets the same weight, so the entropy is exactly 1 when the rows
    # are counted over the keys the window lets them see (not over all of the past).
    cfg = ModelConfig(vocab_size=11, block_size=16, n_embd=16, n_head=2, n_layer=2, window=(4, None))
    model = TransformerLM(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 16)), jnp.int32)
    params = fake_init(model, tokens, std=0.5)
    zero_qk = jax.tree_util.tree_map_with_path(
        lambda path, a: a.at[:, :2].set(0.0) if "qkv_kernel" in jax.tree_util.keystr(path) else a, params
    )
    np.testing.assert_allclose(stats.layer_entropies(model, zero_qk, tokens), [1.0, 1.0], rtol=1e-5)
    qk = stats.model_qk_stats(model, zero_qk, tokens, tokens)
    assert qk["entropy"] == pytest.approx(1.0, rel=1e-5) and qk["logit_var"] == pytest.approx(0.0, abs=1e-6)
