"""The training loop: resumable, deterministic, writing everything through run directories.

Data flow: config -> parts (``parts.resolve``, once) -> ``Experiment`` (data,
model, optimizer, mesh, members) -> jitted steps -> this loop -> run
directories (config.json, metrics.jsonl, TensorBoard, checkpoints,
tokenizer.json, sample.txt, summary.json). After resolution the loop reads no
value of the config: it only saves it (config.json) and compares it on resume.

Members: every model of the program (the ``num_seeds`` seeds of a run, or a
population's members) trains in one compiled program; every state leaf has a
leading member axis. A member whose loss turns NaN or Inf is frozen at its last
finite state and recorded as diverged while the others go on; the run stops
when every member has diverged.

Outputs: ``train`` writes all members into one run directory. ``train_members``
splits them over several (an ``Output`` each: a run directory, the config its
config.json records, the members it holds): how a sweep trains the points that
differ only in member values in one program while every point keeps a run
directory of its own, file for file like a point trained alone. While it trains,
each output's state (checkpoints, metrics writer, best values, whether it
stopped) lives in one ``OutputState``. An output whose members have all
diverged stops there, as a run of its own would: no more rows, checkpoints or
summary; the others go on.

A cold start prints what it is doing before its first result (``loading data
...``, ``initializing 1 model ...``, ``compiling 2 programs ...``) on stderr,
with the loop's other status lines.

Several optimizer steps run per compiled call (``steps_per_call``, a
``lax.scan``); a call is split into single steps only where a log, eval or
checkpoint boundary falls inside it.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from attention_jax.generate import generate
from attention_jax.lab import experiment as ex
from attention_jax.lab import steps
from attention_jax.lab.config import ConfigError, to_dict
from attention_jax.lab.parts import Parts, RunOptions, resolve
from attention_jax.lab.rundir import (
    Checkpoints,
    MetricsWriter,
    RunDir,
    dataset_fingerprint,
    set_aside,
    storage_faults,
)


class TrainingDiverged(RuntimeError):
    """The loss of every member became NaN or Inf."""


@dataclass
class Output:
    """Where some members' files go: a run directory, the config its config.json records, its members.

    The config is saved unchanged (and a resume compares it); the loop reads no value of it.
    """

    run: RunDir
    config: ml_collections.ConfigDict
    members: list[int] | None  # indices into the experiment's members, in this run directory's order; None: all


@dataclass
class OutputState:
    """One output while it trains: its run directory, members, checkpoints, metrics, best values, and
    whether it stopped (every member of it diverged)."""

    run: RunDir
    members: list[int]  # indices into the experiment's members, in this run directory's order
    saved: dict = field(default_factory=dict)  # what config.json records: the output's config as a dict
    named_by_values: bool = False  # its config has a population: members are named by their values
    checkpoints: Checkpoints | None = None
    metrics: MetricsWriter | None = None
    best_val_loss: list[float] = field(default_factory=list)  # per member of this output, in its order
    best_step: list[int | None] = field(default_factory=list)
    stopped: str | None = None  # why it stopped

    def __post_init__(self):
        n = len(self.members)
        self.best_val_loss = self.best_val_loss or [math.inf] * n
        self.best_step = self.best_step or [None] * n

    def board_names(self, exp: ex.Experiment) -> list[str]:
        """TensorBoard folder of each member: its seed, or its values when the config has a population."""
        if not self.named_by_values:
            return [f"seed_{exp.members[i].seed}" for i in self.members]
        return [re.sub(r"[^A-Za-z0-9._=,+-]", "_", f"member_{j}_{exp.members[i].label()}") for j, i in
                enumerate(self.members)]  # fmt: skip

    def meta(self, diverged: list[int]) -> dict:
        """What a checkpoint records besides the state (diverged: whose arrays may be non-finite)."""
        return {"best": {"val_loss": list(self.best_val_loss), "step": list(self.best_step)},
                "diverged": [diverged[i] or None for i in self.members] if diverged else None}  # fmt: skip


@dataclass
class Progress:
    """Where training stands: the state (M, ...), its step, each member's best state and latest evaluation."""

    state: steps.TrainState
    step: int
    best_state: steps.TrainState | None = None  # per member, the state at that member's best val loss
    last_eval: dict[int, dict] = field(default_factory=dict)  # member -> its latest evaluation row
    diverged: list[int] = field(default_factory=list)  # per member: 0, or the step whose loss was not finite


