"""Typed experiment parts: the experiment config resolved once, at the start, into frozen values.

An experiment config (an ``ml_collections.ConfigDict``, :mod:`attention_jax.lab.config`)
is what a user writes, overrides and what a run directory saves (config.json,
unchanged). :func:`resolve` turns it, once, into :class:`Parts`: the model, the
optimizer and its schedule, the data, the device mesh, the distributed
settings, the Ray resources, the population's members and the run options,
each a frozen dataclass. Everything after that (experiment, population, loop,
steps, sweep grouping, distributed, bench) takes the parts, never the
ConfigDict. Derive variants with ``.replace``.

This module is the only place that knows the config's dotted names
(``model.n_head``): every error it raises is one line that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import ml_collections

from attention_jax.lab import config as config_lib
from attention_jax.lab.config import ConfigError, apply_overrides, flat_keys, model_config, unknown_key_message
from attention_jax.model import BigramLM, ModelConfig, TransformerLM

# The optimizer's runtime scalars, by their config keys (top-level keys: the names of ``Optimizer``'s
# fields too): what a population's members may set each for themselves (``steps.HPARAM_KEYS``).
HPARAM_KEYS = (
    "learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "beta1", "beta2", "z_loss",
)  # fmt: skip
# Config keys a member may set: the seed, the runtime scalars of the optimizer and its schedule, and
# the attention scale (a rule or a number: with the head size fixed, every rule is a number).
MEMBER_KEYS = ("seed", *HPARAM_KEYS, "model.attn_scale")
_LOOP_KEYS = (
    "num_seeds", "max_iters", "eval_interval", "eval_iters", "log_interval", "checkpoint_every", "steps_per_call",
    "sample_tokens", "grad_clip", "distributed", "population",
)  # fmt: skip
# Where the processes of a distributed run find each other when the config leaves it empty.
DISTRIBUTED_ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",  # JAX reads this one itself too
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
MESH_AXES = ("population", "data")
PLACEHOLDER_VOCAB = 1  # the model's vocab_size until the data gives it (``Parts.with_vocab``)


# ---------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """``model.*``: the kind of model and the frozen core ``ModelConfig`` it is built from."""

    type: str  # "transformer" or "bigram"
    config: ModelConfig  # vocab_size: the data's once known (PLACEHOLDER_VOCAB before, see Parts.with_vocab)

    def build(self) -> Any:
        """The Flax module."""
        if self.type == "bigram":
            return BigramLM(self.config.vocab_size)
        return TransformerLM(self.config)


@dataclass(frozen=True)
class Optimizer:
    """AdamW with global-norm clipping and nanoGPT's warmup + cosine schedule, and the objective's z-loss weight."""

    learning_rate: float  # peak, after warmup
    min_lr: float  # at the end of the cosine decay
    warmup_iters: int
    lr_decay_iters: int
    weight_decay: float  # decoupled, on matrices only
    beta1: float
    beta2: float
    grad_clip: float  # global norm; 0 disables
    z_loss: float = 0.0  # weight of mean(log² Z) of the output softmax added to the training loss; 0: none

    def hparams(self) -> dict[str, float]:
        """The runtime scalars (``HPARAM_KEYS``) as floats: what the compiled step takes as data."""
        return {key: float(getattr(self, key)) for key in HPARAM_KEYS}


@dataclass(frozen=True)
class Data:
    """``data.*`` and the batch: what each step reads."""

    dataset: str  # "tinyshakespeare" or a path to a UTF-8 text file
    train_fraction: float  # the first fraction of the characters trains, the rest validates
    batch_size: int  # sequences per optimizer step (per member)
    document_end: str | None = None  # the character that ends each document (packed sequences); None: one stream


@dataclass(frozen=True)
class Mesh:
    """The device mesh ``("population", "data")``: members over the first axis, each batch over the second."""

    population: int
    data: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.population, self.data

    @property
    def device_count(self) -> int:
        return self.population * self.data


def mesh_shape(num_members: int, device_count: int) -> tuple[int, int]:
    """(population, data) axis sizes: members over the largest device count that divides both, batch over the rest."""
    population = math.gcd(num_members, device_count)
    return population, device_count // population


@dataclass(frozen=True)
class Distributed:
    """How this process joins a multi-process run (``distributed.*``, the environment filling in).

    None fields are left to JAX to detect. ``enabled`` False: a single process.
    """

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    join_timeout_s: int = 300
    heartbeat_timeout_s: int = 100
    enabled: bool = True

    def who(self) -> str:
        if self.process_id is None or self.num_processes is None:
            return "this process"
        return f"process {self.process_id} of {self.num_processes}"


@dataclass(frozen=True)
class Ray:
    """``ray.*``: what each Ray task of a sweep asks the cluster for."""

    num_cpus: float
    num_gpus: float
    tpu_chips: int
    hosts: int
    max_retries: int


@dataclass(frozen=True)
class Member:
    """One model of a population: its seed, the entry's values as given, and what they resolve to."""

    index: int
    seed: int
    values: dict[str, Any]  # config keys -> values, as the population entry gives them (labels, summary.json)
    optimizer: Optimizer | None = field(default=None, compare=False)  # its own optimizer (None: the config's)
    attn_scale: Any = field(default=None, compare=False)  # its own attention scale (None: the config's)

    def label(self) -> str:
        """``learning_rate=0.003,seed=1337``: the member's values by their leaf names, then its seed."""
        items = {**self.values, "seed": self.seed}.items()
        return ",".join(f"{key.rsplit('.', 1)[-1]}={value:g}" if isinstance(value, float) else
                        f"{key.rsplit('.', 1)[-1]}={value}" for key, value in items)  # fmt: skip


