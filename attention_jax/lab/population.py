"""Populations: many models trained by one compiled program, each member with values of its own.

A config's ``population`` is a tuple of dicts, one per entry, each mapping
config keys to that entry's values; build it with the sweep helpers
(``product``, ``zip_``, ``sweep`` of :mod:`attention_jax.lab.sweep`), so a
population reads like a sweep::

    c.population = tuple(product(sweep("learning_rate", [1e-3, 3e-3]), sweep("seed", [0, 100])))

Every entry trains ``num_seeds`` members (seeds ``seed``, ``seed + 1``, ...,
where ``seed`` is the entry's own or the config's), so an empty population
is the plain run of ``num_seeds`` seeds. Members get their own optimizer
state, data order, dropout keys, metrics rows, best checkpoint and summary
entry; the batch, the model's shapes and the loop are shared.

Only values that leave every array shape and the loop unchanged can differ
between members (``MEMBER_KEYS``): they enter the compiled program as arrays
with a leading member axis. A value that changes shapes (``model.head_size``,
``batch_size``, ...) needs a program of its own and is refused with an error
that names it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ml_collections
import numpy as np

from attention_jax.attention import resolve_scale
from attention_jax.lab.config import ConfigError, apply_overrides, flat_keys, get, unknown_key_message, validate
from attention_jax.lab.steps import HPARAM_KEYS

# Config keys a member may set: the seed, the runtime scalars of the optimizer and its schedule, and
# the attention scale (a rule or a number: with the head size fixed, every rule is a number).
MEMBER_KEYS = ("seed", *HPARAM_KEYS, "model.attn_scale")
_LOOP_KEYS = (
    "num_seeds", "max_iters", "eval_interval", "eval_iters", "log_interval", "checkpoint_every", "steps_per_call",
    "sample_tokens", "grad_clip", "distributed", "population",
)  # fmt: skip


@dataclass(frozen=True)
class Member:
    """One model of a population: its seed and the entry's values (dotted config keys -> values)."""

    index: int
    seed: int
    values: dict[str, Any]

    def label(self) -> str:
        """``learning_rate=0.003,seed=1337``: the member's values by their leaf names, then its seed."""
        items = {**self.values, "seed": self.seed}.items()
        return ",".join(f"{key.rsplit('.', 1)[-1]}={value:g}" if isinstance(value, float) else
                        f"{key.rsplit('.', 1)[-1]}={value}" for key, value in items)  # fmt: skip


def entries(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The population's entries ([{}] for a plain run), each checked: a list of dicts of member keys."""
    population = config.get("population", ())
    if isinstance(population, dict) or not isinstance(population, (list, tuple)):
        raise ConfigError(f"population must be a list of dicts (one per entry), got {type(population).__name__}")
    if not population:
        return [{}]
    valid = flat_keys(config)
    for i, entry in enumerate(population):
        if not isinstance(entry, dict):
            raise ConfigError(f"population[{i}] must be a dict of config keys to values, got {entry!r}")
        for key in entry:
            _check_member_key(key, valid)
    return [dict(entry) for entry in population]


def _check_member_key(key: str, valid: list[str]) -> None:
    if key in MEMBER_KEYS:
        return
    if key not in valid:
        raise ConfigError("population: " + unknown_key_message(key, valid))
    if key.startswith("model.") or key in ("batch_size", "data.dataset", "data.train_fraction"):
        # model.dropout too: Flax's Dropout takes its rate as a Python number (it branches on it).
        raise ConfigError(
            f"population: '{key}' is part of the compiled program (shapes, structure, data or a static value); "
            f"members of one population share it (vary it across sweep points instead). Members may vary: "
            f"{', '.join(MEMBER_KEYS)}"
        )
    why = "it sets the loop" if key in _LOOP_KEYS else "it is not a per-member value"
    raise ConfigError(
        f"population: '{key}' is the same for every member ({why}); members may vary: {', '.join(MEMBER_KEYS)}"
    )


def members(config: ml_collections.ConfigDict) -> list[Member]:
    """Every member of the population: each entry times ``num_seeds`` seeds, in entry order."""
    out = []
    for entry in entries(config):
        first = int(entry.get("seed", config.seed))
        values = {k: v for k, v in entry.items() if k != "seed"}
        for i in range(config.num_seeds):
            out.append(Member(len(out), first + i, values))
    return out


def member_config(config: ml_collections.ConfigDict, member: Member) -> ml_collections.ConfigDict:
    """The plain one-model config of ``member``: the config with its values and seed, no population."""
    c = config.copy_and_resolve_references()
    c.lock()
    apply_overrides(c, {**member.values, "seed": member.seed, "num_seeds": 1, "population": ()})
    return c


def check(config: ml_collections.ConfigDict, device_count: int = 1) -> list[Member]:
    """Validate the config and every member's values (each member as a config of its own); the members."""
    pop = members(config)
    mesh = mesh_shape(len(pop), device_count)
    validate(config, mesh[1])
    if len(pop) > 1 or config.population:
        for m in pop:
            try:
                validate(member_config(config, m), mesh[1])
            except ConfigError as e:
                raise ConfigError(f"population member {m.index} ({m.label()}): {e}") from None
    return pop


def hparams(config: ml_collections.ConfigDict, pop: list[Member]) -> dict[str, np.ndarray]:
    """Every member's optimizer scalars: {key: (M,) float32}, the config's value where a member sets none."""
    return {
        key: np.asarray([float(m.values.get(key, get(config, key))) for m in pop], np.float32) for key in HPARAM_KEYS
    }


def attention_scales(config: ml_collections.ConfigDict, pop: list[Member], head_dim: int) -> np.ndarray | None:
    """Each member's attention scale as a number (M,) float32, or None when every member has the config's."""
    if not any("model.attn_scale" in m.values for m in pop):
        return None
    scales = []
    for m in pop:
        value = m.values.get("model.attn_scale", config.model.attn_scale)
        try:
            value = float(value)  # a number given as text, as on the command line
        except (TypeError, ValueError):
            pass
        scales.append(resolve_scale(value, head_dim))
    return np.asarray(scales, np.float32)


def mesh_shape(num_members: int, device_count: int) -> tuple[int, int]:
    """(population, data) axis sizes: members over the largest device count that divides both, batch over the rest."""
    population = math.gcd(num_members, device_count)
    return population, device_count // population
