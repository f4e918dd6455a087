"""The training loop: resumable, deterministic, writing everything through run directories.

Data flow: config -> ``Experiment`` (data, model, optimizer, mesh, members) ->
jitted steps -> this loop -> run directories (config.json, metrics.jsonl,
TensorBoard, checkpoints, tokenizer.json, sample.txt, summary.json).

Members: every model of the program (the ``num_seeds`` seeds of a run, or a
population's members) trains in one compiled program; every state leaf has a
leading member axis. A member whose loss turns NaN or Inf is frozen at its last
finite state and recorded as diverged while the others go on; the run stops
when every member has diverged.

Outputs: ``train`` writes all members into one run directory. ``train_members``
splits them over several (an ``Output`` each: a run directory, the config its
config.json records, the members it holds): how a sweep trains the points that
differ only in member values in one program while every point keeps a run
directory of its own, file for file like a point trained alone. An output whose
members have all diverged stops there, as a run of its own would: no more rows,
checkpoints or summary; the others go on.

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
from collections.abc import Callable, Iterator
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
    """Where some members' files go: a run directory, the config its config.json says, its members."""

    run: RunDir
    config: ml_collections.ConfigDict
    members: list[int]  # indices into the experiment's members, in this run directory's order

    def board_names(self, exp: ex.Experiment) -> list[str]:
        """TensorBoard folder of each member: its seed, or its values when the config has a population."""
        if not self.config.population:
            return [f"seed_{exp.members[i].seed}" for i in self.members]
        return [re.sub(r"[^A-Za-z0-9._=,+-]", "_", f"member_{j}_{exp.members[i].label()}") for j, i in
                enumerate(self.members)]  # fmt: skip


@dataclass
class Progress:
    """Where training stands: the state (M, ...) and each member's best evaluation so far."""

    state: steps.TrainState
    step: int
    best_val_loss: list[float]  # per member
    best_step: list[int | None]  # per member
    best_state: steps.TrainState | None = None  # per member, the state at that member's best val loss
    last_eval: dict[int, dict] = field(default_factory=dict)  # member -> its latest evaluation row
    diverged: list[int] = field(default_factory=list)  # per member: 0, or the step whose loss was not finite
    stopped: dict[int, str] = field(default_factory=dict)  # output index -> why it stopped (all members diverged)

    def meta(self, members: list[int]) -> dict:
        """What a checkpoint of ``members`` records besides their state (diverged: whose arrays may be non-finite)."""
        return {"best": {"val_loss": [self.best_val_loss[i] for i in members],
                         "step": [self.best_step[i] for i in members]},
                "diverged": [self.diverged[i] or None for i in members] if self.diverged else None}  # fmt: skip


def _take(state: Any, members: list[int], all_members: int) -> Any:
    """The members' slice of a (M, ...) tree (the tree itself when it is all of them, in order)."""
    if members == list(range(all_members)):
        return state
    idx = np.asarray(members)
    return jax.tree_util.tree_map(lambda a: a[idx], state)


def _stitch(exp: ex.Experiment, outputs: list[Output], parts: list[Any]) -> Any:
    """One (M, ...) tree in member order from each output's slice of its members."""
    if len(outputs) == 1 and outputs[0].members == list(range(exp.num_members)):
        return parts[0]
    order = np.argsort(np.concatenate([o.members for o in outputs]))
    tree = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs)[order], *parts)
    return jax.device_put(tree, exp.member_sharding)


def restore_or_start(
    exp: ex.Experiment, outputs: list[Output], checkpoints: list[Checkpoints]
) -> tuple[Progress, bool]:
    """The progress of the outputs' latest checkpoints, or a fresh start; and whether it was restored."""
    M = exp.num_members
    restored = [c.restore_latest(ex.abstract_state(exp, len(o.members))) for o, c in zip(outputs, checkpoints)]
    if all(r is None for r in restored):
        return Progress(ex.init_state(exp), 0, [math.inf] * M, [None] * M), False
    steps_at = {o.run.path.name: (int(steps.to_host(r[0].step)[0]) if r is not None else 0)
                for o, r in zip(outputs, restored)}  # fmt: skip
    if len(set(steps_at.values())) > 1:  # a group trains from one step: the sweep groups points by it
        raise ConfigError(f"the run directories of one program are at different steps: {steps_at}")
    state = _stitch(exp, outputs, [r[0] for r in restored])
    best_val, best_step = [math.inf] * M, [None] * M
    best_parts = []
    for o, c, (part, meta) in zip(outputs, checkpoints, restored):
        for j, i in enumerate(o.members):
            val = meta["best"]["val_loss"][j]  # JSON null: never evaluated
            best_val[i], best_step[i] = math.inf if val is None else val, meta["best"]["step"][j]
        best = c.restore_best(ex.abstract_state(exp, len(o.members)))
        # No best yet (killed before the first evaluation after step 0): a copy of the state, which gets donated.
        best_parts.append(best[0] if best is not None else jax.tree_util.tree_map(jnp.copy, part))
    progress = Progress(state, int(steps.to_host(state.step)[0]), best_val, best_step,
                        best_state=_stitch(exp, outputs, best_parts))  # fmt: skip
    return progress, True