def _take(state: Any, members: list[int], all_members: int) -> Any:
    """The members' slice of a (M, ...) tree (the tree itself when it is all of them, in order)."""
    if members == list(range(all_members)):
        return state
    idx = np.asarray(members)
    return jax.tree_util.tree_map(lambda a: a[idx], state)


def _stitch(exp: ex.Experiment, outputs: list[OutputState], parts: list[Any]) -> Any:
    """One (M, ...) tree in member order from each output's slice of its members."""
    if len(outputs) == 1 and outputs[0].members == list(range(exp.num_members)):
        return parts[0]
    order = np.argsort(np.concatenate([o.members for o in outputs]))
    tree = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs)[order], *parts)
    return jax.device_put(tree, exp.member_sharding)


def restore_or_start(
    exp: ex.Experiment, outputs: list[OutputState], readers: list[Checkpoints]
) -> tuple[Progress, bool]:
    """The progress of the outputs' latest checkpoints (``readers``), or a fresh start; and whether it was restored.

    Sets each output's best values from its checkpoint.
    """
    restored = [c.restore_latest(ex.abstract_state(exp, len(o.members))) for o, c in zip(outputs, readers)]
    if all(r is None for r in restored):
        return Progress(ex.init_state(exp), 0), False
    steps_at = {o.run.path.name: (int(steps.to_host(r[0].step)[0]) if r is not None else 0)
                for o, r in zip(outputs, restored)}  # fmt: skip
    if len(set(steps_at.values())) > 1:  # a group trains from one step: the sweep groups points by it
        raise ConfigError(f"the run directories of one program are at different steps: {steps_at}")
    state = _stitch(exp, outputs, [r[0] for r in restored])
    best_parts = []
    for o, c, (part, meta) in zip(outputs, readers, restored):
        o.best_val_loss = [math.inf if v is None else v for v in meta["best"]["val_loss"]]  # JSON null: never evaluated
        o.best_step = list(meta["best"]["step"])
        best = c.restore_best(ex.abstract_state(exp, len(o.members)))
        # No best yet (killed before the first evaluation after step 0): a copy of the state, which gets donated.
        best_parts.append(best[0] if best is not None else jax.tree_util.tree_map(jnp.copy, part))
    progress = Progress(state, int(steps.to_host(state.step)[0]), best_state=_stitch(exp, outputs, best_parts))
    return progress, True


def next_boundary(step: int, run: RunOptions) -> int:
    """The next step at which the loop must stop to log, evaluate or checkpoint."""
    return run.next_boundary(step)


def at(step: int, every: int, run: RunOptions) -> bool:
    return run.at(step, every)


