"""What one experiment's parts build: data, model, optimizer, device mesh and its members.

An ``Experiment`` holds those pieces, built from the config's resolved parts
(:mod:`attention_jax.lab.parts`), and nothing else. The steps are the pure
functions of :mod:`attention_jax.lab.steps`; the functions below bind them to
an experiment's pieces and jit them, for the loop, the benchmarks and anyone
who wants a compiled step without the loop.

Members: the ``num_seeds`` seeds of a run, or a population's members
(:mod:`attention_jax.lab.population`), train in one program; every state leaf
has a leading member axis (M, ...).

Devices: a 2-D mesh ``("population", "data")``: members are laid over the
first axis (the largest device count that divides both), each member's batch
over the second; parameters are replicated within a member's devices and XLA
inserts the gradient all-reduce. The same code runs on 1 CPU, simulated CPU
devices, or a TPU slice.
"""

from __future__ import annotations

import collections
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
from attention_jax.lab import parts as parts_lib
from attention_jax.lab import population, steps
from attention_jax.lab.config import ConfigError, end_token_id
from attention_jax.lab.parts import MESH_AXES, Parts, resolve
from attention_jax.model import ModelConfig

Array = jax.Array


@dataclass
class Experiment:
    parts: Parts  # the resolved config; parts.model.config is model_config (the data's vocabulary)
    tokenizer: data_lib.CharTokenizer
    model_config: ModelConfig
    model: nn.Module
    tx: optax.GradientTransformation  # the config's own optimizer (members build theirs from their values)
    mesh: Mesh  # axes ("population", "data")
    train_data: Array  # (N_train,) int32 token ids, replicated
    val_data: Array  # (N_val,)
    members: list[population.Member]
    # {"key": (M,) PRNG keys, "hparams": {name: (M,) float32}, and "attn_scale": (M,) when members differ in it}
    member_inputs: dict[str, Any]
    # Deprecated: the ConfigDict of ``from_config`` (None from ``from_parts``); nothing in the lab reads it.
    config: ml_collections.ConfigDict | None = None

    @classmethod
    def from_parts(cls, parts: Parts, text: str | None = None) -> Experiment:
        """Read and tokenize the data (or ``text``), build model, optimizer and mesh of resolved ``parts``."""
        if parts.mesh.device_count != jax.device_count():
            raise ValueError(
                f"the parts were resolved for {parts.mesh.device_count} devices and JAX has {jax.device_count()}: "
                "resolve(config, device_count=jax.device_count())"
            )
        if text is None:
            text = load_dataset(parts.data.dataset)
        tokenizer, train, val = data_lib.prepare(text, parts.data.train_fraction)
        parts = parts.with_vocab(tokenizer.vocab_size, end_token_id(parts.data.document_end, tokenizer))
        mcfg = parts.model.config
        T = mcfg.block_size
        for name, split in (("training", train), ("validation", val)):
            if split.shape[0] <= T + 1:
                raise ConfigError(
                    f"model.block_size={T} is too long for the {name} split ({split.shape[0]} tokens); "
                    "use a shorter block_size or a longer text"
                )
        pop = list(parts.members)
        mesh = Mesh(np.array(jax.devices()).reshape(parts.mesh.shape), MESH_AXES)
        replicated = NamedSharding(mesh, P())
        # Replicated, from host values: every process holds a whole copy. The programs take them
        # (and the data) as arguments, not as constants, so members, seeds, learning rates and texts
        # of one shape share one compiled program (and its entry in the compilation cache).
        member_inputs = {
            "key": np.asarray(jax.random.key_data(jnp.stack([jax.random.key(m.seed) for m in pop]))),  # (M, 2)
            "hparams": population.hparams(parts.population),
        }
        scales = population.attention_scales(parts.population, head_dim=mcfg.head_dim)
        if scales is not None:  # the members' scales differ: each one's is a runtime number
            member_inputs["attn_scale"] = scales
        member_inputs = jax.device_put(member_inputs, replicated)
        member_inputs["key"] = jax.random.wrap_key_data(member_inputs["key"])
        return cls(
            parts=parts,
            tokenizer=tokenizer,
            model_config=mcfg,
            model=parts.model.build(),
            tx=steps.make_optimizer(parts.optimizer),
            mesh=mesh,
            train_data=jax.device_put(train, replicated),
            val_data=jax.device_put(val, replicated),
            members=pop,
            member_inputs=member_inputs,
        )

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, text: str | None = None) -> Experiment:
        """Resolve ``config`` (``parts.resolve``: validated, errors name the key), then ``from_parts``."""
        exp = cls.from_parts(resolve(config, device_count=jax.device_count()), text=text)
        exp.config = config
        return exp

    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def seeds(self) -> list[int]:
        """Each member's seed, in member order."""
        return [m.seed for m in self.members]

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step consumes, over all members."""
        return self.num_members * self.parts.data.batch_size * self.model_config.block_size

    @property
    def train_inputs(self) -> tuple:
        """The arguments after the state of ``train_program`` and ``health_program``: (member inputs, train data)."""
        return self.member_inputs, self.train_data

    @property
    def eval_inputs(self) -> tuple:
        """The arguments after the params of ``eval_program``: (member inputs, train data, val data)."""
        return self.member_inputs, self.train_data, self.val_data

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def member_sharding(self) -> NamedSharding:
        """Arrays with a leading member axis: members over the mesh's population axis."""
        return NamedSharding(self.mesh, P("population"))

    @property
    def batch_sharding(self) -> NamedSharding:
        """One member's (B, T) batch: the batch axis over the mesh's data axis."""
        return NamedSharding(self.mesh, P("data"))

    def flops_per_step(self) -> float:
        """Model FLOPs of one optimizer step (forward + backward), all members."""
        return self.model.flops_per_token() * self.tokens_per_step


