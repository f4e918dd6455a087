"""Load a trained run from its workdir and sample text from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention_jax import checkpoint as ckpt
from attention_jax.config_utils import from_dict
from attention_jax.data import CharTokenizer
from attention_jax.generate import generate
from attention_jax.train import abstract_train_state, build_model, make_optimizer, model_config


@dataclass
class Run:
    model: nn.Module
    params: Any
    tokenizer: CharTokenizer
    step: int


def load_state(workdir: str | Path, which: str = "latest"):
    """(config, model, tokenizer, state with a leading seed axis) of a run's latest or best checkpoint."""
    workdir = Path(workdir)
    if not (workdir / "config.json").is_file():
        raise FileNotFoundError(f"no run in {workdir}: config.json is missing (train one with experiments.train)")
    config = from_dict(json.loads((workdir / "config.json").read_text()))
    tokenizer = CharTokenizer.load(workdir / "tokenizer.json")
    mcfg = model_config(config, tokenizer.vocab_size)
    model = build_model(config, mcfg)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = abstract_train_state(model, make_optimizer(config), mcfg.block_size, config.num_seeds, sharding)
    checkpoints = ckpt.Checkpoints(workdir)
    try:
        restored = (checkpoints.restore_best if which == "best" else checkpoints.restore_latest)(abstract)
    finally:
        checkpoints.close()
    if restored is None:
        raise FileNotFoundError(f"no {which} checkpoint in {workdir} yet")
    return config, model, tokenizer, restored[0]


def load_run(workdir: str | Path, which: str = "latest", seed_index: int = 0) -> Run:
    """The model, params (of one seed) and tokenizer of a run's latest or best checkpoint."""
    config, model, tokenizer, state = load_state(workdir, which)
    if not 0 <= seed_index < config.num_seeds:
        raise ValueError(f"--model_seed must be in [0, {config.num_seeds}), got {seed_index}")
    params = jax.tree_util.tree_map(lambda a: a[seed_index], state.params)
    return Run(model=model, params=params, tokenizer=tokenizer, step=int(state.step[seed_index]))


def sample_text(
    run: Run, prompt: str, *, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed: int = 0
) -> str:
    """The prompt followed by ``max_new_tokens`` sampled characters."""
    if not prompt:
        raise ValueError("--prompt must not be empty")
    tokens = jnp.asarray(run.tokenizer.encode(prompt))[None]
    out = generate(run.model, run.params, tokens, max_new_tokens, jax.random.key(seed), temperature, top_k)
    return run.tokenizer.decode(out[0])