class SafeStop:
    """Ctrl-C while training: the first one stops the loop before its next compiled call (within a
    call's time: a second or so), where a checkpoint can be saved; a second one interrupts at once.

    A KeyboardInterrupt raised anywhere else can land inside library code and
    leave the state half-updated. Use it as a context manager around the loop:
    main thread only; an ignored SIGINT (``nohup``, a background job) stays ignored.
    Each training call owns its own.
    """

    def __init__(self):
        self.requested = threading.Event()
        self._previous = None
        self._installed = False

    def check(self) -> None:
        """Raise KeyboardInterrupt when Ctrl-C was pressed."""
        if self.requested.is_set():
            raise KeyboardInterrupt

    def _handler(self, signum, frame):
        if self.requested.is_set():
            raise KeyboardInterrupt
        self.requested.set()
        print("\nstopping at the next step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> SafeStop:
        self.requested.clear()
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
        self.requested.clear()


class Programs:
    """The compiled programs of one run: evaluation, ``steps_per_call`` steps, and single steps on demand."""

    def __init__(self, exp: ex.Experiment, state: steps.TrainState, stop: SafeStop | None = None):
        t0 = time.perf_counter()
        self.exp = exp
        self.stop = stop
        self._evaluate = ex.compiled(ex.eval_program(exp), state.params, *exp.eval_inputs)
        self.steps_per_call = exp.parts.run.steps_per_call
        self.many = ex.compiled(ex.train_program(exp, self.steps_per_call), state, *exp.train_inputs)
        # Single steps are needed only when a boundary splits a call of steps_per_call steps;
        # the shipped configs never do that, so that program is compiled on first use.
        self.single = self.many if self.steps_per_call == 1 else None
        self.health = None  # compiled at the first checkpoint
        self.compile_seconds = time.perf_counter() - t0

    def evaluate(self, params) -> dict[str, jax.Array]:
        """{"train": (M,), "val": (M,)} mean losses on the fixed evaluation batches."""
        return self._evaluate(params, *self.exp.eval_inputs)

    def healthy(self, state: steps.TrainState) -> np.ndarray:
        """(num_members,) bool: whether each member's state is fit to checkpoint (``health_program``)."""
        if self.health is None:
            t0 = time.perf_counter()
            self.health = ex.compiled(health_program(self.exp), state, *self.exp.train_inputs)
            self.compile_seconds += time.perf_counter() - t0
        return steps.to_host(self.health(state, *self.exp.train_inputs))

    def advance(self, state: steps.TrainState, n: int) -> tuple[steps.TrainState, dict[str, np.ndarray]]:
        """``n`` optimizer steps -> (state, {"loss", "grad_norm"} as (n, num_members) host arrays).

        Raises KeyboardInterrupt first when Ctrl-C was pressed (``SafeStop``):
        here the loop's state and step agree, and nothing is donated yet.
        """
        if self.stop is not None:
            self.stop.check()
        if n % self.steps_per_call and self.single is None:
            t0 = time.perf_counter()
            self.single = ex.compiled(ex.train_program(self.exp, 1), state, *self.exp.train_inputs)
            self.compile_seconds += time.perf_counter() - t0
        outs = []
        while n > 0:
            fn, m = (self.many, self.steps_per_call) if n >= self.steps_per_call else (self.single, 1)
            state, out = fn(state, *self.exp.train_inputs)
            outs.append(out)
            n -= m
        outs = jax.device_get(outs)
        return state, {key: np.concatenate([o[key] for o in outs]) for key in ("loss", "grad_norm")}


def health_program(exp: ex.Experiment):
    """A jitted ``(state, *exp.train_inputs) -> (M,) bool``: finite parameters and a finite loss on
    the batch each member's next step trains on (that step's own loss: same keys, same dropout).

    Finite parameters alone are not enough: a learning rate far too high
    leaves them finite but so large (1e10) that the logits overflow.
    Costs one forward pass per checkpoint.
    """

    key = ex.ProgramKey.of(exp)

    def make():
        def one_member(state: steps.TrainState, member, data) -> jax.Array:
            data_key, dropout_key = steps.step_keys(member["key"], state.step)
            x, y = steps.batch(data_key, data, key.batch_size, key.block_size, key.sharding("data"))
            loss = steps.loss_fn(state.params, steps.member_model(key.model, member), x, y, dropout_key, False)
            finite = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(state.params)]
            return jnp.all(jnp.stack(finite)) & jnp.isfinite(loss)

        health = key.over_members(one_member, (0, 0, None))
        return jax.jit(health, out_shardings=key.sharding())  # replicated: every process reads the verdict

    return ex.cached_program(("health", key), make)


def save_checkpoints(
    exp: ex.Experiment,
    p: Progress,
    outputs: list[OutputState],
    healthy: Callable[[steps.TrainState], np.ndarray],
) -> None:
    """Save each running output's latest checkpoint, good for every member that has not diverged.

    A member whose state is not good (``healthy``) is marked diverged at the
    next step, whose loss is the one found NaN/Inf, and frozen from then on;
    an output left with no healthy member stops (``_stop_diverged_outputs``).
    """
    ok = healthy(p.state)
    bad = [i for i in range(exp.num_members) if not ok[i] and not p.diverged[i]]
    if bad:
        for i in bad:
            p.diverged[i] = p.step + 1
        p.state = p.state.replace(diverged_at=jax.device_put(np.asarray(p.diverged, np.int32), exp.member_sharding))
        _stop_diverged_outputs(p, outputs)
    for o in outputs:
        if o.stopped is None:
            o.checkpoints.save_latest(p.step, _take(p.state, o.members, exp.num_members), o.meta(p.diverged))


