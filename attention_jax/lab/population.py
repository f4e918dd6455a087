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

from typing import Any

import ml_collections
import numpy as np

from attention_jax.attention import resolve_scale
from attention_jax.lab import parts as parts_lib
from attention_jax.lab.parts import MEMBER_KEYS, Member, Population, mesh_shape
from attention_jax.lab.steps import HPARAM_KEYS

__all__ = [
    "MEMBER_KEYS",
    "Member",
    "Population",
    "attention_scales",
    "entries",
    "hparams",
    "member_config",
    "members",
    "mesh_shape",
]


def hparams(pop: Population | list[Member], *deprecated: Any) -> dict[str, np.ndarray]:
    """Every member's optimizer scalars: {key: (M,) float32} (each member's own, the config's where it sets none)."""
    if isinstance(pop, ml_collections.ConfigDict):  # deprecated: hparams(config, members)
        pop = _with_values(pop, deprecated[0])
    members = _members_of(pop)
    return {key: np.asarray([m.optimizer.hparams()[key] for m in members], np.float32) for key in HPARAM_KEYS}


def attention_scales(pop: Population | list[Member], *args: Any, head_dim: int | None = None) -> np.ndarray | None:
    """Each member's attention scale as a number (M,) float32, or None when every member has the config's.

    Called as ``attention_scales(members, head_dim)``; the deprecated form is
    ``attention_scales(config, members, head_dim)``.
    """
    if isinstance(pop, ml_collections.ConfigDict):
        pop, args = _with_values(pop, args[0]), args[1:]
    head_dim = args[0] if args else head_dim
    members = _members_of(pop)
    if not any("model.attn_scale" in m.values for m in members):
        return None
    return np.asarray([resolve_scale(m.attn_scale, head_dim) for m in members], np.float32)


def _members_of(pop: Population | list[Member]) -> list[Member]:
    return list(pop.members if isinstance(pop, Population) else pop)


# ---------------------------------------------------------------------------
# Deprecated: the ConfigDict forms (resolve once with attention_jax.lab.parts.resolve instead)
# ---------------------------------------------------------------------------


def entries(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """Deprecated: ``parts.resolve(config).population.entries`` (this form: [{}] for a plain run)."""
    return parts_lib.population_entries(config)


def members(config: ml_collections.ConfigDict) -> list[Member]:
    """Deprecated: ``list(parts.resolve(config).members)``."""
    return list(parts_lib.resolve(config, validate=False).members)


def check(config: ml_collections.ConfigDict, device_count: int = 1) -> list[Member]:
    """Deprecated: ``parts.resolve(config, device_count=...)`` validates the config and every member."""
    return list(parts_lib.resolve(config, device_count=device_count).members)


member_config = parts_lib.member_config  # the one-model config of a member: a config, built at the edge


def _with_values(config: ml_collections.ConfigDict, pop: list[Member]) -> list[Member]:
    """Members given by hand (index, seed, values) resolved against ``config`` (the deprecated forms)."""
    resolved = []
    for m in pop:
        alone = parts_lib.resolve(member_config(config, m), validate=False)
        resolved.append(Member(m.index, m.seed, m.values, alone.optimizer, alone.model.config.attn_scale))
    return resolved
