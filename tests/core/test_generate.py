"""Sampling: determinism, greedy decoding, top-k, context cropping, one compile for many tokens."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax.generate import _generate, generate
from attention_jax.model import BigramLM, ModelConfig, TransformerLM

V, BLOCK, T0, N = 11, 8, 6, 7  # T0 + N = 13 > BLOCK: generation runs past the context window
CFG = ModelConfig(vocab_size=V, block_size=BLOCK, n_embd=16, n_head=2, n_layer=1)


@pytest.fixture(scope="module")
def lm(fake_init):
    model = TransformerLM(CFG)
    # std 0.3: peaked, input-dependent next-token distributions (no near-ties for greedy)
    return model, fake_init(model, jnp.zeros((1, BLOCK), jnp.int32), std=0.3)


@pytest.fixture(scope="module")
def prompt():
    return jnp.asarray(np.random.default_rng(0).integers(0, V, (2, T0)), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(model, params, tokens):
    return model.apply({"params": params}, tokens)[:, -1]  # (B, V)


def reference_step_logits(model, params, seq):
    """The lecture's loop, by hand: logits for each generated position, cropping to the last BLOCK tokens.

    seq (B, T0 + N) -> (N, B, V): entry n is what the model predicts for seq[:, T0 + n].
    """
    return np.stack(
        [np.asarray(_last_logits(model, params, seq[:, max(0, t - BLOCK) : t])) for t in range(T0, seq.shape[1])]
    )


def test_shape_prefix_and_range(lm, prompt):
    model, params = lm
    out = generate(model, params, prompt, N, jax.random.key(0))
    assert out.shape == (2, T0 + N) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out[:, :T0]), np.asarray(prompt))
    assert int(out.min()) >= 0 and int(out.max()) < V


def test_deterministic_for_a_key_and_varies_across_keys(lm, prompt):
    model, params = lm
    a = np.asarray(generate(model, params, prompt, N, jax.random.key(0)))
    b = np.asarray(generate(model, params, prompt, N, jax.random.key(0)))
    c = np.asarray(generate(model, params, prompt, N, jax.random.key(1)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:, T0:], c[:, T0:])


def test_temperature_zero_is_greedy_step_by_step(lm, prompt):
    model, params = lm
    out = generate(model, params, prompt, N, jax.random.key(0), temperature=0.0)
    other_key = generate(model, params, prompt, N, jax.random.key(7), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(other_key))  # the key does not matter
    # Re-run the lecture's loop by hand: crop to BLOCK tokens, take the argmax of the last logits.
    seq = prompt
    for _ in range(N):
        nxt = jnp.argmax(_last_logits(model, params, seq[:, -BLOCK:]), axis=-1).astype(jnp.int32)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(seq))


def test_top_k_one_is_greedy(lm, prompt):
    model, params = lm
    greedy = generate(model, params, prompt, N, jax.random.key(0), temperature=0.0)
    for seed in (1, 2):
        top1 = generate(model, params, prompt, N, jax.random.key(seed), temperature=1.0, top_k=1)
        np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))


def test_top_k_samples_only_among_the_k_most_likely(lm, prompt):
    model, params = lm
    k = 3
    outs = [np.asarray(generate(model, params, prompt, N, jax.random.key(s), top_k=k)) for s in range(3)]
    for seq in outs:
        logits = reference_step_logits(model, params, jnp.asarray(seq))  # (N, B, V)
        topk = np.argsort(-logits, axis=-1)[..., :k]  # (N, B, k)
        sampled = seq[:, T0:].T  # (N, B)
        assert np.all((topk == sampled[..., None]).any(-1)), (topk, sampled)
    # and it is not just greedy: some sample is not the argmax
    assert any(
        np.any(seq[:, T0:].T != reference_step_logits(model, params, jnp.asarray(seq)).argmax(-1)) for seq in outs
    )


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_samples_follow_the_tempered_model_distribution(temperature):
    # A bigram table fixes p(next | last) = softmax(table[last] / temperature): check the sampler against it.
    vocab, n = 5, 4000
    table = jnp.asarray(np.random.default_rng(0).normal(size=(vocab, vocab)), jnp.float32)
    params = {"logits_table": {"embedding": table}}
    prompt = jnp.full((n, 1), 2, jnp.int32)
    out = np.asarray(generate(BigramLM(vocab), params, prompt, 1, jax.random.key(0), temperature=temperature))
    freq = np.bincount(out[:, 1], minlength=vocab) / n
    logits = np.asarray(table[2], np.float64) / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    np.testing.assert_allclose(freq, p, atol=0.03)  # ~4 binomial standard deviations at n = 4000


def test_one_compile_and_one_model_trace_for_many_tokens():
    # A config no other test uses, so the first call really compiles.
    cfg = CFG.replace(block_size=6)
    model = TransformerLM(cfg)
    params = jax.tree_util.tree_map(
        lambda s: jnp.full(s.shape, 0.1, s.dtype),
        jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 6), jnp.int32)), jax.random.key(0))["params"],
    )
    traces = []

    def count(next_fun, args, kwargs, context):
        if isinstance(context.module, TransformerLM) and context.method_name == "__call__":
            traces.append(1)
        return next_fun(*args, **kwargs)

    before = _generate._cache_size()
    with nn.intercept_methods(count):
        generate(model, params, jnp.zeros((1, 2), jnp.int32), 10, jax.random.key(0))
        assert _generate._cache_size() == before + 1
        assert len(traces) == 1  # the model is traced once for all 10 tokens: a lax loop, not a Python one
        generate(model, params, jnp.ones((1, 2), jnp.int32), 10, jax.random.key(1))  # new key, new prompt
    assert _generate._cache_size() == before + 1
    assert len(traces) == 1


def test_one_dimensional_prompt_and_zero_new_tokens(lm):
    model, params = lm
    out = generate(model, params, jnp.array([1, 2, 3]), 0, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out), [[1, 2, 3]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(tokens=jnp.zeros((1, 0), jnp.int32)), "tokens"),
    ],
)
def test_bad_arguments_raise(lm, kwargs, match):
    model, params = lm
    args = dict(tokens=jnp.zeros((1, 2), jnp.int32), max_new_tokens=3, key=jax.random.key(0)) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, params, **args)