def _save_on_interrupt(exp: ex.Experiment, p: Progress, outputs: list[OutputState]) -> None:
    """After Ctrl-C: checkpoint the current state when it is whole, consistent with ``p.step``, and good."""
    if any(o.checkpoints.saving for o in outputs) or p.step == 0:
        return  # interrupted inside a save (the previous checkpoint stands), or nothing to save
    if all(o.checkpoints.latest_step() == p.step for o in outputs):
        return  # nothing new since the last checkpoint
    leaves = jax.tree_util.tree_leaves(p.state)
    if any(x.is_deleted() for x in leaves if isinstance(x, jax.Array)):
        return  # interrupted inside a compiled call: the state was donated to it
    if int(steps.to_host(p.state.step)[0]) != p.step:
        return  # interrupted between the new state and the step count
    check = health_program(exp)
    save_checkpoints(exp, p, outputs, lambda state: steps.to_host(check(state, *exp.train_inputs)))
    print(f"interrupted: saved a checkpoint at step {p.step}", file=sys.stderr)


def status(message: str) -> None:
    """A line saying what a cold start is doing (before its first result), on stderr like the loop's others."""
    print(message, file=sys.stderr, flush=True)


def train(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    text: str | None = None,
    progress: bool = True,
) -> dict:
    """Train (or resume) the experiment ``config`` in ``workdir``; return the summary.

    Resumes from the latest checkpoint when the workdir has one; returns the
    stored summary when the run already finished.
    """
    return train_members(config, [Output(RunDir(workdir), config, None)], text=text, progress=progress)[0]