def load_dataset(dataset: str) -> str:
    """The text of ``data.dataset`` (a path or a named dataset); errors name the key to set."""
    try:
        return data_lib.load_text(dataset)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.dataset={dataset!r}: {e}") from None


# ---------------------------------------------------------------------------
# The steps bound to an experiment, jitted
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgramKey:
    """What an experiment's programs are built from besides the types of their arguments.

    Runs in one process whose keys are equal share their programs: traced,
    lowered and compiled once (a sweep's points, a test's runs, one seed or
    learning rate after another). The optimizer's runtime scalars are left
    out: every member passes its own (``Experiment.member_inputs``).
    """

    model: nn.Module
    grad_clip: float  # the optimizer's one static value
    batch_size: int
    block_size: int
    eval_iters: int
    mesh: Mesh
    num_members: int

    @classmethod
    def of(cls, exp: Experiment) -> ProgramKey:
        return cls(exp.model, exp.parts.optimizer.grad_clip, exp.parts.data.batch_size, exp.model_config.block_size,
                   exp.parts.run.eval_iters, exp.mesh, exp.num_members)  # fmt: skip

    @property
    def optimizer(self) -> Callable[[dict], optax.GradientTransformation]:
        """A member's optimizer from its runtime scalars (``hp``)."""
        fixed = {key: 0.0 for key in parts_lib.HPARAM_KEYS}  # never read: hp gives them
        return functools.partial(steps.make_optimizer, parts_lib.Optimizer(**fixed, grad_clip=self.grad_clip))

    def sharding(self, *axes: str) -> NamedSharding:
        """Over the mesh's ``axes`` (none: replicated; "population": members; "data": a member's batch)."""
        return NamedSharding(self.mesh, P(*axes))

    def over_members(self, fn: Callable, in_axes: tuple) -> Callable:
        return steps.over_members(fn, in_axes, self.num_members, mesh_axis="population")


_PROGRAMS: collections.OrderedDict = collections.OrderedDict()  # (name, ..., ProgramKey) -> jitted or compiled
MAX_PROGRAMS = 64  # the least recently used are dropped past this


def cached_program(key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, kept under ``key`` for this process's later runs (see ``ProgramKey``)."""
    program = _PROGRAMS.pop(key) if key in _PROGRAMS else make()
    _PROGRAMS[key] = program
    while len(_PROGRAMS) > MAX_PROGRAMS:
        _PROGRAMS.popitem(last=False)
    return program


def clear_programs() -> None:
    """Forget every program kept by ``cached_program`` (the next run traces and compiles its own)."""
    _PROGRAMS.clear()


def _signature(args: tuple) -> tuple:
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves)


def compiled(program: Callable, *args) -> Callable:
    """``program`` (a jitted function) compiled for the types of ``args``, once per process."""
    return cached_program(("compiled", program, _signature(args)), lambda: program.lower(*args).compile())