def next_boundary(step: int, config: ml_collections.ConfigDict) -> int:
    """The next step at which the loop must stop to log, evaluate or checkpoint."""
    candidates = [config.max_iters]
    for every in (config.log_interval, config.eval_interval, config.checkpoint_every):
        candidates.append((step // every + 1) * every)
    return min(candidates)


def at(step: int, every: int, config: ml_collections.ConfigDict) -> bool:
    return step % every == 0 or step == config.max_iters


class Programs:
    """The compiled programs of one run: evaluation, ``steps_per_call`` steps, and single steps on demand."""

    def __init__(self, exp: ex.Experiment, state: steps.TrainState):
        t0 = time.perf_counter()
        self.exp = exp
        self.evaluate = ex.eval_program(exp).lower(state.params).compile()
        self.steps_per_call = exp.config.steps_per_call
        self.many = ex.train_program(exp, self.steps_per_call).lower(state).compile()
        # Single steps are needed only when a boundary splits a call of steps_per_call steps;
        # the shipped configs never do that, so that program is compiled on first use.
        self.single = self.many if self.steps_per_call == 1 else None
        self.health = None  # compiled at the first checkpoint
        self.compile_seconds = time.perf_counter() - t0

    def healthy(self, state: steps.TrainState) -> np.ndarray:
        """(num_members,) bool: whether each member's state is fit to checkpoint (``health_program``)."""
        members = self.exp.member_inputs
        if self.health is None:
            t0 = time.perf_counter()
            self.health = health_program(self.exp).lower(state, members).compile()
            self.compile_seconds += time.perf_counter() - t0
        return steps.to_host(self.health(state, members))

    def advance(self, state: steps.TrainState, n: int) -> tuple[steps.TrainState, dict[str, np.ndarray]]:
        """``n`` optimizer steps -> (state, {"loss", "grad_norm"} as (n, num_members) host arrays).

        Raises KeyboardInterrupt first when Ctrl-C was pressed (``stop_requested``):
        here the loop's state and step agree, and nothing is donated yet.
        """
        if stop_requested.is_set():
            raise KeyboardInterrupt
        if n % self.steps_per_call and self.single is None:
            t0 = time.perf_counter()
            self.single = ex.train_program(self.exp, 1).lower(state).compile()
            self.compile_seconds += time.perf_counter() - t0
        outs = []
        while n > 0:
            fn, m = (self.many, self.steps_per_call) if n >= self.steps_per_call else (self.single, 1)
            state, out = fn(state)
            outs.append(out)
            n -= m
        outs = jax.device_get(outs)
        return state, {key: np.concatenate([o[key] for o in outs]) for key in ("loss", "grad_norm")}


# Set by the first Ctrl-C during training; the loop stops at its next compiled call (Programs.advance).
stop_requested = threading.Event()


@contextlib.contextmanager
def stop_at_safe_point() -> Iterator[None]:
    """Ctrl-C while training: the first one stops the loop before its next compiled call (within a
    call's time: a second or so), where a checkpoint can be saved; a second one interrupts at once.

    A KeyboardInterrupt raised anywhere else can land inside library code and
    leave the state half-updated. Main thread only; an ignored SIGINT
    (``nohup``, a background job) stays ignored.
    """
    stop_requested.clear()
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return

    def handler(signum, frame):
        if stop_requested.is_set():
            raise KeyboardInterrupt
        stop_requested.set()
        print("\nstopping at the next step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        stop_requested.clear()


def health_program(exp: ex.Experiment):
    """A jitted function (state, member inputs) -> (M,) bool: finite parameters and a finite loss on
    the batch each member's next step trains on (that step's own loss: same keys, same dropout).

    Finite parameters alone are not enough: a learning rate far too high
    leaves them finite but so large (1e10) that the logits overflow.
    Costs one forward pass per checkpoint.
    """

    def one_member(state: steps.TrainState, member) -> jax.Array:
        data_key, dropout_key = steps.step_keys(member["key"], state.step)
        x, y = steps.batch(data_key, exp.train_data, exp.config.batch_size, exp.model_config.block_size,
                           exp.batch_sharding)  # fmt: skip
        loss = steps.loss_fn(state.params, steps.member_model(exp.model, member), x, y, dropout_key, False)
        finite = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(state.params)]
        return jnp.all(jnp.stack(finite)) & jnp.isfinite(loss)

    health = steps.over_members(one_member, (0, 0), exp.num_members, mesh_axis="population")
    return jax.jit(health, out_shardings=exp.replicated)  # replicated: every process reads the verdict


def save_checkpoints(
    exp: ex.Experiment,
    p: Progress,
    outputs: list[Output],
    checkpoints: list[Checkpoints],
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
        _stop_diverged_outputs(p, outputs, checkpoints)
    for k, (o, c) in enumerate(zip(outputs, checkpoints)):
        if k not in p.stopped:
            c.save_latest(p.step, _take(p.state, o.members, exp.num_members), p.meta(o.members))


def _save_on_interrupt(exp: ex.Experiment, p: Progress, outputs: list[Output], checkpoints: list[Checkpoints]) -> None:
    """After Ctrl-C: checkpoint the current state when it is whole, consistent with ``p.step``, and good."""
    if any(c.saving for c in checkpoints) or p.step == 0:
        return  # interrupted inside a save (the previous checkpoint stands), or nothing to save
    if all(c.latest_step() == p.step for c in checkpoints):
        return  # nothing new since the last checkpoint
    leaves = jax.tree_util.tree_leaves(p.state)
    if any(x.is_deleted() for x in leaves if isinstance(x, jax.Array)):
        return  # interrupted inside a compiled call: the state was donated to it
    if int(steps.to_host(p.state.step)[0]) != p.step:
        return  # interrupted between the new state and the step count
    check = health_program(exp)
    save_checkpoints(exp, p, outputs, checkpoints, lambda state: steps.to_host(check(state, exp.member_inputs)))
    print(f"interrupted: saved a checkpoint at step {p.step}", file=sys.stderr)


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

    ``Output.members`` of None means all members. Returns each output's summary,
    or ``{"diverged": message}`` for an output whose members all diverged (it
    writes no summary.json). Raises ``TrainingDiverged`` when every member did.
    """
    if text is None:
        text = ex.load_dataset(config.data.dataset)
    exp = ex.Experiment.from_config(config, text=text)
    outputs = [o if o.members is not None else Output(o.run, o.config, list(range(exp.num_members))) for o in outputs]
    if sorted(i for o in outputs for i in o.members) != list(range(exp.num_members)):
        raise ValueError(f"the outputs must hold each of the {exp.num_members} members exactly once")
    fingerprint = dataset_fingerprint(config.data.dataset, text)
    # With several hosts (jax.distributed), every process runs this loop and takes part in
    # checkpointing (orbax coordinates them); only process 0 holds the locks and writes files.
    writer = jax.process_index() == 0
    checkpoints: list[Checkpoints] = []
    resumes_from = ""  # unknown until the checkpoints are read

    def last_good() -> str:  # for messages about system faults
        return checkpoints[0].describe_latest() if checkpoints else resumes_from

    with contextlib.ExitStack() as stack:
        for o in outputs:  # every run directory locked, and its OS faults reported in one line
            stack.enter_context(o.run.lock(enabled=writer))
            stack.enter_context(storage_faults(o.run.path, last_good))
        for o in outputs:  # nothing is written before every run directory is known to be resumable
            o.run.check_resumable(to_dict(o.config), exp.tokenizer, fingerprint)
        readers = [o.run.checkpoints(writable=False) for o in outputs]
        try:
            p, restored = restore_or_start(exp, outputs, readers)
        finally:
            for r in readers:
                r.close()
        resumes_from = f"the last good checkpoint is step {p.step}" if restored else "no checkpoint was saved yet"
        if p.step >= config.max_iters and all(o.run.has_summary() for o in outputs):
            summaries = [o.run.read_summary() for o in outputs]
            if all(s is not None for s in summaries):
                for s in summaries:
                    print_summary(s, prefix="already finished: ")
                return summaries
        if writer:
            for o, r in zip(outputs, readers):
                o.run.write_start(to_dict(o.config), exp.tokenizer, fingerprint)
                set_aside(o.run, r.damaged)
                o.run.remove_summary()
        metrics: list[MetricsWriter] = []
        try:
            checkpoints.extend(o.run.checkpoints() for o in outputs)
            keep = p.step if restored else -1
            for o in outputs:
                metrics.append(o.run.metrics_writer(o.board_names(exp), keep_up_to_step=keep, enabled=writer))
            try:
                with stop_at_safe_point():
                    timing = _loop(exp, p, outputs, checkpoints, metrics, progress)
            except KeyboardInterrupt:
                _save_on_interrupt(exp, p, outputs, checkpoints)
                raise
        finally:
            for m in metrics:
                m.close()
            for c in checkpoints:
                c.close()
        live = [k for k in range(len(outputs)) if k not in p.stopped]
        summaries = dict(zip(live, _summaries(exp, p, [outputs[k] for k in live], timing)))
        for k in live:
            if writer:
                outputs[k].run.write_summary(summaries[k])
            print_summary(summaries[k])
    return [summaries[k] if k in summaries else {"diverged": p.stopped[k]} for k in range(len(outputs))]


@dataclass
class Timing:
    start_step: int
    compile_seconds: float = 0.0
    train_seconds: float = 0.0
    wall_start: float = field(default_factory=time.time)
    programs: Programs | None = None


def _loop(
    exp: ex.Experiment,
    p: Progress,
    outputs: list[Output],
    checkpoints: list[Checkpoints],
    metrics: list[MetricsWriter],
    progress: bool,
) -> Timing:
    """Train from ``p.step`` to ``max_iters``: log, evaluate and checkpoint at their intervals."""
    config = exp.config
    timing = Timing(start_step=p.step)
    programs = Programs(exp, p.state)
    timing.programs = programs
    models = f" ({exp.num_members} models)" if exp.num_members > 1 else ""
    print(f"compiled in {programs.compile_seconds:.1f} s; training from step {p.step} to {config.max_iters}{models}",
          file=sys.stderr)  # fmt: skip
    hparams = steps.to_host(exp.member_inputs["hparams"])
    p.diverged = [int(d) for d in steps.to_host(p.state.diverged_at)]
    if p.step == 0:
        evaluate(exp, programs, p, outputs, metrics)
    bar = progress_bar(config.max_iters, p.step, enabled=progress)
    tokens_since, time_since = 0, 0.0
    try:
        while p.step < config.max_iters:
            n = next_boundary(p.step, config) - p.step
            t0 = time.perf_counter()
            p.state, out = programs.advance(p.state, n)
            dt = time.perf_counter() - t0
            p.step += n
            timing.train_seconds += dt
            tokens_since, time_since = tokens_since + n * exp.tokens_per_step, time_since + dt
            bar.update(n)
            p.diverged = [int(d) for d in steps.to_host(p.state.diverged_at)]
            _stop_diverged_outputs(p, outputs, checkpoints)
            running = [k for k in range(len(outputs)) if k not in p.stopped]
            if at(p.step, config.log_interval, config):
                tok_s = tokens_since / max(time_since, 1e-9)
                lr = np.asarray(steps.learning_rate(hparams, p.step - 1))  # (M,)
                for k in running:
                    o = outputs[k]
                    rows = [_train_row(exp, p, o, j, i, out, lr[i], tok_s) for j, i in enumerate(o.members)]
                    metrics[k].write_many(rows)
                tokens_since, time_since = 0, 0.0
                alive = [out["loss"][-1, i] for i in range(exp.num_members) if not p.diverged[i]]
                bar.set_postfix(loss=f"{np.mean(alive):.4f}", tok_s=f"{tok_s:,.0f}")
            if at(p.step, config.eval_interval, config):
                evaluate(exp, programs, p, outputs, metrics, checkpoints)
                bar.write(eval_line(p.step, list(p.last_eval.values())))
            if at(p.step, config.checkpoint_every, config):
                save_checkpoints(exp, p, outputs, checkpoints, programs.healthy)
    finally:
        bar.close()
    timing.compile_seconds = programs.compile_seconds
    return timing


def _stop_diverged_outputs(p: Progress, outputs: list[Output], checkpoints: list[Checkpoints]) -> None:
    """Stop the outputs whose members have all diverged; raise ``TrainingDiverged`` once every output has."""
    for k, o in enumerate(outputs):
        if k not in p.stopped and all(p.diverged[i] for i in o.members):
            first = min(p.diverged[i] for i in o.members)
            describe = checkpoints[k].describe_latest()
            p.stopped[k] = f"loss became NaN/Inf at step {first}; stopped. {describe} (left intact)"
    if len(p.stopped) == len(outputs):
        if len(outputs) == 1:
            raise TrainingDiverged(p.stopped[0])
        raise TrainingDiverged(
            f"loss became NaN/Inf in every model (first at step {min(p.diverged)}); stopped. Each run directory "
            "keeps its last good checkpoint"
        )


def _train_row(exp, p: Progress, o: Output, j: int, i: int, out: dict, lr: float, tokens_per_s: float) -> dict:
    """The training row of member i (the output's j-th) at this log step; a diverged member says only when."""
    row = {"step": p.step, "member": j, "seed": exp.members[i].seed}
    if p.diverged[i]:
        return {**row, "diverged_at": p.diverged[i]}
    return {**row, "loss": float(out["loss"][-1, i]), "lr": float(lr), "grad_norm": float(out["grad_norm"][-1, i]),
            "tokens_per_s": tokens_per_s}  # fmt: skip


def evaluate(
    exp: ex.Experiment,
    programs: Programs,
    p: Progress,
    outputs: list[Output],
    metrics: list[MetricsWriter],
    checkpoints: list[Checkpoints] | None = None,
) -> None:
    """Evaluate every member that has not diverged, write its row, and (given ``checkpoints``) keep its best."""
    losses = jax.device_get(programs.evaluate(p.state.params))
    alive = [i for i in range(exp.num_members) if not p.diverged[i]]
    for i in alive:
        p.last_eval[i] = {"step": p.step, "seed": exp.members[i].seed, "train_loss": float(losses["train"][i]),
                          "val_loss": float(losses["val"][i])}  # fmt: skip
    for o, m in zip(outputs, metrics):
        m.write_many([{"step": p.step, "member": j, **p.last_eval[i]} for j, i in enumerate(o.members) if i in alive])
    if checkpoints is None:
        return
    improved = [i in alive and p.last_eval[i]["val_loss"] < p.best_val_loss[i] for i in range(exp.num_members)]
    if not any(improved):
        return
    for i in np.flatnonzero(improved):
        p.best_val_loss[i], p.best_step[i] = p.last_eval[i]["val_loss"], p.step
    p.best_state = merge_members(improved, p.state, p.best_state)
    for o, c in zip(outputs, checkpoints):
        if any(improved[i] for i in o.members):
            c.save_best(p.step, _take(p.best_state, o.members, exp.num_members), p.meta(o.members))


def merge_members(take_new: list[bool], new: steps.TrainState, old: steps.TrainState | None) -> steps.TrainState:
    """Per member, ``new`` where ``take_new`` else ``old``: each member's best state, one tree."""
    mask = jnp.asarray(take_new)
    if old is None:
        old = new
    # jnp.where always makes new buffers, so the result survives the donation of ``new``.
    return jax.tree_util.tree_map(lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def _summaries(exp: ex.Experiment, p: Progress, outputs: list[Output], timing: Timing) -> list[dict]:
    """Each output's summary.json: per member, in the output's order."""
    M = exp.num_members
    if any(not p.diverged[i] and p.last_eval.get(i, {}).get("step") != p.step for i in range(M)):
        # Resumed at the end (killed before the summary): evaluate again rather than trust a partial file.
        programs = timing.programs or Programs(exp, p.state)
        evaluate(exp, programs, p, outputs, [MetricsWriter(o.run, [], enabled=False) for o in outputs])
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
            "best_val_loss": [p.best_val_loss[i] for i in o.members],
            "full_val_loss": [None if p.diverged[i] else float(full_val[i]) for i in o.members],
            "best_step": [p.best_step[i] for i in o.members],
            "diverged_at": [p.diverged[i] or None for i in o.members],
            "params": n_params,
            "compile_seconds_this_session": round(timing.compile_seconds, 2),
            "train_seconds_this_session": round(timing.train_seconds, 2),
            "wall_seconds_this_session": round(time.time() - timing.wall_start, 2),
            "tokens_per_s": round(tokens_per_s, 1),
            "sample": samples[o.members[0]][:200],
        }
        if o.config.population:
            s["members"] = [exp.members[i].values for i in o.members]
        summaries.append(s)
    return summaries


def write_samples(exp: ex.Experiment, p: Progress, outputs: list[Output], writer: bool = True) -> list[str]:
    """Sample ``sample_tokens`` characters from each output member's final params into its run's sample.txt."""
    n = exp.config.sample_tokens
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