def train_members(
    config: ml_collections.ConfigDict,
    outputs: list[Output],
    *,
    text: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train (or resume) every member of ``config`` in one program, writing each output's members to its run dir.

    ``config`` is resolved here, once (``parts.resolve``); the outputs' configs
    are what their config.json records. ``Output.members`` of None means all
    members. Returns each output's summary, or ``{"diverged": message}`` for an
    output whose members all diverged (it writes no summary.json). Raises
    ``TrainingDiverged`` when every member did.
    """
    saved = [to_dict(o.config) for o in outputs]  # what config.json records; no value of it is read after this
    parts = resolve(config, device_count=jax.device_count())
    named = [parts.population.is_population if o.config is config else
             resolve(o.config, device_count=jax.device_count(), validate=False).population.is_population
             for o in outputs]  # fmt: skip
    return train_parts(parts, outputs, saved=saved, named_by_values=named, text=text, progress=progress)


def train_parts(
    parts: Parts,
    outputs: list[Output],
    *,
    saved: list[dict] | None = None,
    named_by_values: list[bool] | None = None,
    text: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """``train_members`` of resolved ``parts``.

    Each output's config is only saved and compared: ``saved`` (default: the
    outputs' configs as dicts) is what their config.json records.
    ``named_by_values`` (default: all False) says which outputs' configs have
    a population, whose members are named by their values.
    """
    status("loading data ..." if text is None else "preparing data ...")
    if text is None:
        text = ex.load_dataset(parts.data.dataset)
    exp = ex.Experiment.from_parts(parts, text=text)
    M = exp.num_members
    named_by_values = named_by_values or [False] * len(outputs)
    saved = saved or [to_dict(o.config) for o in outputs]
    outs = [OutputState(o.run, list(range(M)) if o.members is None else list(o.members), saved=d, named_by_values=n)
            for o, d, n in zip(outputs, saved, named_by_values)]  # fmt: skip
    if sorted(i for o in outs for i in o.members) != list(range(M)):
        raise ValueError(f"the outputs must hold each of the {M} members exactly once")
    fingerprint = dataset_fingerprint(parts.data.dataset, text)
    status(f"initializing {M} model{'s' if M > 1 else ''} (or restoring the latest checkpoint) ...")
    # With several hosts (jax.distributed), every process runs this loop and takes part in
    # checkpointing (orbax coordinates them); only process 0 holds the locks and writes files.
    writer = jax.process_index() == 0
    resumes_from = ""  # unknown until the checkpoints are read

    def last_good() -> str:  # for messages about system faults
        return outs[0].checkpoints.describe_latest() if outs[0].checkpoints is not None else resumes_from

    with contextlib.ExitStack() as stack:
        for o in outs:  # every run directory locked, and its OS faults reported in one line
            stack.enter_context(o.run.lock(enabled=writer))
            stack.enter_context(storage_faults(o.run.path, last_good))
        for o in outs:  # nothing is written before every run directory is known to be resumable
            o.run.check_resumable(o.saved, exp.tokenizer, fingerprint)
        readers = [o.run.checkpoints(writable=False) for o in outs]
        try:
            p, restored = restore_or_start(exp, outs, readers)
        finally:
            for r in readers:
                r.close()
        resumes_from = f"the last good checkpoint is step {p.step}" if restored else "no checkpoint was saved yet"
        if p.step >= parts.run.max_iters and all(o.run.has_summary() for o in outs):
            summaries = [o.run.read_summary() for o in outs]
            if all(s is not None for s in summaries):
                for s in summaries:
                    print_summary(s, prefix="already finished: ")
                return summaries
        if writer:
            for o, r in zip(outs, readers):
                o.run.write_start(o.saved, exp.tokenizer, fingerprint)
                set_aside(o.run, r.damaged)
                o.run.remove_summary()
        try:
            keep = p.step if restored else -1
            for o in outs:
                o.checkpoints = o.run.checkpoints()
                o.metrics = o.run.metrics_writer(o.board_names(exp), keep_up_to_step=keep, enabled=writer)
            try:
                with SafeStop() as stop:
                    timing = _loop(exp, p, outs, progress, stop)
            except KeyboardInterrupt:
                _save_on_interrupt(exp, p, outs)
                raise
        finally:
            for o in outs:
                if o.metrics is not None:
                    o.metrics.close()
                if o.checkpoints is not None:
                    o.checkpoints.close()
        live = [o for o in outs if o.stopped is None]
        summaries = dict(zip(map(id, live), _summaries(exp, p, live, timing)))
        for o in live:
            if writer:
                o.run.write_summary(summaries[id(o)])
            print_summary(summaries[id(o)])
    return [summaries[id(o)] if o.stopped is None else {"diverged": o.stopped} for o in outs]


@dataclass
class Timing:
    start_step: int
    compile_seconds: float = 0.0
    train_seconds: float = 0.0
    wall_start: float = field(default_factory=time.time)
    programs: Programs | None = None


def _loop(exp: ex.Experiment, p: Progress, outputs: list[OutputState], progress: bool, stop: SafeStop) -> Timing:
    """Train from ``p.step`` to ``max_iters``: log, evaluate and checkpoint at their intervals."""
    run = exp.parts.run
    timing = Timing(start_step=p.step)
    per_call = f", {run.steps_per_call} steps per call" if run.steps_per_call > 1 else ""
    status(f"compiling 2 programs (evaluation, training{per_call}) ...")
    programs = Programs(exp, p.state, stop)
    timing.programs = programs
    models = f" ({exp.num_members} models)" if exp.num_members > 1 else ""
    print(f"compiled in {programs.compile_seconds:.1f} s; training from step {p.step} to {run.max_iters}{models}",
          file=sys.stderr)  # fmt: skip
    hparams = steps.to_host(exp.member_inputs["hparams"])
    p.diverged = [int(d) for d in steps.to_host(p.state.diverged_at)]
    if p.step == 0:
        evaluate(exp, programs, p, outputs)
    bar = progress_bar(run.max_iters, p.step, enabled=progress)
    tokens_since, time_since = 0, 0.0
    try:
        while p.step < run.max_iters:
            n = run.next_boundary(p.step) - p.step
            t0 = time.perf_counter()
            p.state, out = programs.advance(p.state, n)
            dt = time.perf_counter() - t0
            p.step += n
            timing.train_seconds += dt
            tokens_since, time_since = tokens_since + n * exp.tokens_per_step, time_since + dt
            bar.update(n)
            p.diverged = [int(d) for d in steps.to_host(p.state.diverged_at)]
            _stop_diverged_outputs(p, outputs)
            if run.at(p.step, run.log_interval):
                tok_s = tokens_since / max(time_since, 1e-9)
                lr = np.asarray(steps.learning_rate(hparams, p.step - 1))  # (M,)
                for o in outputs:
                    if o.stopped is None:
                        o.metrics.write_many([_train_row(exp, p, j, i, out, lr[i], tok_s) for j, i in
                                              enumerate(o.members)])  # fmt: skip
                tokens_since, time_since = 0, 0.0
                alive = [out["loss"][-1, i] for i in range(exp.num_members) if not p.diverged[i]]
                bar.set_postfix(loss=f"{np.mean(alive):.4f}", tok_s=f"{tok_s:,.0f}")
            if run.at(p.step, run.eval_interval):
                evaluate(exp, programs, p, outputs, keep_best=True)
                bar.write(eval_line(p.step, list(p.last_eval.values())))
            if run.at(p.step, run.checkpoint_every):
                save_checkpoints(exp, p, outputs, programs.healthy)
    finally:
        bar.close()
    timing.compile_seconds = programs.compile_seconds
    return timing


def _stop_diverged_outputs(p: Progress, outputs: list[OutputState]) -> None:
    """Stop the outputs whose members have all diverged; raise ``TrainingDiverged`` once every output has."""
    for o in outputs:
        if o.stopped is None and all(p.diverged[i] for i in o.members):
            first = min(p.diverged[i] for i in o.members)
            o.stopped = f"loss became NaN/Inf at step {first}; stopped. {o.checkpoints.describe_latest()} (left intact)"
    if all(o.stopped is not None for o in outputs):
        if len(outputs) == 1:
            raise TrainingDiverged(outputs[0].stopped)
        raise TrainingDiverged(
            f"loss became NaN/Inf in every model (first at step {min(p.diverged)}); stopped. Each run directory "
            "keeps its last good checkpoint"
        )


def _train_row(exp, p: Progress, j: int, i: int, out: dict, lr: float, tokens_per_s: float) -> dict:
    """The training row of member i (its output's j-th) at this log step; a diverged member says only when."""
    row = {"step": p.step, "member": j, "seed": exp.members[i].seed}
    if p.diverged[i]:
        return {**row, "diverged_at": p.diverged[i]}
    return {**row, "loss": float(out["loss"][-1, i]), "lr": float(lr), "grad_norm": float(out["grad_norm"][-1, i]),
            "tokens_per_s": tokens_per_s}  # fmt: skip


def evaluate(
    exp: ex.Experiment,
    programs: Programs,
    p: Progress,
    outputs: list[OutputState],
    keep_best: bool = False,
    write: bool = True,
) -> None:
    """Evaluate every member that has not diverged, write its row, and (``keep_best``) keep its best."""
    losses = jax.device_get(programs.evaluate(p.state.params))
    alive = [i for i in range(exp.num_members) if not p.diverged[i]]
    for i in alive:
        diagnostics = {name: np.asarray(v[i]).tolist() for name, v in losses["diagnostics"].items()}  # per layer, head
        p.last_eval[i] = {"step": p.step, "seed": exp.members[i].seed, "train_loss": float(losses["train"][i]),
                          "val_loss": float(losses["val"][i]), "diagnostics": diagnostics}  # fmt: skip
    if write:
        for o in outputs:
            o.metrics.write_many([{"step": p.step, "member": j, **p.last_eval[i]} for j, i in enumerate(o.members)
                                  if i in alive])  # fmt: skip
    if not keep_best:
        return
    improved = [False] * exp.num_members
    for o in outputs:
        for j, i in enumerate(o.members):
            improved[i] = i in alive and p.last_eval[i]["val_loss"] < o.best_val_loss[j]
    if not any(improved):
        return
    for o in outputs:
        for j, i in enumerate(o.members):
            if improved[i]:
                o.best_val_loss[j], o.best_step[j] = p.last_eval[i]["val_loss"], p.step
    p.best_state = merge_members(improved, p.state, p.best_state)
    for o in outputs:
        if any(improved[i] for i in o.members):
            o.checkpoints.save_best(p.step, _take(p.best_state, o.members, exp.num_members), o.meta(p.diverged))


def merge_members(take_new: list[bool], new: steps.TrainState, old: steps.TrainState | None) -> steps.TrainState:
    """Per member, ``new`` where ``take_new`` else ``old``: each member's best state, one tree."""
    mask = jnp.asarray(take_new)
    if old is None:
        old = new
    # jnp.where always makes new buffers, so the result survives the donation of ``new``.
    return jax.tree_util.tree_map(lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def _summaries(exp: ex.Experiment, p: Progress, outputs: list[OutputState], timing: Timing) -> list[dict]:
    """Each output's summary.json: per member, in the output's order."""
    M = exp.num_members
    if any(not p.diverged[i] and p.last_eval.get(i, {}).get("step") != p.step for i in range(M)):
        # Resumed at the end (killed before the summary): evaluate again rather than trust a partial file.
        programs = timing.programs or Programs(exp, p.state)
        evaluate(exp, programs, p, outputs, write=False)
    writer = jax.process_index() == 0
    samples = write_samples(exp, p, outputs, writer=writer)
    full_val = jax.device_get(ex.full_split_loss(exp, p.state.params, exp.val_data))
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(p.state.params)) // M)
    tokens_per_s = (p.step - timing.start_step) * exp.tokens_per_step / max(timing.train_seconds, 1e-9)

    def final(i, key):
        return None if p.diverged[i] else p.last_eval[i][key]

    summaries = []
    for o in outputs:
        s = {
            "steps": p.step,
            "seeds": [exp.members[i].seed for i in o.members],
            "final_train_loss": [final(i, "train_loss") for i in o.members],
            "final_val_loss": [final(i, "val_loss") for i in o.members],
            "best_val_loss": list(o.best_val_loss),
            "full_val_loss": [None if p.diverged[i] else float(full_val[i]) for i in o.members],
            "best_step": list(o.best_step),
            "diverged_at": [p.diverged[i] or None for i in o.members],
            "params": n_params,
            "compile_seconds_this_session": round(timing.compile_seconds, 2),
            "train_seconds_this_session": round(timing.train_seconds, 2),
            "wall_seconds_this_session": round(time.time() - timing.wall_start, 2),
            "tokens_per_s": round(tokens_per_s, 1),
            "sample": samples[o.members[0]][:200],
        }
        if o.named_by_values:
            s["members"] = [exp.members[i].values for i in o.members]
        summaries.append(s)
    return summaries


def write_samples(exp: ex.Experiment, p: Progress, outputs: list[OutputState], writer: bool = True) -> list[str]:
    """Sample ``sample_tokens`` characters from each output member's final params into its run's sample.txt."""
    n = exp.parts.run.sample_tokens
    if n <= 0:
        return [""] * exp.num_members
    chars = exp.tokenizer.chars
    prompt = jnp.asarray(exp.tokenizer.encode("\n" if "\n" in chars else chars[0]))[None]  # (1, 1)
    texts = [""] * exp.num_members
    for i in sorted(i for o in outputs for i in o.members):
        # One member's params on this process (with several processes they may live on another's devices);
        # its inputs (key, scale) are replicated, so every process holds them.
        params = steps.to_host(jax.tree_util.tree_map(lambda a: a[i], p.state.params))
        member = jax.tree_util.tree_map(lambda a: a[i], exp.member_inputs)
        key = jax.random.fold_in(member["key"], steps.SAMPLE)
        out = generate(steps.member_model(exp.model, member), params, prompt, n, key, temperature=1.0)
        texts[i] = exp.tokenizer.decode(out[0])
    if writer:
        for o in outputs:
            o.run.write_samples([exp.members[i].seed for i in o.members], [texts[i] for i in o.members])
    return texts


def eval_line(step: int, rows: list[dict]) -> str:
    if not rows:
        return f"step {step}: every member has diverged"
    tl = np.mean([r["train_loss"] for r in rows])
    vl = np.mean([r["val_loss"] for r in rows])
    return f"step {step}: train loss {tl:.4f}, val loss {vl:.4f}" + (f" (mean of {len(rows)})" if len(rows) > 1 else "")


def _mean(values: list) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def print_summary(summary: dict, prefix: str = "") -> None:
    fv, bv, full = (_mean(summary[k]) for k in ("final_val_loss", "best_val_loss", "full_val_loss"))
    print(
        f"{prefix}{summary['steps']} steps, final val loss {fv:.4f} (best {bv:.4f}; whole val split {full:.4f}), "
        f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['train_seconds_this_session']:.1f} s training",
        file=sys.stderr,
    )


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