@dataclass(frozen=True)
class Population:
    """The members trained in one program: each entry times ``num_seeds`` seeds."""

    members: tuple[Member, ...]
    entries: tuple[dict, ...] = ()  # the config's population as given; () for a plain run of num_seeds seeds

    @property
    def is_population(self) -> bool:
        """Whether the config has a population (members named by their values, not by their seeds)."""
        return bool(self.entries)

    @property
    def varies_attn_scale(self) -> bool:
        return any("model.attn_scale" in m.values for m in self.members)

    def __len__(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class RunOptions:
    """How long to train and what to do on the way: seeds, steps, eval cadence, checkpoints, sampling."""

    seed: int  # of the first member; seed + i for the i-th of num_seeds
    num_seeds: int
    max_iters: int
    eval_interval: int
    eval_iters: int
    log_interval: int
    checkpoint_every: int
    steps_per_call: int
    sample_tokens: int

    def next_boundary(self, step: int) -> int:
        """The next step at which the loop must stop to log, evaluate or checkpoint."""
        candidates = [self.max_iters]
        for every in (self.log_interval, self.eval_interval, self.checkpoint_every):
            candidates.append((step // every + 1) * every)
        return min(candidates)

    def at(self, step: int, every: int) -> bool:
        """Whether ``step`` is one of an ``every``-step cadence (or the last step)."""
        return step % every == 0 or step == self.max_iters


@dataclass(frozen=True)
class Parts:
    """Everything an experiment config says, typed. Derive variants with ``.replace``."""

    model: Model
    optimizer: Optimizer
    data: Data
    mesh: Mesh
    distributed: Distributed
    ray: Ray
    population: Population
    run: RunOptions

    def replace(self, **changes: Any) -> Parts:
        return dataclasses.replace(self, **changes)

    def with_vocab(self, vocab_size: int, end_token_id: int | None = None) -> Parts:
        """These parts with the model's vocabulary and end token (known once the data is read)."""
        config = self.model.config.replace(vocab_size=vocab_size, end_token_id=end_token_id)
        return self.replace(model=dataclasses.replace(self.model, config=config))

    @property
    def members(self) -> tuple[Member, ...]:
        return self.population.members


# ---------------------------------------------------------------------------
# Resolving: the only place that knows the dotted names
# ---------------------------------------------------------------------------


def resolve(
    config: ml_collections.ConfigDict,
    *,
    device_count: int = 1,
    vocab_size: int | None = None,
    validate: bool = True,
) -> Parts:
    """The typed parts of an experiment config, checked; raises ConfigError naming the first bad key.

    ``device_count``: the devices the run spans (the mesh and the batch split
    depend on it); ``vocab_size``: the data's, when known (else a placeholder
    that ``Parts.with_vocab`` replaces). Values that need the devices
    themselves (``model.attention_impl='cudnn'`` needs a GPU) are checked by
    ``config.validate``, which asks JAX only for those. ``validate=False``: a
    saved run's config, checked when it trained (its model is still checked).
    """
    members = _members(config)
    mesh = Mesh(*mesh_shape(len(members), device_count))
    if validate:
        config_lib.validate(config, mesh.data)
    model = _model(config, PLACEHOLDER_VOCAB if vocab_size is None else vocab_size)
    optimizer = _optimizer(config)
    population = _population(config, members, model, optimizer, mesh, validate)
    return Parts(
        model=model,
        optimizer=optimizer,
        data=Data(
            dataset=config.data.dataset,
            train_fraction=config.data.train_fraction,
            batch_size=config.batch_size,
            document_end=config.data.get("document_end"),
        ),  # fmt: skip
        mesh=mesh,
        distributed=resolve_distributed(config),
        ray=resolve_ray(config),
        population=population,
        run=RunOptions(
            seed=config.seed,
            num_seeds=config.num_seeds,
            max_iters=config.max_iters,
            eval_interval=config.eval_interval,
            eval_iters=config.eval_iters,
            log_interval=config.log_interval,
            checkpoint_every=config.checkpoint_every,
            steps_per_call=config.steps_per_call,
            sample_tokens=config.sample_tokens,
        ),
    )


def _model(config: ml_collections.ConfigDict, vocab_size: int) -> Model:
    kind = config.model.type
    if kind not in ("transformer", "bigram"):
        raise ConfigError(f"model.type must be 'transformer' or 'bigram', got {kind!r}")
    return Model(type=kind, config=model_config(config, vocab_size))


def _optimizer(config: ml_collections.ConfigDict) -> Optimizer:
    return Optimizer(**{key: config[key] for key in HPARAM_KEYS}, grad_clip=config.grad_clip)


def resolve_distributed(config: ml_collections.ConfigDict) -> Distributed:
    """``distributed.*`` with the environment filling in what the config leaves empty; errors name the key.

    Read without starting JAX: a process joins before its first JAX call.
    """
    group = config.get("distributed")
    if group is None or not group.get("enabled", False):
        return Distributed(None, None, None, enabled=False)

    def value(key, kind):
        v = group.get(key)
        if v in (None, "") and os.environ.get(DISTRIBUTED_ENV[key]):
            name = DISTRIBUTED_ENV[key]
            try:
                v = kind(os.environ[name])
            except ValueError:
                raise ConfigError(f"{name}={os.environ[name]!r} is not a valid {key}") from None
        return None if v in (None, "") else v

    s = Distributed(
        coordinator_address=value("coordinator_address", str),
        num_processes=value("num_processes", int),
        process_id=value("process_id", int),
        join_timeout_s=group.join_timeout_s,
        heartbeat_timeout_s=group.heartbeat_timeout_s,
    )
    if s.coordinator_address is not None:
        host, _, port = s.coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"distributed.coordinator_address={s.coordinator_address!r}: expected host:port")
    if s.num_processes is not None and s.num_processes < 1:
        raise ConfigError(f"distributed.num_processes={s.num_processes}: must be at least 1")
    if s.process_id is not None and not 0 <= s.process_id < (s.num_processes or s.process_id + 1):
        raise ConfigError(f"distributed.process_id={s.process_id}: must be in [0, num_processes={s.num_processes})")
    for key in ("join_timeout_s", "heartbeat_timeout_s"):
        if getattr(s, key) < 1:
            raise ConfigError(f"distributed.{key}={getattr(s, key)}: must be a positive number of seconds")
    return s


def resolve_ray(config: ml_collections.ConfigDict) -> Ray:
    """``ray.*`` (checked where a Ray task asks for it, ``ray_backend.resources_of``; a local run never does)."""
    r = config.get("ray") or ml_collections.ConfigDict(base_ray())
    return Ray(num_cpus=r.num_cpus, num_gpus=r.num_gpus, tpu_chips=r.tpu_chips, hosts=r.hosts,
               max_retries=r.max_retries)  # fmt: skip


def base_ray() -> dict:
    return config_lib.base_config().ray.to_dict()


# -- the population -----------------------------------------------------------


def population_entries(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
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


def _members(config: ml_collections.ConfigDict) -> list[Member]:
    """Every member (values and seed only): each entry times ``num_seeds`` seeds, in entry order."""
    out = []
    for entry in population_entries(config):
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


def _population(config, members: list[Member], model: Model, optimizer: Optimizer, mesh: Mesh,
                validate: bool = True) -> Population:  # fmt: skip
    """The members with their own optimizer and scale, each validated as a config of its own."""
    if not config.get("population", ()):
        return Population(tuple(dataclasses.replace(m, optimizer=optimizer, attn_scale=model.config.attn_scale)
                                for m in members))  # fmt: skip
    out = []
    for m in members:
        try:
            alone = member_config(config, m)
            if validate:
                config_lib.validate(alone, mesh.data)
            scale = _model(alone, model.config.vocab_size).config.attn_scale
        except ConfigError as e:
            raise ConfigError(f"population member {m.index} ({m.label()}): {e}") from None
        out.append(dataclasses.replace(m, optimizer=_optimizer(alone), attn_scale=scale))
    return Population(tuple(out), entries=tuple(dict(e) for e in config.population))


# ---------------------------------------------------------------------------
# Back to config keys: what a sweep groups by, and the entry of a member
# ---------------------------------------------------------------------------


def member_entry(parts: Parts) -> dict[str, Any]:
    """The population entry that gives one member the values of ``parts`` (a one-model config's parts)."""
    entry = {"seed": parts.run.seed, **parts.optimizer.hparams()}
    for key in ("warmup_iters", "lr_decay_iters"):
        entry[key] = getattr(parts.optimizer, key)
    entry["model.attn_scale"] = parts.model.config.attn_scale
    return entry


def shared(parts: Parts) -> Parts:
    """``parts`` without what members of one program may differ in (``MEMBER_KEYS``), nor members and mesh."""
    optimizer = dataclasses.replace(parts.optimizer, **{key: 0 for key in HPARAM_KEYS})
    model = dataclasses.replace(parts.model, config=parts.model.config.replace(attn_scale="sqrt"))
    return parts.replace(
        optimizer=optimizer,
        model=model,
        run=dataclasses.replace(parts.run, seed=0),
        population=Population(()),
        mesh=Mesh(1, 1),
    )
