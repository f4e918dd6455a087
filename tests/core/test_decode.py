"""KV-cache decoding: the cache reproduces the full forward pass, stays causal, and generate agrees on both paths.

Parameterized over every positional encoding and QK-norm: each changes what
the cache must hold (positions added before the first layer, rotated keys,
normalized keys).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import attention as A
from attention_jax.generate import generate
from attention_jax.layers import Head, MultiHeadAttention
from attention_jax.model import BigramLM, ModelConfig, TransformerLM
from attention_jax.positions import POS_ENCODINGS

V, BLOCK, C, H = 11, 8, 16, 2
GRID = [(pe, qk) for pe in POS_ENCODINGS for qk in (False, True)]


def config(pos_encoding="learned", qk_norm=False, **kw):
    return ModelConfig(
        vocab_size=V, block_size=BLOCK, n_embd=C, n_head=H, n_layer=2, pos_encoding=pos_encoding, qk_norm=qk_norm, **kw
    )


@functools.cache
def lm_and_params(pos_encoding, qk_norm, seed=0, **kw):
    from tests.conftest import fake_init_params

    model = TransformerLM(config(pos_encoding, qk_norm, **kw))
    # std 0.3: peaked, input-dependent distributions, so greedy choices are not near-ties
    return model, fake_init_params(model, jnp.zeros((1, BLOCK), jnp.int32), std=0.3, seed=seed)


def tokens(B=2, T=BLOCK, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)), jnp.int32)


def decode_in_chunks(model, params, toks, chunks):
    """Logits of toks (B, T) fed through the cache in chunks of the given lengths -> (B, T, V)."""
    cache, outs, t = model.init_cache(toks.shape[0]), [], 0
    for n in chunks:
        logits, state = model.apply(
            {"params": params, "cache": cache}, toks[:, t : t + n], decode=True, mutable=["cache"]
        )
        cache, t = state["cache"], t + n
        outs.append(logits)
    return jnp.concatenate(outs, axis=1)


# --- logits --------------------------------------------------------------------------


def assert_cached_logits_equal_the_full_forward(pos_encoding, qk_norm):
    model, params = lm_and_params(pos_encoding, qk_norm)
    toks = tokens()
    full = model.apply({"params": params}, toks)
    got = decode_in_chunks(model, params, toks, (3, 1, 4))  # a prefill, one token, a chunk
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos_encoding, qk_norm", GRID)
def test_cached_logits_equal_the_full_forward(pos_encoding, qk_norm):
    assert_cached_logits_equal_the_full_forward(pos_encoding, qk_norm)


@pytest.mark.parametrize("pos_encoding, qk_norm", [("learned", True), ("rope", False)])
def test_cached_logits_one_token_at_a_time_equal_the_full_forward(pos_encoding, qk_norm):
    chunks = (1,) * BLOCK
    model, params = lm_and_params(pos_encoding, qk_norm)
    toks = tokens()
    full = model.apply({"params": params}, toks)
    got = decode_in_chunks(model, params, toks, chunks)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_cached_logits_equal_the_full_forward_on_other_impls(impl):
    model, params = lm_and_params("rope", False, attention_impl=impl)
    toks = tokens()
    full = model.apply({"params": params}, toks)
    got = decode_in_chunks(model, params, toks, (2, 1, 1, 4))  # blockwise decodes on the dense path
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_init_cache_is_flax_init_with_decode_and_checks_its_length():
    model, params = lm_and_params("learned", False)
    cache = model.init_cache(3, 5)
    by_init = model.init(jax.random.key(0), jnp.zeros((3, 5), jnp.int32), decode=True)["cache"]
    assert jax.tree_util.tree_structure(cache) == jax.tree_util.tree_structure(by_init)
    for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(by_init)):
        assert a.shape == b.shape and a.dtype == b.dtype and not np.any(np.asarray(a))
    attn = cache["block_0"]["attn"]
    assert attn["cached_key"].shape == (3 * H, 5, C // H) and attn["cache_index"].shape == ()
    assert set(cache["positions"]) == {"cache_index"}
    with pytest.raises(ValueError, match="exceeds block_size"):
        model.init_cache(1, BLOCK + 1)


def test_running_past_the_cache_gives_nan_not_wrong_numbers():
    model, params = lm_and_params("rope", False)
    cache = model.init_cache(1, 4)
    logits, state = model.apply({"params": params, "cache": cache}, tokens(1, 4), decode=True, mutable=["cache"])
    assert np.all(np.isfinite(np.asarray(logits)))
    over, _ = model.apply({"params": params, "cache": state["cache"]}, tokens(1, 1), decode=True, mutable=["cache"])
    assert np.all(np.isnan(np.asarray(over)))


@pytest.mark.parametrize("kind", ["head", "mha"])
def test_layer_decode_follows_flax_init_then_steps(fake_init, kind):
    """The Flax convention on a bare layer: init with decode=True sizes the cache; steps append."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, C)), jnp.float32)
    layer = Head(8, decode=True) if kind == "head" else MultiHeadAttention(H, 8, decode=True, pos_encoding="rope")
    variables = layer.init(jax.random.key(0), x)  # creates the cache, attends as usual
    params = fake_init(layer, x, std=0.3)
    full = layer.apply({"params": params}, x, decode=False)
    cache, outs = variables["cache"], []
    for t in range(6):
        out, state = layer.apply({"params": params, "cache": cache}, x[:, t : t + 1], mutable=["cache"])
        cache = state["cache"]
        outs.append(out)
    assert int(cache["cache_index"]) == 6
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-5, atol=1e-6)


