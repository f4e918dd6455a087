"""What one experiment config builds: data, model, optimizer, device mesh and seed keys.

An ``Experiment`` holds those pieces and nothing else. The steps are the pure
functions of :mod:`attention_jax.lab.steps`; the functions below bind them to
an experiment's pieces and jit them, for the loop, the benchmarks and anyone
who wants a compiled step without the loop.

Devices: the batch axis is sharded over a 1-D ``data`` mesh of all devices and
parameters are replicated; XLA inserts the gradient all-reduce. The same code
runs on 1 CPU, simulated CPU devices, or a TPU slice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attention_jax import data as data_lib
from attention_jax.lab import steps
from attention_jax.lab.config import ConfigError, build_model, model_config, validate
from attention_jax.model import ModelConfig

Array = jax.Array


@dataclass
class Experiment:
    config: ml_collections.ConfigDict
    tokenizer: data_lib.CharTokenizer
    model_config: ModelConfig
    model: nn.Module
    tx: optax.GradientTransformation
    mesh: Mesh
    train_data: Array  # (N_train,) int32 token ids, replicated
    val_data: Array  # (N_val,)
    seed_keys: Array  # (num_seeds,) typed PRNG keys

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, text: str | None = None) -> Experiment:
        """Validate ``config``, read and tokenize its text (or ``text``), build model, optimizer and mesh."""
        validate(config, jax.device_count())
        if text is None:
            text = load_dataset(config.data.dataset)
        tokenizer, train, val = data_lib.prepare(text, config.data.train_fraction)
        mcfg = model_config(config, tokenizer.vocab_size)
        T = mcfg.block_size
        for name, split in (("training", train), ("validation", val)):
            if split.shape[0] <= T + 1:
                raise ConfigError(
                    f"model.block_size={T} is too long for the {name} split ({split.shape[0]} tokens); "
                    "use a shorter block_size or a longer text"
                )
        mesh = Mesh(np.array(jax.devices()), ("data",))
        replicated = NamedSharding(mesh, P())
        return cls(
            config=config,
            tokenizer=tokenizer,
            model_config=mcfg,
            model=build_model(config, mcfg),
            tx=steps.make_optimizer(config),
            mesh=mesh,
            train_data=jax.device_put(train, replicated),
            val_data=jax.device_put(val, replicated),
            seed_keys=jnp.stack([jax.random.key(s) for s in seeds(config)]),
        )

    @property
    def num_seeds(self) -> int:
        return self.config.num_seeds

    @property
    def seeds(self) -> list[int]:
        return seeds(self.config)

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step consumes, over all seeds."""
        return self.num_seeds * self.config.batch_size * self.model_config.block_size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    def flops_per_step(self) -> float:
        """Model FLOPs of one optimizer step (forward + backward), all seeds."""
        return self.model.flops_per_token() * self.tokens_per_step


def load_dataset(dataset: str) -> str:
    """The text of ``data.dataset`` (a path or a named dataset); errors name the key to set."""
    try:
        return data_lib.load_text(dataset)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.dataset={dataset!r}: {e}") from None


def seeds(config: ml_collections.ConfigDict) -> list[int]:
    """The seeds a config trains: seed, seed + 1, ..., seed + num_seeds - 1."""
    return [config.seed + i for i in range(config.num_seeds)]


# ---------------------------------------------------------------------------
# The steps bound to an experiment, jitted
# ---------------------------------------------------------------------------


def init_state(exp: Experiment) -> steps.TrainState:
    """Fresh state of every seed, with a leading seed axis."""
    init = functools.partial(steps.init_train_state, exp.model, exp.tx, exp.model_config.block_size)
    return jax.jit(steps.over_seeds(init, (0,), exp.num_seeds), out_shardings=exp.replicated)(exp.seed_keys)


def abstract_state(exp: Experiment) -> steps.TrainState:
    """Shapes, dtypes and shardings of the state, for restoring checkpoints."""
    return steps.abstract_train_state(
        exp.model, exp.tx, exp.model_config.block_size, exp.num_seeds, exp.replicated
    )  # fmt: skip


def train_program(exp: Experiment, steps_per_call: int) -> Callable[[steps.TrainState], tuple[steps.TrainState, dict]]:
    """A jitted function doing ``steps_per_call`` optimizer steps of every seed.

    Returns the new state and the per-step metrics stacked as (steps_per_call, num_seeds).
    """
    one_seed = functools.partial(
        steps.train_step,
        model=exp.model,
        tx=exp.tx,
        data=exp.train_data,
        batch_size=exp.config.batch_size,
        block_size=exp.model_config.block_size,
        batch_sharding=exp.batch_sharding,
    )
    all_seeds = steps.over_seeds(one_seed, (0, 0), exp.num_seeds)
    seed_keys = exp.seed_keys
    many = steps.repeat(lambda state: all_seeds(state, seed_keys), steps_per_call)
    return jax.jit(many, out_shardings=exp.replicated, donate_argnums=0)


def eval_program(exp: Experiment) -> Callable[[Any], dict[str, Array]]:
    """A jitted function: params -> {"train": (num_seeds,), "val": (num_seeds,)} mean losses on fixed batches."""
    one_seed = functools.partial(
        steps.eval_loss,
        model=exp.model,
        batch_size=exp.config.batch_size,
        block_size=exp.model_config.block_size,
        eval_iters=exp.config.eval_iters,
        batch_sharding=exp.batch_sharding,
    )
    all_seeds = steps.over_seeds(one_seed, (0, 0, None), exp.num_seeds)

    def evaluate(params):
        return {
            "train": all_seeds(params, exp.seed_keys, exp.train_data),
            "val": all_seeds(params, exp.seed_keys, exp.val_data),
        }

    return jax.jit(evaluate)


def full_split_loss(exp: Experiment, params: Any, data: Array) -> Array:
    """Loss over the whole split ``data`` of every seed's params -> (num_seeds,); see ``steps.full_split_loss``."""
    one_seed = functools.partial(
        steps.full_split_loss, model=exp.model, batch_size=exp.config.batch_size, block_size=exp.model_config.block_size
    )
    return jax.jit(steps.over_seeds(one_seed, (0, None), exp.num_seeds))(params, data)
