"""ModelConfig validation, TransformerLM causality and order-awareness, training, dtypes, sizes."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attention_jax.model import (
    BigramLM,
    Block,
    ModelConfig,
    TransformerLM,
    block_options,
    count_params,
    cross_entropy,
    init_params,
)

V, T = 11, 8
POS = ["learned", "sinusoidal", "rope", "none"]


def tiny(**changes) -> ModelConfig:
    base = dict(vocab_size=V, block_size=T, n_embd=16, n_head=2, n_layer=1)
    return ModelConfig(**{**base, **changes})


def tokens_for(seed=0, shape=(1, T)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


def xent(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# --- ModelConfig ----------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(vocab_size=3.5), "vocab_size"),
        (dict(block_size=0), "block_size"),
        (dict(n_embd=-16), "n_embd"),
        (dict(n_head=0), "n_head"),
        (dict(n_layer=-1), "n_layer"),
        (dict(n_embd=30, n_head=4), "head_size"),  # not divisible, head_size not given
        (dict(head_size=0), "head_size"),
        (dict(head_size=7, pos_encoding="rope"), "head_size"),
        (dict(n_embd=18, n_head=2, pos_encoding="rope"), "head_size"),  # derived head_size 9 is odd
        (dict(attn_scale="bogus"), "attn_scale"),
        (dict(attn_scale=-1.0), "attn_scale"),
        (dict(pos_encoding="xpos"), "pos_encoding"),
        (dict(qk_norm="yes"), "qk_norm"),
        (dict(dropout=-0.1), "dropout"),
        (dict(dropout=1.0), "dropout"),
        (dict(dtype="float64"), "dtype"),
        (dict(attention_impl="flash"), "attention_impl"),
    ],
)
def test_config_rejects_impossible_combinations(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
        tiny(**changes)


def test_config_error_explains_divisibility():
    with pytest.raises(ValueError, match=r"n_embd=30.*n_head=4"):
        tiny(n_embd=30, n_head=4)


@pytest.mark.parametrize(
    "field, bad, choices",
    [
        ("pos_encoding", "xpos", POS),
        ("dtype", "float64", ["float32", "bfloat16"]),
        ("attn_scale", "bogus", ["sqrt", "none", "mup"]),
    ],
)
def test_config_error_lists_valid_choices(field, bad, choices):
    with pytest.raises(ValueError) as info:
        tiny(**{field: bad})
    assert all(c in str(info.value) for c in choices), str(info.value)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny().n_embd = 32


def test_head_size_is_independent_of_width(fake_init):
    cfg = tiny(n_embd=32, n_head=4, head_size=16)  # H*D = 64 != C = 32
    model = TransformerLM(cfg)
    params = fake_init(model, tokens_for())
    attn = params["block_0"]["attn"]
    assert attn["qkv_kernel"].shape == (32, 3, 4, 16)
    assert attn["proj_kernel"].shape == (4, 16, 32)
    assert model.apply({"params": params}, tokens_for(shape=(2, T))).shape == (2, T, V)
    # divisibility is only needed when head_size is derived
    assert tiny(n_embd=30, n_head=4, head_size=8).head_dim == 8


def test_replace_rederives_a_derived_head_size_and_keeps_an_explicit_one():
    derived = tiny(n_embd=32, n_head=4)
    assert derived.head_size is None and derived.head_dim == 8  # None: derived from n_embd / n_head
    assert derived.replace(n_head=2).head_dim == 16
    assert derived.replace(n_embd=64).head_dim == 16
    explicit = tiny(n_embd=32, n_head=4, head_size=8)
    assert explicit.replace(n_head=2).head_dim == 8
    assert explicit.replace(head_size=4).head_dim == 4
    with pytest.raises(ValueError, match="pos_encoding"):
        derived.replace(pos_encoding="bad")  # .replace validates too
    with pytest.raises(ValueError, match="head_size"):
        derived.replace(n_embd=30)  # re-derived: 30 / 4 is impossible


# --- sizes and init -----------------------------------------------------------------


def test_lecture_gpt_parameter_count():
    cfg = ModelConfig(vocab_size=65, block_size=256, n_embd=384, n_head=6, n_layer=6)
    shapes = jax.eval_shape(lambda k: init_params(TransformerLM(cfg), k), jax.random.key(0))
    assert count_params(shapes) == 10_788_929  # the lecture's "10.788929 M parameters"


def test_bigram_parameter_count():
    params = jax.eval_shape(lambda k: init_params(BigramLM(V), k), jax.random.key(0))
    assert count_params(params) == V * V


def test_gpt2_initialization():
    # Residual-branch outputs get std 0.02 / sqrt(2 * n_layer); everything else 0.02. One Block
    # of a 3-layer config is enough to see both (and compiles far fewer RNG calls than a model).
    cfg = ModelConfig(vocab_size=16, block_size=T, n_embd=64, n_head=4, n_layer=3)
    x = jnp.zeros((1, T, 64))
    p = jax.jit(Block(cfg).init)(jax.random.key(0), x)["params"]  # the real initializer
    std = lambda a: float(jnp.std(a))
    assert std(p["attn"]["qkv_kernel"]) == pytest.approx(0.02, rel=0.1)
    assert std(p["mlp"]["fc"]["kernel"]) == pytest.approx(0.02, rel=0.1)
    residual = 0.02 / (2 * 3) ** 0.5
    assert std(p["attn"]["proj_kernel"]) == pytest.approx(residual, rel=0.1)
    assert std(p["mlp"]["proj"]["kernel"]) == pytest.approx(residual, rel=0.1)
    assert float(jnp.abs(p["attn"]["proj_bias"]).max()) == 0.0
    assert float(jnp.abs(p["ln_attn"]["scale"] - 1).max()) == 0.0


# --- sequence length ----------------------------------------------------------------


@pytest.mark.parametrize("pos_encoding", POS)
def test_shorter_sequence_equals_prefix_of_full_one(fake_init, pos_encoding):
    cfg = tiny(pos_encoding=pos_encoding)
    model = TransformerLM(cfg)
    params = fake_init(model, tokens_for(), std=0.3)
    toks = tokens_for(shape=(2, T))
    full = np.asarray(model.apply({"params": params}, toks))
    short = np.asarray(model.apply({"params": params}, toks[:, :5]))
    assert short.shape == (2, 5, V) and short.dtype == np.float32
    np.testing.assert_allclose(short, full[:, :5], rtol=1e-5, atol=1e-6)


def test_longer_than_block_size_raises(fake_init):
    model = TransformerLM(tiny())
    params = fake_init(model, tokens_for())
    with pytest.raises(ValueError, match="block_size"):
        model.apply({"params": params}, jnp.zeros((1, T + 1), jnp.int32))


# --- causality ------------------------------------------------------------------------


def logits_given_embedding_offset(model, params, tokens, delta):
    """Logits with ``delta`` (B, T, C) added to the token embeddings: a continuous input to differentiate."""

    def add_delta(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name == "token_embedding" and context.method_name == "__call__":
            return out + delta
        return out

    with nn.intercept_methods(add_delta):
        return model.apply({"params": params}, tokens)


@pytest.mark.parametrize("scale", ["sqrt", "none", "mup"])
@pytest.mark.parametrize("pos_encoding", POS)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_transformer_gradient_is_causal(causal_check, fake_init, scale, pos_encoding, qk_norm):
    # One layer keeps the 24-case grid cheap; the bitwise test below covers two layers.
    cfg = tiny(attn_scale=scale, pos_encoding=pos_encoding, qk_norm=qk_norm)
    model = TransformerLM(cfg)
    params = fake_init(model, tokens_for(), std=0.3)
    toks = tokens_for()
    delta = jnp.zeros((1, T, cfg.n_embd))
    # the offset really is on the model's input path
    bumped = logits_given_embedding_offset(model, params, toks, delta.at[0, 0, 0].set(1.0))
    assert not np.allclose(np.asarray(bumped), np.asarray(model.apply({"params": params}, toks)))
    jac = jax.jacrev(lambda d: logits_given_embedding_offset(model, params, toks, d))(delta)
    causal_check(jac)  # (1, T, V, 1, T, C)


@pytest.mark.parametrize("pos_encoding", POS)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_changing_future_tokens_leaves_past_logits_bitwise_unchanged(fake_init, pos_encoding, qk_norm):
    cfg = tiny(pos_encoding=pos_encoding, qk_norm=qk_norm, n_layer=2)
    model = TransformerLM(cfg)
    params = fake_init(model, tokens_for(), std=0.3)
    apply = lambda t: model.apply({"params": params}, t)
    toks = tokens_for()
    base = np.asarray(apply(toks))
    for i in (0, 3, T - 2):
        changed = toks.at[:, i + 1 :].set((toks[:, i + 1 :] + 1) % V)
        out = np.asarray(apply(changed))
        np.testing.assert_array_equal(out[:, : i + 1], base[:, : i + 1])
        assert not np.array_equal(out[:, i + 1 :], base[:, i + 1 :])


# --- no notion of space without positions ------------------------------------------------


@pytest.mark.parametrize(
    "pos_encoding, n_layer, invariant",
    [
        ("none", 1, True),
        ("learned", 1, False),
        ("sinusoidal", 1, False),
        ("rope", 1, False),
        ("none", 2, False),
    ],  # from two layers on, the causal mask itself leaks order
)
def test_transformer_permutation_of_the_past(fake_init, pos_encoding, n_layer, invariant):
    cfg = tiny(pos_encoding=pos_encoding, n_layer=n_layer)
    model = TransformerLM(cfg)
    # A generic parameter point with O(1) activations (see conftest.fake_init_params).
    params = fake_init(model, tokens_for(), std=0.3)
    toks = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])  # distinct, so any permutation changes the input
    perm = np.array([3, 0, 6, 1, 5, 2, 4, 7])  # permutes positions 0..6, keeps t = 7
    y = np.asarray(model.apply({"params": params}, toks))[0, -1]
    y_perm = np.asarray(model.apply({"params": params}, toks[:, perm]))[0, -1]
    if invariant:
        np.testing.assert_allclose(y_perm, y, rtol=1e-4, atol=1e-5)
    else:
        assert np.max(np.abs(y_perm - y)) > 1e-2 * np.max(np.abs(y))


# --- training, dtypes, dropout --------------------------------------------------------------


def train(model, params, x, y, steps, lr):
    opt = optax.adam(lr)

    @jax.jit
    def step(carry, _):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(lambda p: xent(model.apply({"params": p}, x), y))(params)
        updates, opt_state = opt.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params, np.asarray(losses)


def test_transformer_overfits_one_batch(fake_init):
    cfg = tiny(n_embd=32, n_head=4, n_layer=1)
    model = TransformerLM(cfg)
    params = fake_init(model, tokens_for())  # GPT-style N(0, 0.02)
    data = tokens_for(1, (4, T + 1))
    x, y = data[:, :-1], data[:, 1:]
    params, losses = train(model, params, x, y, steps=200, lr=1e-2)
    assert losses[0] == pytest.approx(np.log(V), rel=0.1)  # near-uniform at init
    final = float(xent(model.apply({"params": params}, x), y))
    assert final < 0.1 * losses[0], (losses[0], final)


def test_bigram_learns_the_bigram_statistics(fake_init):
    text = "the cat sat on the mat. the dog sat on the log. " * 4
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], np.int32)
    vocab = len(chars)
    # The best any bigram model can do is the empirical conditional entropy.
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (ids[:-1], ids[1:]), 1)
    cond = counts / counts.sum(1, keepdims=True)
    floor = -np.mean(np.log(cond[ids[:-1], ids[1:]]))
    model = BigramLM(vocab)
    params = fake_init(model, tokens_for())
    x, y = jnp.asarray(ids[None, :-1]), jnp.asarray(ids[None, 1:])
    params, losses = train(model, params, x, y, steps=300, lr=0.1)
    final = float(xent(model.apply({"params": params}, x), y))
    assert losses[0] == pytest.approx(np.log(vocab), rel=0.05)
    assert final < losses[0] - 1.0
    assert final == pytest.approx(floor, abs=0.05)


def test_bfloat16_runs_close_to_float32(fake_init):
    cfg32 = tiny(n_layer=2)
    toks = tokens_for(shape=(2, T))
    params = fake_init(TransformerLM(cfg32), toks, std=0.1)
    cfg16 = cfg32.replace(dtype="bfloat16")
    shapes16 = jax.eval_shape(lambda k: init_params(TransformerLM(cfg16), k, T), jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes16))  # params stay f32
    l32 = np.asarray(TransformerLM(cfg32).apply({"params": params}, toks))
    l16 = TransformerLM(cfg16).apply({"params": params}, toks)
    assert l16.dtype == jnp.float32
    l16 = np.asarray(l16)
    assert np.all(np.isfinite(l16))
    # bf16 has an 8-bit mantissa (~0.4% relative): a loose, scale-relative tolerance.
    assert np.max(np.abs(l16 - l32)) < 0.05 * np.max(np.abs(l32)) + 1e-2
    assert not np.array_equal(l16, l32)  # it really computed in lower precision


def test_dropout_is_random_in_training_and_off_in_evaluation(fake_init):
    cfg = tiny(dropout=0.2)
    model = TransformerLM(cfg)
    toks = tokens_for(shape=(2, T))
    params = fake_init(model, toks, std=0.3)
    no_dropout = TransformerLM(cfg.replace(dropout=0.0)).apply({"params": params}, toks)
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, toks)), np.asarray(no_dropout))
    train_out = lambda k: np.asarray(
        model.apply({"params": params}, toks, deterministic=False, rngs={"dropout": jax.random.key(k)})
    )
    np.testing.assert_array_equal(train_out(1), train_out(1))
    assert not np.allclose(train_out(1), train_out(2))


def test_nanogpt_variant_parameter_count_and_tying():
    """bias=False, tie_embeddings=True is nanoGPT's baby GPT: it reports 10.65M parameters
    without the position table (get_num_params(non_embedding=True))."""
    cfg = ModelConfig(vocab_size=65, block_size=256, n_embd=384, n_head=6, n_layer=6, bias=False, tie_embeddings=True)
    shapes = jax.eval_shape(lambda: init_params(TransformerLM(cfg), jax.random.key(0), 8))
    flat = jax.tree_util.tree_leaves_with_path(shapes)
    assert not any("bias" in jax.tree_util.keystr(path) for path, _ in flat)
    assert "lm_head" not in shapes
    assert count_params(shapes) - 256 * 384 == 10_646_784

    small = cfg.replace(block_size=8, n_embd=16, n_head=2, n_layer=1)
    model = TransformerLM(small)
    params = init_params(model, jax.random.key(1), 8)
    tokens = jnp.arange(8)[None] % 65
    logits = model.apply({"params": params}, tokens)
    # Tied: the logits are the final hidden states times the embedding table transposed.
    _, state = model.apply({"params": params}, tokens, capture_intermediates=True, mutable=["intermediates"])
    hidden = state["intermediates"]["ln_final"]["__call__"][0]
    want = np.asarray(hidden) @ np.asarray(params["token_embedding"]["embedding"]).T
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-5)


def test_cross_entropy_equals_independent_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 7)
    z = np.asarray(logits, np.float64)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    want = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1).mean()
    assert float(cross_entropy(logits, targets)) == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_xla_attention_equals_dense_in_a_block():
    cfg = ModelConfig(vocab_size=11, block_size=16, n_embd=32, n_head=4, n_layer=2)
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    dense, xla = Block(cfg), Block(cfg.replace(attention_impl="xla"))
    params = dense.init(jax.random.key(1), x)
    # Random weights of std 0.3 give O(1) logits: a wrong mask or scale shows far above float noise.
    params = jax.tree_util.tree_map(lambda p: 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)
    np.testing.assert_allclose(jax.jit(xla.apply)(params, x), jax.jit(dense.apply)(params, x), rtol=1e-5, atol=1e-5)
    grad = lambda block: jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(block.apply(p, x)))))
    g_dense, g_xla = grad(dense)(params), grad(xla)(params)
    for a, b in zip(jax.tree_util.tree_leaves(g_dense), jax.tree_util.tree_leaves(g_xla)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_the_gpt2_fields_are_checked_in_one_line_and_are_config_keys():
    """mlp_hidden, activation, norm_epsilon, attn_scale_by_layer, qkv_bias: their numbers are tested against
    transformers' GPT-2 in test_convert; here, what they build and refuse."""
    from attention_jax.lab.config import ConfigError, apply_overrides, base_config, model_config

    cfg = ModelConfig(vocab_size=11, n_embd=16, n_head=2, n_layer=3, mlp_hidden=24, qkv_bias=True,
                      attn_scale_by_layer=True)  # fmt: skip
    params = jax.eval_shape(lambda: TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    block = params["params"]["block_2"]
    assert block["mlp"]["fc"]["kernel"].shape == (16, 24) and block["attn"]["qkv_bias"].shape == (3, 2, 8)
    assert [block_options(cfg, i)[0]["options"].scale for i in range(3)] == [8**-0.5 / (i + 1) for i in range(3)]
    for field, bad, why in [
        ("activation", "gelu_new", r"activation: unknown 'gelu_new', valid choices are \('gelu_tanh', 'gelu'"),
        ("norm_epsilon", 0.0, r"norm_epsilon must be a number in \(0, 1\), got 0.0"),
        ("mlp_hidden", 0, r"mlp_hidden must be a positive integer, got 0"),
        ("qkv_bias", "yes", r"qkv_bias must be True or False, got 'yes'"),
    ]:
        with pytest.raises(ValueError, match=rf"^ModelConfig\.{why}"):
            ModelConfig(vocab_size=11, **{field: bad})
        if field != "qkv_bias":  # (the command line reads "yes" as true)
            with pytest.raises(ConfigError, match=rf"^model\.{why}"):
                model_config(apply_overrides(base_config(), {f"model.{field}": str(bad)}), 11)
    keys = {"model.activation": "relu", "model.mlp_hidden": "64", "model.norm_epsilon": "1e-6",
            "model.attn_scale_by_layer": "true", "model.qkv_bias": "true"}  # fmt: skip
    cfg = model_config(apply_overrides(base_config(), keys), 11)
    assert (cfg.activation, cfg.mlp_width, cfg.norm_epsilon, cfg.attn_scale_by_layer, cfg.qkv_bias) == (
        "relu", 64, 1e-6, True, True,
    )  # fmt: skip
