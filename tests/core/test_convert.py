"""GPT-2 checkpoints: ``convert.from_hf_gpt2`` and ``to_hf_gpt2`` against transformers' ``GPT2LMHeadModel``,
randomly initialised from a config (no downloads), every weight and bias random and non-zero: logits equal
to 1e-5 in float32, greedy decoding gives the same tokens, both directions and both file forms round-trip,
and a checkpoint that does not fit is one line naming the key."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attention_jax import convert  # noqa: E402
from attention_jax.generate import generate  # noqa: E402
from attention_jax.model import ModelConfig, TransformerLM  # noqa: E402

V, T = 50, 16
CONFIGS = {  # GPT2Config keywords of each checkpoint
    "gpt2": dict(),
    "exact-gelu, n_inner, eps, by-layer scale, untied": dict(
        activation_function="gelu",
        n_inner=48,
        layer_norm_epsilon=1e-6,
        scale_attn_by_inverse_layer_idx=True,
        tie_word_embeddings=False,
    ),
    "unscaled": dict(scale_attn_weights=False, n_layer=1),
}


def hf_model(seed=0, **fields):
    sizes = dict(vocab_size=V, n_positions=T, n_embd=32, n_head=4, n_layer=2, bos_token_id=0, eos_token_id=0)
    config = transformers.GPT2Config(**{**sizes, **fields})
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-zero biases, LayerNorm gains away from 1
            gain = 1.0 if "ln" in name and "weight" in name else 0.0
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + gain)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def tokens(seed=1, shape=(2, T)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gpt2_logits_equal_transformers_to_1e_5(name):
    hf = hf_model(**CONFIGS[name])
    cfg, params = convert.from_hf_gpt2(hf.state_dict(), hf.config)
    x = tokens()
    ours = np.asarray(TransformerLM(cfg).apply({"params": params}, x))
    want = hf_logits(hf, x)
    assert np.std(want) > 1.0  # logits of a random model, not near zero
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)


def test_gpt2_greedy_decoding_gives_transformers_tokens():
    hf = hf_model(seed=3)
    cfg, params = convert.from_hf_gpt2(hf.state_dict(), hf.config)
    prompt = tokens(2, (2, 4))
    with torch.no_grad():
        want = hf.generate(
            torch.as_tensor(np.asarray(prompt), dtype=torch.long), max_new_tokens=10, do_sample=False,
            attention_mask=torch.ones(prompt.shape, dtype=torch.long), pad_token_id=0,
        ).numpy()  # fmt: skip
    ours = generate(TransformerLM(cfg), params, prompt, 10, jax.random.key(0), top_k=1)  # top-1: greedy, cached
    np.testing.assert_array_equal(np.asarray(ours), want)


def test_gpt2_round_trips_through_to_hf_gpt2_and_both_file_forms(tmp_path):
    hf = hf_model(seed=4, **CONFIGS["exact-gelu, n_inner, eps, by-layer scale, untied"])
    cfg, params = convert.from_hf_gpt2(hf.state_dict(), hf.config)
    config, sd = convert.to_hf_gpt2(cfg, params)
    back = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    back.load_state_dict({name: torch.from_numpy(a.copy()) for name, a in sd.items()}, strict=False)
    x = tokens(5)
    np.testing.assert_array_equal(hf_logits(back, x), hf_logits(hf, x))  # the very same weights
    hf.save_pretrained(tmp_path / "hf")  # transformers' own files: config.json + model.safetensors
    cfg2, params2 = convert.from_hf_gpt2(tmp_path / "hf")
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    convert.save_hf_gpt2(tmp_path / "ours", cfg, params)  # ours, read back by transformers and by us
    reread = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_array_equal(hf_logits(reread, x), hf_logits(hf, x))
    assert convert.from_hf_gpt2(tmp_path / "ours" / "model.safetensors")[0] == cfg


def test_a_model_of_ours_without_biases_goes_to_gpt2_with_zero_biases(fake_init):
    cfg = ModelConfig(vocab_size=V, block_size=T, n_embd=32, n_head=4, n_layer=2, bias=False, tie_embeddings=True)
    params = fake_init(TransformerLM(cfg), tokens(), std=0.3)
    config, sd = convert.to_hf_gpt2(cfg, params)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    hf.load_state_dict({name: torch.from_numpy(a.copy()) for name, a in sd.items()})
    x = tokens(6)
    ours = np.asarray(TransformerLM(cfg).apply({"params": params}, x))
    np.testing.assert_allclose(hf_logits(hf, x), ours, rtol=1e-5, atol=1e-5)


def test_checkpoints_and_configs_that_do_not_fit_are_one_line_naming_the_key(tmp_path):
    hf = hf_model()
    sd = dict(hf.state_dict())
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"^the state dict does not fit .*missing transformer\.h\.1\.mlp\.c_fc\.bias$"):
        convert.from_hf_gpt2(sd, hf.config)
    sd = dict(hf.state_dict(), **{"transformer.h.2.ln_1.weight": torch.ones(32)})
    with pytest.raises(ValueError, match=r"unexpected transformer\.h\.2\.ln_1\.weight"):
        convert.from_hf_gpt2(sd, hf.config)
    shape = r"^transformer\.wte\.weight has shape \(50, 32\), the config says \(50, 16\)$"
    with pytest.raises(ValueError, match=shape):
        convert.from_hf_gpt2(hf.state_dict(), dict(hf.config.to_dict(), n_embd=16, n_head=2))
    for change, why in [
        (dict(model_type="llama"), r"^config model_type='llama': from_hf_gpt2 reads GPT-2"),
        (dict(activation_function="quick_gelu"), r"^config activation_function='quick_gelu': valid choices"),
        (dict(n_head=5), r"^config: ModelConfig\.head_size: n_embd=32 is not divisible by n_head=5"),
    ]:
        with pytest.raises(ValueError, match=why):
            convert.from_hf_gpt2(hf.state_dict(), dict(hf.config.to_dict(), **change))
    with pytest.raises(ValueError, match=r"^config: a state dict needs its GPT-2 config"):
        convert.from_hf_gpt2(hf.state_dict())
    with pytest.raises(ValueError, match=r"^no GPT-2 checkpoint at"):
        convert.from_hf_gpt2(tmp_path / "nothing")
    cfg = ModelConfig(vocab_size=V, block_size=T, n_embd=32, n_head=4, n_layer=1)
    for change in (dict(n_kv_head=2), dict(pos_encoding="rope"), dict(qk_norm="rms"), dict(attn_scale="mup")):
        with pytest.raises(ValueError, match=r"^to_hf_gpt2: GPT-2 "):
            convert.to_hf_gpt2(cfg.replace(**change), {})
