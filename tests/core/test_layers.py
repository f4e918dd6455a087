"""Linen layers: causality by gradients, Head == PyTorch head, MHA == concatenated Heads, positions."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import attention as A
from attention_jax.layers import AddPositions, FeedForward, Head, MultiHeadAttention
from attention_jax.model import Block, ModelConfig
from attention_jax.positions import apply_rope, sinusoidal_encoding

B, T, C = 2, 8, 16
SCALES = ["sqrt", "none", "mup"]
LAYER_POS = ["none", "rope"]  # the encodings that act inside an attention layer


def x_input(seed=0, shape=(B, T, C)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def make_layer(kind, **kw):
    if kind == "head":
        return Head(head_size=8, **kw)
    return MultiHeadAttention(num_heads=2, head_size=8, **kw)


# --- causality ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["head", "mha"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("pos_encoding", LAYER_POS)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_layer_gradient_is_causal(causal_check, fake_init, kind, scale, pos_encoding, qk_norm):
    layer = make_layer(kind, scale=scale, pos_encoding=pos_encoding, qk_norm=qk_norm)
    x = x_input(shape=(1, T, C))
    params = {"params": fake_init(layer, x, std=0.3)}
    causal_check(jax.jacrev(lambda x: layer.apply(params, x))(x))


@pytest.mark.parametrize("kind", ["head", "mha"])
def test_non_causal_layer_sees_the_future(influence, fake_init, kind):
    # Sanity for the check above: with causal=False the future does leak in.
    layer = make_layer(kind, causal=False)
    x = x_input(shape=(1, T, C))
    params = {"params": fake_init(layer, x, std=0.3)}
    m = influence(jax.jacrev(lambda x: layer.apply(params, x))(x))
    assert np.all(m > 0)


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_block_gradient_is_causal(causal_check, fake_init, pos_encoding, qk_norm):
    cfg = ModelConfig(
        vocab_size=5, block_size=T, n_embd=C, n_head=2, n_layer=1, pos_encoding=pos_encoding, qk_norm=qk_norm
    )
    block = Block(cfg)
    x = x_input(shape=(1, T, C))
    params = {"params": fake_init(block, x, std=0.3)}
    causal_check(jax.jacrev(lambda x: block.apply(params, x))(x))


# --- Head -----------------------------------------------------------------------


def test_head_params_and_sown_weights():
    head = Head(head_size=8)
    x = x_input()
    params = head.init(jax.random.key(0), x)["params"]  # the real initializer, once
    assert set(params) == {"key", "query", "value"}
    for name in ("key", "query", "value"):
        assert set(params[name]) == {"kernel"}  # bias-free
        assert params[name]["kernel"].shape == (C, 8)
    out, state = head.apply({"params": params}, x, mutable=["intermediates"])
    assert out.shape == (B, T, 8)
    (w,) = state["intermediates"]["attention_weights"]
    assert w.shape == (B, T, T)
    w = np.asarray(w)
    assert np.all(w[:, ~np.tril(np.ones((T, T), bool))] == 0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    # the output is exactly those weights applied to the values
    v = np.asarray(x) @ np.asarray(params["value"]["kernel"])
    np.testing.assert_allclose(np.asarray(out), w @ v, rtol=1e-5, atol=1e-6)


def test_head_matches_pytorch_head():
    torch = pytest.importorskip("torch")
    tnn = torch.nn

    class TorchHead(tnn.Module):
        """The lecture's head (no dropout, no scaling), written independently."""

        def __init__(self, n_embd, head_size, block_size):
            super().__init__()
            self.key = tnn.Linear(n_embd, head_size, bias=False)
            self.query = tnn.Linear(n_embd, head_size, bias=False)
            self.value = tnn.Linear(n_embd, head_size, bias=False)
            self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))

        def forward(self, x):
            _, t, _ = x.shape
            k, q = self.key(x), self.query(x)
            wei = q @ k.transpose(-2, -1)
            wei = wei.masked_fill(self.tril[:t, :t] == 0, float("-inf"))
            wei = torch.nn.functional.softmax(wei, dim=-1)
            return wei @ self.value(x)

    torch.manual_seed(0)
    n_embd, head_size = 32, 16
    th = TorchHead(n_embd, head_size, block_size=T).eval()
    x = torch.randn(B, T, n_embd)
    with torch.no_grad():
        expected = th(x).numpy()
    params = {
        name: {"kernel": jnp.asarray(getattr(th, name).weight.detach().numpy().T)} for name in ("key", "query", "value")
    }
    out = Head(head_size, scale="none").apply({"params": params}, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


# --- MultiHeadAttention == concatenated Heads ---------------------------------


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("pos_encoding", LAYER_POS)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_mha_equals_concatenated_heads(fake_init, scale, pos_encoding, qk_norm):
    H, D = 3, 8
    kw = dict(scale=scale, pos_encoding=pos_encoding, qk_norm=qk_norm)
    x = x_input()
    mha = MultiHeadAttention(num_heads=H, head_size=D, **kw)
    # Random everything (nonzero projection bias, non-unit norm scales) so all of it is checked.
    p = fake_init(mha, x, std=0.3)
    assert p["qkv_kernel"].shape == (C, 3, H, D)

    head = Head(head_size=D, **kw)
    heads_out, heads_w = [], []
    for h in range(H):
        hp = {
            name: {"kernel": p["qkv_kernel"][:, i, h, :]}
            for i, name in enumerate(("query", "key", "value"))  # qkv index 0=q, 1=k, 2=v
        }
        if qk_norm:
            hp["query_norm"], hp["key_norm"] = p["query_norm"], p["key_norm"]
        out, st = head.apply({"params": hp}, x, mutable=["intermediates"])
        heads_out.append(np.asarray(out))
        heads_w.append(np.asarray(st["intermediates"]["attention_weights"][0]))
    concat = np.concatenate(heads_out, axis=-1)  # (B, T, H*D)
    expected = concat @ np.asarray(p["proj_kernel"]).reshape(H * D, C) + np.asarray(p["proj_bias"])

    got, st = mha.apply({"params": p}, x, mutable=["intermediates"])
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    mha_w = np.asarray(st["intermediates"]["attention_weights"][0])  # (B, H, T, T)
    np.testing.assert_allclose(mha_w, np.stack(heads_w, axis=1), rtol=1e-5, atol=1e-7)


def test_mha_head_size_independent_of_width(fake_init):
    x = x_input()
    mha = MultiHeadAttention(num_heads=4, head_size=16)  # H*D = 64 != C = 16
    p = fake_init(mha, x)
    assert p["qkv_kernel"].shape == (C, 3, 4, 16) and p["proj_kernel"].shape == (4, 16, C)
    assert mha.apply({"params": p}, x).shape == (B, T, C)


def test_mha_dropout_only_when_not_deterministic(fake_init):
    x = x_input()
    mha = MultiHeadAttention(num_heads=2, head_size=8, dropout_rate=0.5)
    p = {"params": fake_init(mha, x, std=0.3, deterministic=True)}
    plain = MultiHeadAttention(num_heads=2, head_size=8).apply(p, x)
    np.testing.assert_array_equal(np.asarray(mha.apply(p, x, deterministic=True)), np.asarray(plain))
    a = mha.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = mha.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(np.asarray(a), np.asarray(b))
    # With dropout on, deterministic must be given, as in Flax: never silently off.
    with pytest.raises(ValueError, match=r"^MultiHeadAttention: dropout is on \(rate 0.5\), so pass deterministic"):
        mha.apply(p, x)


def test_dropout_rate_drops_the_weights_only_and_out_dropout_rate_the_output(fake_init):
    """Flax's meaning of dropout_rate (the attention weights); the output's (a residual branch's) is its own."""
    x = x_input()
    p = {"params": fake_init(MultiHeadAttention(2, 8), x, std=0.3)}
    rngs = {"dropout": jax.random.key(1)}
    weights_only = MultiHeadAttention(2, 8, dropout_rate=0.5, use_bias=False)
    p_nobias = {"params": {k: v for k, v in p["params"].items() if k != "proj_bias"}}
    y = np.asarray(weights_only.apply(p_nobias, x, deterministic=False, rngs=rngs))
    # The output itself is not dropped (Flax's layer drops none either): a row that sees 5 keys or more is zero
    # only when all its weights in both heads are, about 1e-3 of the time.
    assert np.mean(y[:, 4:] == 0.0) < 0.01
    out_only = MultiHeadAttention(2, 8, out_dropout_rate=0.5, use_bias=False)
    y = np.asarray(out_only.apply(p_nobias, x, deterministic=False, rngs=rngs))
    assert 0.4 < np.mean(y == 0.0) < 0.6  # half the outputs exactly zero


def test_kernel_init_is_applied_per_projection_as_flax_applies_it():
    x = x_input()
    init = nn.initializers.xavier_uniform()
    p = MultiHeadAttention(2, 8, kernel_init=init, out_init=init).init(jax.random.key(0), x)["params"]
    C, H, D = x.shape[-1], 2, 8
    xavier_std = lambda fan_in, fan_out: (2.0 / (fan_in + fan_out)) ** 0.5
    for i in range(3):  # each of q, k, v as a (C, H·D) matrix, as Flax's DenseGeneral draws its kernels
        assert np.std(np.asarray(p["qkv_kernel"][:, i])) == pytest.approx(xavier_std(C, H * D), rel=0.2)
    assert np.std(np.asarray(p["proj_kernel"])) == pytest.approx(xavier_std(H * D, C), rel=0.2)
    assert not np.allclose(np.asarray(p["qkv_kernel"][:, 0]), np.asarray(p["qkv_kernel"][:, 1]))  # three draws


# --- no notion of space without positions -------------------------------------


@pytest.mark.parametrize("kind", ["head", "mha"])
@pytest.mark.parametrize("pos_encoding, invariant", [("none", True), ("rope", False)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_layer_permutation_of_the_past(fake_init, kind, pos_encoding, invariant, qk_norm):
    # Output at the last position t sees the *set* {x_0..x_t}; only positions
    # can tell it the order of x_0..x_{t-1}.
    layer = make_layer(kind, pos_encoding=pos_encoding, qk_norm=qk_norm)
    x = x_input(shape=(1, T, C))
    perm = np.array([3, 0, 6, 1, 5, 2, 4, 7])  # permutes 0..6, keeps t = 7
    # std 1/sqrt(C) gives O(1) q, k and logits: attention neither uniform nor one-hot.
    params = {"params": fake_init(layer, x, std=C**-0.5)}
    y = np.asarray(layer.apply(params, x))[0, -1]
    y_perm = np.asarray(layer.apply(params, x[:, perm]))[0, -1]
    if invariant:
        np.testing.assert_allclose(y_perm, y, rtol=1e-5, atol=1e-5)
    else:
        assert np.max(np.abs(y_perm - y)) > 1e-2 * np.max(np.abs(y))


# --- FeedForward, Block ------------------------------------------------------------


def test_feedforward_is_position_wise(fake_init):
    ff = FeedForward(hidden=4 * C)
    x = x_input()
    p = {"params": fake_init(ff, x, std=0.3)}
    assert p["params"]["fc"]["kernel"].shape == (C, 4 * C)
    full = np.asarray(ff.apply(p, x))
    for t in (0, 5):
        alone = np.asarray(ff.apply(p, x[:, t : t + 1]))[:, 0]
        np.testing.assert_allclose(full[:, t], alone, rtol=1e-5, atol=1e-6)


def test_block_is_identity_when_residual_branches_are_zero(fake_init):
    cfg = ModelConfig(vocab_size=5, block_size=T, n_embd=C, n_head=2, n_layer=1)
    x = x_input()
    p = dict(fake_init(Block(cfg), x, std=0.3))
    zero = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
    p["attn"] = dict(p["attn"], proj_kernel=zero(p["attn"]["proj_kernel"]), proj_bias=zero(p["attn"]["proj_bias"]))
    p["mlp"] = dict(p["mlp"], proj=zero(p["mlp"]["proj"]))
    np.testing.assert_array_equal(np.asarray(Block(cfg).apply({"params": p}, x)), np.asarray(x))


# --- positional encodings ----------------------------------------------------------


def test_sinusoidal_encoding_values():
    T_, C_ = 10, 6
    pos = np.arange(T_)[:, None]
    i = np.arange(0, C_, 2)[None, :]
    angles = pos / 10000.0 ** (i / C_)
    expected = np.zeros((T_, C_))
    expected[:, 0::2], expected[:, 1::2] = np.sin(angles), np.cos(angles)
    np.testing.assert_allclose(np.asarray(sinusoidal_encoding(T_, C_)), expected, rtol=1e-5, atol=1e-6)


def test_rope_preserves_norm_and_depends_on_relative_position():
    q, k = x_input(0, (T, 8)), x_input(1, (T, 8))
    pos = jnp.arange(T)
    rq = apply_rope(q, pos)
    np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(apply_rope(q, jnp.zeros(T, jnp.int32))), np.asarray(q))
    logits = lambda shift: np.asarray(apply_rope(q, pos + shift) @ apply_rope(k, pos + shift).T)
    np.testing.assert_allclose(logits(5), logits(0), rtol=1e-4, atol=1e-4)
    assert not np.allclose(logits(0), np.asarray(q @ k.T), atol=1e-2)


@pytest.mark.parametrize("kind", ["learned", "sinusoidal", "rope", "none"])
def test_add_positions(fake_init, kind):
    x = x_input()
    mod = AddPositions(kind, max_len=16)
    params = fake_init(mod, x)
    out = np.asarray(mod.apply({"params": params}, x))
    if kind == "learned":
        table = np.asarray(params["embedding"])
        assert table.shape == (16, C)
        np.testing.assert_allclose(out, np.asarray(x) + table[:T], rtol=1e-6)
    elif kind == "sinusoidal":
        assert not params
        np.testing.assert_allclose(out, np.asarray(x + sinusoidal_encoding(T, C)), rtol=1e-6)
    else:  # rope acts inside attention; none adds nothing
        assert not params
        np.testing.assert_array_equal(out, np.asarray(x))


def test_head_output_is_dot_product_attention_of_its_projections(fake_init):
    head = Head(head_size=8, scale="mup")
    x = x_input()
    p = fake_init(head, x, std=0.3)
    q, k, v = (x @ p[n]["kernel"] for n in ("query", "key", "value"))
    ref = A.dot_product_attention(q, k, v, scale=1 / 8, mask=A.causal_mask(T))
    np.testing.assert_allclose(np.asarray(head.apply({"params": p}, x)), np.asarray(ref), rtol=1e-5, atol=1e-6)