def init_state(exp: Experiment) -> steps.TrainState:
    """Fresh state of every member, with a leading member axis."""
    key, optimizer = ProgramKey.of(exp), exp.parts.optimizer

    def make():
        init = functools.partial(steps.init_train_state, key.model, steps.make_optimizer(optimizer), key.block_size)
        return jax.jit(key.over_members(init, (0,)), out_shardings=key.sharding("population"))

    # Keyed by the whole optimizer: its initial state could depend on its values.
    return cached_program(("init", optimizer, key), make)(exp.member_inputs["key"])


def abstract_state(exp: Experiment, num_members: int | None = None) -> steps.TrainState:
    """Shapes, dtypes and shardings of the state of ``num_members`` members (default all), for restoring."""
    M = exp.num_members if num_members is None else num_members
    sharding = exp.member_sharding if M == exp.num_members else exp.replicated
    return steps.abstract_train_state(exp.model, exp.tx, exp.model_config.block_size, M, sharding)


def train_program(exp: Experiment, steps_per_call: int) -> Callable[..., tuple[steps.TrainState, dict]]:
    """A jitted ``(state, *exp.train_inputs) -> (state, metrics)``: ``steps_per_call`` optimizer steps of
    every member.

    The metrics are stacked as (steps_per_call, num_members). ``state`` is donated.
    """
    key = ProgramKey.of(exp)

    def make():
        def one_member(state, member, data):
            return steps.train_step(state, member, model=key.model, optimizer=key.optimizer, data=data,
                                    batch_size=key.batch_size, block_size=key.block_size,
                                    batch_sharding=key.sharding("data"))  # fmt: skip

        all_members = key.over_members(one_member, (0, 0, None))

        def many(state, members, data):
            return steps.repeat(lambda s: all_members(s, members, data), steps_per_call)(state)

        return jax.jit(many, out_shardings=(key.sharding("population"), key.sharding()), donate_argnums=0)

    return cached_program(("train", steps_per_call, key), make)


def train_steps(exp: Experiment, steps_per_call: int, state: steps.TrainState | None = None) -> Callable:
    """``train_program`` bound to the experiment's inputs: ``state -> (state, metrics)``.

    With ``state`` it is compiled now, for that state's shapes (else on the first call).
    """
    program = train_program(exp, steps_per_call)
    if state is not None:
        program = compiled(program, state, *exp.train_inputs)
    return lambda s: program(s, *exp.train_inputs)


def eval_program(exp: Experiment) -> Callable[..., dict[str, Array]]:
    """A jitted ``(params, *exp.eval_inputs) -> {"train": (M,), "val": (M,), "diagnostics": {...}}``.

    Mean losses on fixed batches, and each member's stability diagnostics on the
    first validation rows (``steps.eval_diagnostics``): arrays with a leading M.
    """
    key = ProgramKey.of(exp)

    def make():
        one_member = functools.partial(steps.eval_loss, model=key.model, batch_size=key.batch_size,
                                       block_size=key.block_size, eval_iters=key.eval_iters,
                                       batch_sharding=key.sharding("data"))  # fmt: skip
        all_members = key.over_members(one_member, (0, 0, None))
        diagnose = key.over_members(
            functools.partial(steps.eval_diagnostics, model=key.model, batch_size=key.batch_size,
                              block_size=key.block_size), (0, 0, None),
        )  # fmt: skip

        def evaluate(params, members, train, val):
            return {"train": all_members(params, members, train), "val": all_members(params, members, val),
                    "diagnostics": diagnose(params, members, val)}  # fmt: skip

        return jax.jit(evaluate, out_shardings=key.sharding())  # replicated: every process reads the losses

    return cached_program(("eval", key), make)


def full_split_loss(exp: Experiment, params: Any, data: Array) -> Array:
    """Loss over the whole split ``data`` of every member's params -> (M,); see ``steps.full_split_loss``."""
    key = ProgramKey.of(exp)

    def make():
        def one_member(params, member, data):
            return steps.full_split_loss(params, data, model=key.model, batch_size=key.batch_size,
                                         block_size=key.block_size, member=member)  # fmt: skip

        return jax.jit(key.over_members(one_member, (0, 0, None)), out_shardings=key.sharding())

    return cached_program(("full_split_loss", key), make)(params, exp.member_inputs, data)
