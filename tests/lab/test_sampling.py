"""Sampling from a run: the same tokens as calling generate on the restored parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attention_jax.generate import generate
from attention_jax.lab.loop import train
from attention_jax.lab.rundir import load_run
from attention_jax.lab.sampling import sample_text


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config, small_text):
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(max_iters=6, checkpoint_every=6, eval_interval=6, num_seeds=2)
    train(config, workdir, text=small_text(3000), progress=False)
    return load_run(workdir)


def test_sample_text_is_the_prompt_continued_by_generate(run):
    text = sample_text(run, "the king", max_new_tokens=12, temperature=0.8, top_k=5, seed=3, member=1)
    tokens = jnp.asarray(run.tokenizer.encode("the king"))[None]
    want = generate(run.model, run.params(1), tokens, 12, jax.random.key(3), 0.8, 5)
    assert text == run.tokenizer.decode(want[0]) and text.startswith("the king") and len(text) == 8 + 12
    other_seed = sample_text(run, "the king", max_new_tokens=12, temperature=0.8, top_k=5, seed=3, member=0)
    assert other_seed != text  # a different model of the run


def test_greedy_sampling_is_deterministic_and_bad_prompts_are_refused(run):
    a = sample_text(run, "the", max_new_tokens=10, temperature=0.0, seed=0)
    b = sample_text(run, "the", max_new_tokens=10, temperature=0.0, seed=99)
    assert a == b  # temperature 0 ignores the key
    with pytest.raises(ValueError, match="--prompt must not be empty"):
        sample_text(run, "", max_new_tokens=1)
    with pytest.raises(ValueError, match="character 'Z' is not in the tokenizer"):
        sample_text(run, "Zebra", max_new_tokens=1)


def test_sampling_decodes_with_the_kv_cache(run, monkeypatch):
    """experiments.sample decodes with the cache (generate's default path; calls are recorded, not
    traced, so a program compiled by another test cannot hide them), and within the block the text
    is the full-window path's, token for token."""
    from attention_jax.lab import sampling

    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs.get("use_cache", True))
        return generate(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate", recording)
    text = sample_text(run, "the", max_new_tokens=5, temperature=0.0)  # 3 + 5 <= block_size 8
    assert calls == [True]
    tokens = jnp.asarray(run.tokenizer.encode("the"))[None]
    full = generate(run.model, run.params(0), tokens, 5, jax.random.key(0), 0.0, use_cache=False)
    assert text == run.tokenizer.decode(full[0])
