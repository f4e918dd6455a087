"""attention_jax.MultiHeadDotProductAttention and SelfAttention against flax.linen's, argument by argument:
the same parameters from the same key, the same outputs (and dropout, cache, sown weights) from the same
parameters; a Flax model whose attention class is swapped, and nothing else, computes the same; what is
ours (options, GQA, empty rows) and the refusals."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_jax as aj
from attention_jax.options import AttentionOptions

B, T, S, C = 2, 5, 7, 16


def x(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def pair(**kw):
    return nn.MultiHeadDotProductAttention(**kw), aj.MultiHeadDotProductAttention(**kw)


def assert_trees_equal(a, b, **tol):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    check = np.testing.assert_allclose if tol else np.testing.assert_array_equal
    jax.tree_util.tree_map(lambda u, v: check(np.asarray(u), np.asarray(v), **tol), a, b)


CONSTRUCTORS = {
    "defaults": dict(num_heads=4),
    "qkv and out features": dict(num_heads=2, qkv_features=24, out_features=20),
    "no bias": dict(num_heads=4, use_bias=False),
    "normalize_qk": dict(num_heads=4, normalize_qk=True),
    "inits": dict(num_heads=4, kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(0.5),
                  out_kernel_init=nn.initializers.normal(0.3), out_bias_init=nn.initializers.normal(0.1)),
}  # fmt: skip
CALLS = {
    "self": lambda: dict(inputs_q=x(0, (B, T, C))),
    "inputs_k": lambda: dict(inputs_q=x(0, (B, T, C)), inputs_k=x(1, (B, S, 12))),
    "inputs_k and inputs_v": lambda: dict(
        inputs_q=x(0, (B, T, C)), inputs_k=x(1, (B, S, 12)), inputs_v=x(2, (B, S, 8))
    ),
    "bool mask": lambda: dict(inputs_q=x(0, (B, T, C)), mask=nn.make_causal_mask(jnp.ones((B, T)))),
    "1/0 float mask": lambda: dict(inputs_q=x(0, (B, T, C)),
                                   mask=nn.make_causal_mask(jnp.ones((B, T))).astype(jnp.float32)),
    "batch axes": lambda: dict(inputs_q=x(0, (3, B, T, C))),
}  # fmt: skip


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("ctor", sorted(CONSTRUCTORS))
def test_same_key_gives_flax_parameters_and_the_same_parameters_give_flax_outputs(ctor, call):
    theirs, ours = pair(**CONSTRUCTORS[ctor])
    inputs = CALLS[call]()
    p_theirs = theirs.init(jax.random.key(0), **inputs)
    p_ours = ours.init(jax.random.key(0), **inputs)
    assert_trees_equal(p_ours, p_theirs)  # a Flax checkpoint loads unchanged, and init is Flax's
    np.testing.assert_allclose(
        np.asarray(ours.apply(p_theirs, **inputs)), np.asarray(theirs.apply(p_theirs, **inputs)), rtol=1e-5, atol=1e-6
    )


def test_deprecated_inputs_kv_is_read_as_flax_reads_it():
    theirs, ours = pair(num_heads=4)
    q, kv = x(0, (B, T, C)), x(1, (B, S, C))
    p = theirs.init(jax.random.key(0), q, kv)
    with pytest.warns(DeprecationWarning, match="inputs_kv"):
        got = ours.apply(p, q, inputs_kv=kv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        np.testing.assert_allclose(np.asarray(got), np.asarray(theirs.apply(p, q, inputs_kv=kv)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("broadcast", [True, False])
def test_dropout_is_on_the_weights_only_and_draws_flax_masks(broadcast):
    theirs, ours = pair(num_heads=4, dropout_rate=0.4, broadcast_dropout=broadcast)
    q = x(0, (B, T, C))
    p = theirs.init(jax.random.key(0), q, deterministic=True)
    rngs = {"dropout": jax.random.key(7)}
    want = theirs.apply(p, q, deterministic=False, rngs=rngs)
    np.testing.assert_allclose(np.asarray(ours.apply(p, q, deterministic=False, rngs=rngs)), np.asarray(want),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    key = jax.random.key(8)  # an explicit dropout_rng, as Flax takes it
    np.testing.assert_allclose(
        np.asarray(ours.apply(p, q, deterministic=False, dropout_rng=key)),
        np.asarray(theirs.apply(p, q, deterministic=False, dropout_rng=key)), rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    assert not np.allclose(np.asarray(want), np.asarray(theirs.apply(p, q, deterministic=True)))  # it dropped
    for module in (theirs, ours):  # deterministic is required with dropout, and given once, as in Flax
        with pytest.raises(ValueError, match='Parameter "deterministic" must be passed'):
            module.apply(p, q)
        with pytest.raises(ValueError, match='Parameter "deterministic" was passed to the constructor and at call'):
            module.clone(deterministic=True).apply(p, q, deterministic=True)


def test_decoding_one_token_at_a_time_keeps_flax_cache_and_outputs():
    theirs, ours = pair(num_heads=4, decode=True)
    seq = x(0, (B, T, C))
    p = theirs.init(jax.random.key(0), seq)
    cache_t = theirs.init(jax.random.key(0), seq)["cache"]
    cache_o = ours.init(jax.random.key(0), seq)["cache"]
    assert_trees_equal(cache_o, cache_t)  # Flax's collection: (B, S, H, D) and the index
    for t in range(T):
        step = seq[:, t : t + 1]
        y_t, mut_t = theirs.apply({"params": p["params"], "cache": cache_t}, step, mutable=["cache"])
        y_o, mut_o = ours.apply({"params": p["params"], "cache": cache_o}, step, mutable=["cache"])
        np.testing.assert_allclose(np.asarray(y_o), np.asarray(y_t), rtol=1e-5, atol=1e-6)
        cache_t, cache_o = mut_t["cache"], mut_o["cache"]
        assert_trees_equal(cache_o, cache_t, rtol=1e-6, atol=1e-7)


def test_sown_weights_and_a_custom_attention_fn_and_precision_are_flax_s():
    q = x(0, (B, T, C))
    theirs, ours = pair(num_heads=4)
    p = theirs.init(jax.random.key(0), q)
    _, st = theirs.apply(p, q, sow_weights=True, mutable=["intermediates"])
    _, so = ours.apply(p, q, sow_weights=True, mutable=["intermediates"])
    assert_trees_equal(so, st, rtol=1e-5, atol=1e-7)
    assert ours.apply(p, q, mutable=["intermediates"])[1] == {}  # without sow_weights nothing is sown

    def doubled(query, key, value, **kw):  # a user's attention function, honored
        return 2 * nn.dot_product_attention(query, key, value, **kw)

    for kw in (dict(attention_fn=doubled), dict(precision=jax.lax.Precision.HIGHEST)):
        theirs, ours = pair(num_heads=4, **kw)
        np.testing.assert_allclose(np.asarray(ours.apply(p, q)), np.asarray(theirs.apply(p, q)), rtol=1e-5,
                                   atol=1e-6)  # fmt: skip


def test_a_row_with_no_key_is_zero_here_and_flax_s_uniform_average_on_request():
    theirs, ours = pair(num_heads=4, use_bias=False)
    q = x(0, (B, T, C))
    p = theirs.init(jax.random.key(0), q)
    mask = np.ones((B, 1, T, T), bool)
    mask[0, :, 2] = False  # row 2 of batch 0 sees no key
    want = np.asarray(theirs.apply(p, q, mask=mask))
    got = np.asarray(ours.apply(p, q, mask=mask))
    np.testing.assert_array_equal(got[0, 2], 0.0)  # ours: nothing to attend to, nothing out (no bias here)
    assert np.all(np.abs(want[0, 2]) > 0)  # Flax: the average of every value
    np.testing.assert_allclose(np.delete(got, 2, axis=1), np.delete(want, 2, axis=1), rtol=1e-5, atol=1e-6)
    uniform = ours.clone(empty_rows="uniform").apply(p, q, mask=mask)
    np.testing.assert_allclose(np.asarray(uniform), want, rtol=1e-5, atol=1e-6)


def test_self_attention_is_flax_s():
    q, mask = x(0, (B, T, C)), nn.make_causal_mask(jnp.ones((B, T)))
    theirs, ours = nn.SelfAttention(num_heads=4), aj.SelfAttention(num_heads=4)
    p = theirs.init(jax.random.key(0), q, mask)
    assert_trees_equal(ours.init(jax.random.key(0), q, mask), p)
    np.testing.assert_allclose(np.asarray(ours.apply(p, q, mask)), np.asarray(theirs.apply(p, q, mask)), rtol=1e-5,
                               atol=1e-6)  # fmt: skip


class EncoderDecoderBlock(nn.Module):
    """A Flax model of the wmt example's shape (an encoder layer, then a decoder layer with self- and
    cross-attention), written against Flax's attention; ``attention`` is the only thing swapped."""

    attention: type
    train: bool = False

    @nn.compact
    def __call__(self, source, target):
        layer = lambda **kw: self.attention(num_heads=4, dropout_rate=0.2, deterministic=not self.train, **kw)
        enc = source + layer()(nn.LayerNorm()(source))
        h = target + layer()(nn.LayerNorm()(target), mask=nn.make_causal_mask(jnp.ones(target.shape[:2])))
        cross = layer(qkv_features=32)
        return h + cross(nn.LayerNorm()(h), enc)


