"""Sampling: determinism, greedy decoding, top-k, context cropping, one compile for many tokens.

Both paths of ``generate`` are checked where the text outgrows the context
window (T0 + N > BLOCK): the full window (``use_cache=False``, the lecture's
crop) and the KV cache, whose crop past block_size is the refill schedule of
``context_starts`` (``refill_to=BLOCK`` makes it the lecture's crop).
"""

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
# Two layers: in one, a query's leak during a prefill changes only the outputs at the prefill's
# earlier positions, which sampling never reads; from two on, those outputs are the next layer's
# cached keys and values, so a leak changes the sampled tokens (test_a_prefill_leak_... below).
CFG = ModelConfig(vocab_size=V, block_size=BLOCK, n_embd=16, n_head=2, n_layer=2)


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


def context_starts(T0, L, W, refill_to):
    """Where the context of each predicted position T0..L-1 starts, by the rule in generate's docstring.

    The window grows until it holds W tokens, then restarts at the latest
    ``refill_to`` tokens; refill_to = W gives the lecture's crop max(0, p - W).
    """
    start, out = max(0, T0 - W), []
    for p in range(T0, L):
        if p - start > W:
            start = p - refill_to
        out.append(start)
    return out


# (generate keyword arguments, tokens kept at a refill) for each path; None: the lecture's crop
PATHS = {
    "full_window": (dict(use_cache=False), BLOCK),
    "cache_exact": (dict(refill_to=BLOCK), BLOCK),
    "cache_default": ({}, BLOCK // 2),
}


def reference_step_logits(model, params, seq, refill_to=BLOCK):
    """The lecture's loop, by hand: logits for each generated position, cropping by ``context_starts``.

    seq (B, T0 + N) -> (N, B, V): entry n is what the model predicts for seq[:, T0 + n].
    """
    starts = context_starts(T0, seq.shape[1], BLOCK, refill_to)
    return np.stack(
        [np.asarray(_last_logits(model, params, seq[:, s:t])) for s, t in zip(starts, range(T0, seq.shape[1]))]
    )


def test_context_starts_is_the_lecture_crop_when_refilling_to_the_block():
    assert context_starts(T0, 30, BLOCK, BLOCK) == [max(0, p - BLOCK) for p in range(T0, 30)]
    # refilling to 4: the window grows to 8 tokens ([0, 8) predicts 8), then restarts at the
    # latest 4 ([5, 9) predicts 9) and grows again to 8 ([5, 13) predicts 13), and so on
    assert context_starts(2, 16, 8, 4) == [0] * 7 + [5] * 5 + [10] * 2


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


def assert_greedy_step_by_step(model, params, prompt, path):
    kwargs, refill_to = PATHS[path]
    out = generate(model, params, prompt, N, jax.random.key(0), temperature=0.0, **kwargs)
    other_key = generate(model, params, prompt, N, jax.random.key(7), temperature=0.0, **kwargs)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(other_key))  # the key does not matter
    # Re-run the loop by hand: crop (the lecture's crop, or the refill schedule), argmax of the last logits.
    seq = prompt
    for start in context_starts(T0, T0 + N, BLOCK, refill_to):
        nxt = jnp.argmax(_last_logits(model, params, seq[:, start:]), axis=-1).astype(jnp.int32)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(seq))


@pytest.mark.parametrize("path", PATHS)
def test_temperature_zero_is_greedy_step_by_step(lm, prompt, path):
    assert_greedy_step_by_step(*lm, prompt, path)


@pytest.mark.parametrize("path", ["cache_exact", "cache_default"])
def test_a_prefill_leak_fails_the_greedy_check(lm, prompt, path, leaky_decode_mask):
    # The test of the test above: with each prefill/refill query seeing one future slot, the
    # cached tokens differ from the hand-made loop's (which runs without the cache).
    with pytest.raises(AssertionError, match="Mismatched elements"):
        assert_greedy_step_by_step(*lm, prompt, path)


def test_top_k_one_is_greedy(lm, prompt):
    model, params = lm
    greedy = generate(model, params, prompt, N, jax.random.key(0), temperature=0.0)
    for seed in (1, 2):
        top1 = generate(model, params, prompt, N, jax.random.key(seed), temperature=1.0, top_k=1)
        np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))


@pytest.mark.parametrize("path", PATHS)
def test_top_k_samples_only_among_the_k_most_likely(lm, prompt, path):
    model, params = lm
    kwargs, refill_to = PATHS[path]
    k = 3
    outs = [np.asarray(generate(model, params, prompt, N, jax.random.key(s), top_k=k, **kwargs)) for s in range(3)]
    for seq in outs:
        logits = reference_step_logits(model, params, jnp.asarray(seq), refill_to)  # (N, B, V)
        topk = np.argsort(-logits, axis=-1)[..., :k]  # (N, B, k)
        sampled = seq[:, T0:].T  # (N, B)
        assert np.all((topk == sampled[..., None]).any(-1)), (topk, sampled)
    # and it is not just greedy: some sample is not the argmax
    assert any(
        np.any(seq[:, T0:].T != reference_step_logits(model, params, jnp.asarray(seq), refill_to).argmax(-1))
        for seq in outs
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


# Model traces per compile: the full window traces the model once. The cache path traces it six
# times here (the cache's shapes, the prompt's prefill, the feed loop before the first refill, a
# refill and the feed loop of the repeated segment, the refill of the last, shorter segment),
# and as often for 10 tokens as for 30: the loops are lax loops, not Python ones.
@pytest.mark.parametrize("use_cache, n_traces", [(False, 1), (True, 6)])
def test_one_compile_and_a_fixed_number_of_model_traces_for_many_tokens(use_cache, n_traces):
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
        generate(model, params, jnp.zeros((1, 2), jnp.int32), 10, jax.random.key(0), use_cache=use_cache)
        assert _generate._cache_size() == before + 1
        assert len(traces) == n_traces  # for all 10 tokens
        # new key, new prompt, new temperature: no new compile
        generate(model, params, jnp.ones((1, 2), jnp.int32), 10, jax.random.key(1), 0.5, use_cache=use_cache)
        assert _generate._cache_size() == before + 1
        assert len(traces) == n_traces
        generate(model, params, jnp.ones((1, 2), jnp.int32), 30, jax.random.key(1), use_cache=use_cache)
    assert _generate._cache_size() == before + 2  # 30 tokens: a new program, traced as often as for 10
    assert len(traces) == 2 * n_traces


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
