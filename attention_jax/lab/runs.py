"""A run loaded from its workdir with its model: for sampling and reports.

The run directory (``attention_jax.lab.rundir``) reads and writes files and
knows no model; this module rebuilds the model a run's config.json describes
and restores its checkpoint into it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from attention_jax.data import CharTokenizer
from attention_jax.lab import population
from attention_jax.lab.config import build_model, end_token_id, from_dict, model_config
from attention_jax.lab.rundir.rundir import CONFIG
from attention_jax.lab.rundir.workdir import RunDir
from attention_jax.lab.steps import TrainState, abstract_train_state, make_optimizer, to_host


@dataclass
class Run:
    """A run loaded from its workdir; ``state`` has a leading member axis (its seeds, or its population)."""

    config: ml_collections.ConfigDict
    model: nn.Module
    tokenizer: CharTokenizer
    state: TrainState
    diverged: list[int | None] = field(default_factory=list)  # per member: the step its loss became NaN/Inf

    @property
    def num_members(self) -> int:
        return int(self.state.step.shape[0])

    def params(self, member: int = 0) -> Any:
        """The parameters of one member (its index in the run: metrics rows' ``member``)."""
        if not 0 <= member < self.num_members:
            raise ValueError(f"member index must be in [0, {self.num_members}), got {member}")
        return jax.tree_util.tree_map(lambda a: a[member], self.state.params)

    def step(self, member: int = 0) -> int:
        return int(self.state.step[member])

    def model_for(self, member: int = 0) -> nn.Module:
        """The model of one member: ``model``, with the member's attention scale where a population sets it."""
        pop = population.members(self.config)
        scales = population.attention_scales(self.config, pop, self.model.model_config.head_dim)
        if scales is None:
            return self.model
        return self.model.clone(model_config=self.model.model_config.replace(attn_scale=float(scales[member])))


def load_run(workdir: str | os.PathLike, which: str = "latest") -> Run:
    """The config, model, tokenizer and state of a run's latest or best checkpoint; reads only.

    Works on a run in progress: it reads the newest finished checkpoint.
    """
    run = RunDir(workdir)
    if not run.has_config():
        raise FileNotFoundError(f"no run in {run.path}: {CONFIG} is missing (train one with experiments.train)")
    config = from_dict(run.read_config())
    tokenizer = run.read_tokenizer()
    end = end_token_id(config.data.get("document_end"), tokenizer)
    model = build_model(config, model_config(config, tokenizer.vocab_size, end))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    block_size, num_members = config.model.block_size, len(population.members(config))
    abstract = abstract_train_state(model, make_optimizer(config), block_size, num_members, sharding)
    restored = None
    if run.has_checkpoint(which):
        checkpoints = run.checkpoints(writable=False)
        try:
            restored = (checkpoints.restore_best if which == "best" else checkpoints.restore_latest)(abstract)
        finally:
            checkpoints.close()
    if restored is None:
        raise FileNotFoundError(f"no {which} checkpoint in {run.path} yet")
    state, _ = restored
    diverged = [int(d) or None for d in to_host(state.diverged_at)]
    return Run(config=config, model=model, tokenizer=tokenizer, state=state, diverged=diverged)