@pytest.mark.parametrize("train", [False, True])
def test_swapping_the_class_in_a_flax_model_changes_nothing(train):
    source, target = x(0, (B, S, C)), x(1, (B, T, C))
    theirs = EncoderDecoderBlock(nn.MultiHeadDotProductAttention, train=train)
    ours = EncoderDecoderBlock(aj.MultiHeadDotProductAttention, train=train)
    p = theirs.init(jax.random.key(0), source, target)
    assert_trees_equal(ours.init(jax.random.key(0), source, target), p)
    rngs = {"dropout": jax.random.key(3)}
    np.testing.assert_allclose(
        np.asarray(ours.apply(p, source, target, rngs=rngs)), np.asarray(theirs.apply(p, source, target, rngs=rngs)),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_ours_options_and_grouped_kv_heads():
    q = x(0, (B, T, C))
    theirs = nn.MultiHeadDotProductAttention(num_heads=4)
    p = theirs.init(jax.random.key(0), q)
    causal = aj.MultiHeadDotProductAttention(num_heads=4, options=AttentionOptions(causal=True))
    want = theirs.apply(p, q, mask=nn.make_causal_mask(jnp.ones((B, T))))
    np.testing.assert_allclose(np.asarray(causal.apply(p, q)), np.asarray(want), rtol=1e-5, atol=1e-6)
    grouped = aj.MultiHeadDotProductAttention(num_heads=4, num_kv_heads=2)
    pg = grouped.init(jax.random.key(1), q)["params"]
    assert pg["key"]["kernel"].shape == (C, 2, 4) and pg["query"]["kernel"].shape == (C, 4, 4)
    repeated = {  # Flax's layer with each kv head repeated for its two query heads computes the same
        name: {k: jnp.repeat(v, 2, axis=1 if k == "kernel" else 0) for k, v in pg[name].items()}
        if name in ("key", "value") else pg[name]
        for name in pg
    }  # fmt: skip
    np.testing.assert_allclose(
        np.asarray(grouped.apply({"params": pg}, q)), np.asarray(theirs.apply({"params": repeated}, q)),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_what_cannot_work_is_one_line_naming_the_argument():
    q = x(0, (B, T, C))
    cases = [
        (dict(num_heads=3), {}, r"^MultiHeadDotProductAttention\.qkv_features=16 is not divisible by num_heads=3"),
        (dict(num_heads=4, num_kv_heads=3), {}, r"^MultiHeadDotProductAttention\.num_kv_heads=3 must divide"),
        (dict(num_heads=4), dict(inputs_v=q), r"inputs_v needs inputs_k"),
        (dict(num_heads=4), dict(inputs_k=q, inputs_kv=q), r"give inputs_kv alone"),
        (dict(num_heads=4, precision="highest", options=AttentionOptions(causal=True)), {}, r"Flax's own attention"),
        (dict(num_heads=4, options=AttentionOptions(causal=False, pos_encoding="rope")), dict(inputs_k=q),
         r"rope relates positions in one sequence"),
        (dict(num_heads=4, dropout_rate=0.1, options=AttentionOptions(causal=False, attention_impl="xla")),
         dict(deterministic=False), r"dropout on the attention weights needs options\.attention_impl='dense'"),
        (dict(num_heads=4, empty_rows="flax"), {}, r"empty_rows: unknown 'flax'"),
    ]  # fmt: skip
    for ctor, call, why in cases:
        module = aj.MultiHeadDotProductAttention(**ctor)
        with pytest.raises(ValueError, match=why):
            module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, q, **call)


# --- NNX: attention_jax.nnx.MultiHeadAttention against flax.nnx.MultiHeadAttention ---------------------------


def nnx_pair(*args, seed=0, **kw):
    from flax import nnx

    from attention_jax import nnx as ajx

    kw = {"decode": False, **kw}  # Flax NNX needs decode given, at the call or as an attribute
    return nnx.MultiHeadAttention(*args, **kw, rngs=nnx.Rngs(seed)), ajx.MultiHeadAttention(
        *args, **kw, rngs=nnx.Rngs(seed)
    )


def nnx_params(module):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


NNX_CONSTRUCTORS = {  # positional, as Flax's order: num_heads, in_features, qkv_features, out_features, num_kv_heads
    "defaults": ((4, C), {}),
    "features": ((2, C, 24, 20), {}),
    "grouped, of another width": ((4, C, None, None, 2, 12), {}),
    "normalize_qk, no bias": ((4, C), dict(normalize_qk=True, use_bias=False)),
    "dropout": ((4, C), dict(dropout_rate=0.3, broadcast_dropout=False)),
}


@pytest.mark.parametrize("name", sorted(NNX_CONSTRUCTORS))
def test_nnx_same_rngs_give_flax_parameters_and_outputs(name):
    args, kw = NNX_CONSTRUCTORS[name]
    theirs, ours = nnx_pair(*args, **kw)
    assert_trees_equal(nnx_params(ours), nnx_params(theirs))
    q = x(0, (B, T, C))
    k = x(1, (B, S, args[5] if len(args) > 5 else C))
    mask = np.random.default_rng(2).random((B, 1, T, S)) > 0.3
    mask[..., 0] = True  # every row sees a key (the one documented difference is tested on its own)
    for det in (True, False) if kw.get("dropout_rate") else (True,):
        want = theirs(q, k, mask=mask, deterministic=det)
        got = ours(q, k, mask=mask, deterministic=det)  # the forked dropout streams advance alike
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_nnx_decoding_keeps_flax_cache_and_outputs():
    theirs, ours = nnx_pair(4, C, decode=True)
    seq = x(0, (B, T, C))
    for module in (theirs, ours):
        module.init_cache(seq.shape)
    assert theirs.cached_key[...].shape == ours.cached_key[...].shape == (B, T, 4, 4)
    for t in range(T):
        np.testing.assert_allclose(np.asarray(ours(seq[:, t : t + 1])), np.asarray(theirs(seq[:, t : t + 1])),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        np.testing.assert_allclose(np.asarray(ours.cached_key[...]), np.asarray(theirs.cached_key[...]), atol=1e-7)
    assert int(ours.cache_index[...]) == int(theirs.cache_index[...]) == T


def test_nnx_refuses_our_fused_layer_s_arguments_and_flax_s_impossible_ones():
    from flax import nnx

    from attention_jax import nnx as ajx

    with pytest.raises(TypeError, match=r"not 'head_size': the fused twin of layers\.MultiHeadAttention is Fused"):
        ajx.MultiHeadAttention(4, C, head_size=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^MultiHeadAttention\.qkv_features=16 is not divisible by num_heads=3"):
        ajx.MultiHeadAttention(3, C, rngs=nnx.Rngs(0))
    layer = ajx.MultiHeadAttention(4, C, dropout_rate=0.1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"give decode, at the call or as an attribute"):
        layer(x(0, (B, T, C)))
    with pytest.raises(ValueError, match=r"dropout_rate > 0 needs deterministic"):
        layer(x(0, (B, T, C)), decode=False)


@pytest.mark.parametrize("kw", [dict(), dict(num_kv_heads=2), dict(use_bias=False)], ids=["mha", "gqa", "no bias"])
def test_flax_parameters_convert_to_our_native_layer_and_back(kw):
    from attention_jax import convert, layers

    q, memory = x(0, (B, T, C)), x(1, (B, S, 12))
    flax_style = aj.MultiHeadDotProductAttention(num_heads=4, **kw)
    for inputs in ((q,), (q, memory)):
        p = flax_style.init(jax.random.key(0), *inputs)["params"]
        native = convert.from_flax_mha(p)
        layer = layers.MultiHeadAttention(
            4,
            C // 4,
            causal=False,
            num_kv_heads=kw.get("num_kv_heads"),
            use_qkv_bias=kw.get("use_bias", True),
            use_bias=kw.get("use_bias", True),
        )
        assert ("qkv_kernel" in native) == (len(inputs) == 1 and "num_kv_heads" not in kw)  # fused when it can be
        np.testing.assert_allclose(
            np.asarray(layer.apply({"params": native}, *inputs)), np.asarray(flax_style.apply({"params": p}, *inputs)),
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip
        assert_trees_equal(convert.to_flax_mha(native), p)
    with pytest.raises(ValueError, match=r"^from_flax_mha: normalize_qk's query_ln/key_ln have no twin"):
        convert.from_flax_mha(aj.MultiHeadDotProductAttention(num_heads=4, normalize_qk=True).init(
            jax.random.key(0), q)["params"])  # fmt: skip
    with pytest.raises(ValueError, match=r"^to_flax_mha: Flax's use_bias covers q, k, v and the output together"):
        convert.to_flax_mha(layers.MultiHeadAttention(4, 4).init(jax.random.key(0), q)["params"])


def test_a_custom_attention_fn_gets_the_callers_mask_as_given():
    """A mask of numbers reaches a user's attention_fn unchanged, as in Flax (read as booleans only on our path)."""
    q = x(0, (B, T, C))
    soft = jax.random.uniform(jax.random.key(1), (B, 1, T, T), minval=0.1, maxval=1.0)

    def weighted(query, key, value, mask=None, **kw):
        return nn.dot_product_attention(query, key, value, bias=jnp.log(mask), **kw)

    theirs, ours = pair(num_heads=4, attention_fn=weighted)
    p = theirs.init(jax.random.key(0), q, mask=soft)
    np.testing.assert_allclose(np.asarray(ours.apply(p, q, mask=soft)), np.asarray(theirs.apply(p, q, mask=soft)),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