def test_decode_with_a_cache_for_another_batch_size_is_refused():
    model, params = lm_and_params("none", False)
    with pytest.raises(ValueError, match="cache holds 4 rows"):
        model.apply({"params": params, "cache": model.init_cache(2)}, tokens(3, 1), decode=True, mutable=["cache"])


# --- causality by gradients in decode mode ----------------------------------------------------


@pytest.mark.parametrize("pos_encoding, qk_norm", [("none", False), ("rope", True)])
def test_decode_prefill_gradient_is_causal(causal_check, fake_init, pos_encoding, qk_norm):
    T = 6
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, T, C)), jnp.float32)
    mha = MultiHeadAttention(H, 8, pos_encoding=pos_encoding, qk_norm=qk_norm, decode=True)
    cache = mha.init(jax.random.key(0), jnp.zeros((1, 10, C)))["cache"]  # room for 10, 6 fed at once
    params = fake_init(mha, x, std=0.3)

    def out(x):
        return mha.apply({"params": params, "cache": cache}, x, mutable=["cache"])[0]

    causal_check(jax.jacrev(jax.jit(out))(x))


def test_a_decode_step_sees_the_cached_past_and_nothing_after(influence, fake_init):
    """After a prefill of 3, a 3-token chunk at positions 3..5: causal within it, and every output
    depends on every cached token through the cache (by gradients through prefill and step)."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 6, C)), jnp.float32)
    mha = MultiHeadAttention(H, 8, pos_encoding="rope", decode=True)
    cache = mha.init(jax.random.key(0), jnp.zeros((1, 6, C)))["cache"]
    params = fake_init(mha, x, std=0.3)
    _, state = mha.apply({"params": params, "cache": cache}, x[:, :3], mutable=["cache"])
    step = lambda chunk: mha.apply({"params": params, "cache": state["cache"]}, chunk, mutable=["cache"])[0]
    m = influence(jax.jacrev(jax.jit(step))(x[:, 3:]))
    future = np.triu(np.ones((3, 3), bool), k=1)
    assert np.all(m[future] == 0.0) and np.all(m[~future] > 0.0), m

    def prefill_then_step(x):  # both calls as one function of all 6 inputs: the past reaches through the cache
        _, state = mha.apply({"params": params, "cache": cache}, x[:, :3], mutable=["cache"])
        return mha.apply({"params": params, "cache": state["cache"]}, x[:, 3:], mutable=["cache"])[0]

    jac = np.asarray(jax.jacrev(jax.jit(prefill_then_step))(x))  # (1, 3, C, 1, 6, C)
    m = np.abs(jac[0]).sum(axis=(1, 4))[:, 0, :]  # (3 outputs, 6 inputs)
    assert np.all(m[:, :3] > 0.0), m  # every output sees every cached token
    assert np.all(m[:, 3:][future] == 0.0) and np.all(m[:, 3:][~future] > 0.0), m


# --- generate: cached against full window --------------------------------------------------


def assert_cached_generate_equals_the_full_window(pos_encoding, qk_norm):
    model, params = lm_and_params(pos_encoding, qk_norm)
    # 8 rows and a 3-token prompt: enough tokens that a leak during the prefill changes some
    # of them on every case of the grid (test_a_prefill_leak_fails_... below; a 2-row, 2-token
    # prompt let it through on sinusoidal positions)
    prompt = tokens(PROMPT_ROWS, PROMPT_LEN)
    n = BLOCK - PROMPT_LEN  # the text fills the block exactly: no refill, both paths see the same context
    for temperature in (0.0, 1.0):  # greedy and sampled (the temperature is a runtime value: one compile)
        full = generate(model, params, prompt, n, jax.random.key(3), temperature, use_cache=False)
        cached = generate(model, params, prompt, n, jax.random.key(3), temperature)
        np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))


PROMPT_ROWS, PROMPT_LEN = 8, 3


@pytest.mark.parametrize("pos_encoding, qk_norm", GRID)
def test_cached_generate_equals_the_full_window_greedy_and_sampled(pos_encoding, qk_norm):
    assert_cached_generate_equals_the_full_window(pos_encoding, qk_norm)


@pytest.mark.parametrize("pos_encoding, qk_norm", [("sinusoidal", False), ("rope", True)])
def test_a_prefill_leak_fails_the_logit_and_the_token_checks(pos_encoding, qk_norm, leaky_decode_mask):
    # The test of the tests above: each prefill query seeing one future slot must fail both.
    with pytest.raises(AssertionError, match="Mismatched elements"):
        assert_cached_logits_equal_the_full_forward(pos_encoding, qk_norm)
    with pytest.raises(AssertionError, match="Mismatched elements"):
        assert_cached_generate_equals_the_full_window(pos_encoding, qk_norm)


@pytest.mark.slow
@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_refilling_to_the_block_equals_the_full_window_far_past_block_size(pos_encoding):
    model, params = lm_and_params(pos_encoding, False)
    prompt = tokens(2, 3)
    n = 3 * BLOCK  # the window slides 3 blocks' worth: every step past the block refills
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=4)):
        full = generate(model, params, prompt, n, jax.random.key(5), use_cache=False, **kw)
        cached = generate(model, params, prompt, n, jax.random.key(5), refill_to=BLOCK, **kw)
        np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))


def test_a_prompt_longer_than_the_block_starts_from_its_last_window():
    model, params = lm_and_params("sinusoidal", True)
    prompt = tokens(1, BLOCK + 3)
    full = generate(model, params, prompt, 4, jax.random.key(0), 0.0, use_cache=False)
    cached = generate(model, params, prompt, 4, jax.random.key(0), 0.0, refill_to=BLOCK)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))


def test_bigram_generates_the_same_with_and_without_its_empty_cache():
    params = {"logits_table": {"embedding": jnp.asarray(np.random.default_rng(0).normal(size=(V, V)), jnp.float32)}}
    model = BigramLM(V)
    a = generate(model, params, tokens(3, 2), 12, jax.random.key(1))
    b = generate(model, params, tokens(3, 2), 12, jax.random.key(1), use_cache=False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_traced_temperature_under_jit_equals_the_concrete_one():
    model, params = lm_and_params("rope", False)
    prompt = tokens(2, 2)
    run = jax.jit(lambda t: generate(model, params, prompt, 5, jax.random.key(2), t, top_k=5))
    for t in (0.0, 0.8):
        np.testing.assert_array_equal(
            np.asarray(run(jnp.float32(t))), np.asarray(generate(model, params, prompt, 5, jax.random.key(2), t, 5))
        )
    greedy = generate(model, params, prompt, 5, jax.random.key(9), 0.0)
    np.testing.assert_array_equal(np.asarray(run(jnp.float32(0.0))), np.asarray(greedy))


def test_numpy_integers_are_accepted_where_ints_are():
    cfg = ModelConfig(
        vocab_size=np.int64(V), block_size=np.int32(BLOCK), n_embd=np.int64(C), n_head=np.int64(H), n_layer=np.int8(1)
    )
    assert cfg == ModelConfig(vocab_size=V, block_size=BLOCK, n_embd=C, n_head=H, n_layer=1)
    assert type(cfg.vocab_size) is int and hash(cfg) == hash(cfg.replace())
    model, params = lm_and_params("learned", False)
    out = generate(model, params, np.array([[1, 2]]), np.int64(3), jax.random.key(0), np.float32(0.5), np.int32(2))
    assert out.shape == (1, 5)
    assert A.causal_mask(np.int64(3)).shape == (3, 3)
    assert A.resolve_scale("mup", np.int64(8)) == 1 / 8
    x = jnp.ones((1, 4, C))
    head = Head(np.int64(8))
    assert head.apply(head.init(jax.random.key(0), x), x).shape == (1, 4, 8)
    assert model.init_cache(np.int64(2), np.int64(4))["block_0"]["attn"]["cached_key"].shape == (2 * H, 4, C // H)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(refill_to=0), "refill_to"),
        (dict(refill_to=BLOCK + 1), "refill_to"),
        (dict(use_cache=True, model="plain"), "init_cache"),
    ],
)
def test_bad_decoding_arguments_raise(kwargs, match):
    import flax.linen as nn

    class Plain(nn.Module):  # a model of one's own without init_cache
        @nn.compact
        def __call__(self, tokens):
            return nn.Embed(V, V)(tokens)

    model, params = lm_and_params("learned", False)
    if kwargs.pop("model", None):
        model = Plain()
        params = model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    with pytest.raises(ValueError, match=match):
        generate(model, params, tokens(1, 2), 3 * BLOCK, jax.random.key(0), **kwargs)


def test_a_model_of_ones_own_without_a_cache_uses_the_full_window():
    import flax.linen as nn

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            return nn.Embed(V, V)(tokens)

    model = Plain()
    params = model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    out = generate(model, params, tokens(1, 2), 4, jax.random.key(0), 0.0)
    table = np.asarray(params["Embed_0"]["embedding"])
    seq = list(np.asarray(tokens(1, 2))[0])
    for _ in range(4):
        seq.append(int(np.argmax(table[seq[-1]])))
    np.testing.assert_array_equal(np.asarray(out)[0], seq)


def test_generate_refuses_a_non_causal_model():
    model = TransformerLM(config().replace(causal=False))
    params = model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    with pytest.raises(ValueError, match="causal"):
        generate(model, params, tokens(1, 2), 2, jax.random.key(0))


@pytest.mark.parametrize("window", [None, 3])
def test_attention_heads_decodes_alike_with_a_flat_or_a_batch_first_cache(window):
    """The cache layout is the caller's: (B·H, S, D) as the layers keep it, or (B, H, S, D) (for beam search and
    benchmarks.decode --layouts); the outputs and the updated caches are the same, each in its own shape."""
    from attention_jax import attention as A

    rng = np.random.default_rng(0)
    B_, H_, S_, D_ = 2, 3, 6, 4
    q, k, v = (jnp.asarray(rng.normal(size=(B_, H_, S_, D_)), jnp.float32) for _ in range(3))
    slots = S_ if window is None else window
    caches = {
        "flat": (jnp.zeros((B_ * H_, slots, D_)), jnp.zeros((B_ * H_, slots, D_)), jnp.array(0)),
        "batch first": (jnp.zeros((B_, H_, slots, D_)), jnp.zeros((B_, H_, slots, D_)), jnp.array(0)),
    }
    outs = {}
    for name, cache in caches.items():
        steps = []
        for t in range(S_):
            new = lambda a: a[:, :, t : t + 1]
            out, cache = A.attention_heads(new(q), new(k), new(v), scale=0.5, causal=True, impl="dense", rope=True,
                                           cache=cache, window=window)  # fmt: skip
            steps.append(out)
        assert cache[0].shape == caches[name][0].shape  # back in the shape it came in
        outs[name] = (np.asarray(jnp.concatenate(steps, axis=2)), np.asarray(cache[0]).reshape(B_ * H_, slots, D_))
    full, _ = A.attention_heads(q, k, v, scale=0.5, causal=True, impl="dense", rope=True, window=window)
    np.testing.assert_allclose(outs["flat"][0], np.asarray(full), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outs["batch first"][0], outs["flat"][0])
    np.testing.assert_array_equal(outs["batch first"][1], outs["flat"][1])
