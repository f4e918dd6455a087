"""The training loop: resumable, deterministic, writing everything through the run directory.

Data flow: config -> ``Experiment`` (data, model, optimizer, mesh) -> jitted
steps -> this loop -> run directory (config.json, metrics.jsonl, TensorBoard,
checkpoints, tokenizer.json, sample.txt, summary.json).

Seeds: ``num_seeds`` models (seeds seed, seed + 1, ...) train in one compiled
program; every state leaf carries a leading seed axis. Several optimizer steps
run per compiled call (``steps_per_call``, a ``lax.scan``); a call is split
into single steps only where a log, eval or checkpoint boundary falls inside it.
"""

from __future__ import annotations

import contextlib
import math
import os
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
from attention_jax.lab.config import to_dict
from attention_jax.lab.rundir import (
    Checkpoints,
    MetricsWriter,
    RunDir,
    dataset_fingerprint,
    set_aside,
    storage_faults,
)


class TrainingDiverged(RuntimeError):
    """The loss of every seed became NaN or Inf."""


@dataclass
class Progress:
    """Where training stands: the state and what each seed has done so far (restored with the state)."""

    state: steps.TrainState
    step: int
    best_val_loss: list[float]  # per seed
    best_step: list[int | None]  # per seed
    diverged: list[int | None]  # per seed: the step whose loss first was NaN/Inf
    best_state: steps.TrainState | None = None  # per seed, the state at that seed's best val loss
    last_eval: list[dict] = field(default_factory=list)  # the rows of the latest evaluation

    def meta(self) -> dict:
        best = {"val_loss": self.best_val_loss, "step": self.best_step}
        return {"best": best, "diverged": self.diverged}


def restore_or_start(exp: ex.Experiment, checkpoints: Checkpoints) -> tuple[Progress, bool]:
    """The progress of the latest checkpoint, or a fresh start; and whether it was restored."""
    restored = checkpoints.restore_latest(ex.abstract_state(exp))
    K = exp.num_seeds
    if restored is None:
        fresh = Progress(ex.init_state(exp), 0, [math.inf] * K, [None] * K, [None] * K)
        return fresh, False
    state, meta = restored
    best_restored = checkpoints.restore_best(ex.abstract_state(exp))
    progress = Progress(
        state=state,
        step=int(state.step[0]),
        best_val_loss=[math.inf if v is None else v for v in meta["best"]["val_loss"]],  # JSON null: never evaluated
        best_step=meta["best"]["step"],
        diverged=meta.get("diverged", [None] * K),
        best_state=best_restored[0] if best_restored is not None else None,
    )
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
        """(num_seeds,) bool: whether each seed's state is fit to checkpoint (``health_program``)."""
        if self.health is None:
            t0 = time.perf_counter()
            self.health = health_program(self.exp).lower(state, self.exp.seed_keys).compile()
            self.compile_seconds += time.perf_counter() - t0
        return np.asarray(jax.device_get(self.health(state, self.exp.seed_keys)))

    def advance(self, state: steps.TrainState, n: int) -> tuple[steps.TrainState, dict[str, np.ndarray]]:
        """``n`` optimizer steps -> (state, {"loss", "grad_norm"} as (n, num_seeds) host arrays).

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
    """A jitted function (state, seed_keys) -> (num_seeds,) bool: finite parameters and a finite
    loss on the batch the seed's next step trains on (that step's own loss: same keys, same dropout).

    Finite parameters alone are not enough: a learning rate far too high
    leaves them finite but so large (1e10) that the logits overflow.
    Costs one forward pass per checkpoint.
    """

    def one_seed(state: steps.TrainState, seed_key) -> jax.Array:
        data_key, dropout_key = steps.step_keys(seed_key, state.step)
        T = exp.model_config.block_size
        x, y = steps.batch(data_key, exp.train_data, exp.config.batch_size, T, exp.batch_sharding)
        loss = steps.loss_fn(state.params, exp.model, x, y, dropout_key, False)
        finite = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(state.params)]
        return jnp.all(jnp.stack(finite)) & jnp.isfinite(loss)

    return jax.jit(steps.over_seeds(one_seed, (0, 0), exp.num_seeds))


def save_checkpoint(p: Progress, checkpoints: Checkpoints, healthy: Callable[[steps.TrainState], np.ndarray]) -> None:
    """Save ``p.state`` as the latest checkpoint if it is good for every seed that has not diverged.

    A seed whose state is not good is marked diverged at the next step (whose
    loss is the one found NaN/Inf) and the rest are saved; when no seed is
    left, raise TrainingDiverged and keep the previous checkpoint.
    """
    for i, ok in enumerate(healthy(p.state)):
        if not ok and p.diverged[i] is None:
            p.diverged[i] = p.step + 1
    if all(d is not None for d in p.diverged):
        raise TrainingDiverged(_diverged_message(p, checkpoints))
    checkpoints.save_latest(p.step, p.state, p.meta())


def _save_on_interrupt(exp: ex.Experiment, p: Progress, checkpoints: Checkpoints) -> None:
    """After Ctrl-C: checkpoint the current state when it is whole, consistent with ``p.step``, and good."""
    if checkpoints.saving or checkpoints.latest_step() == p.step or p.step == 0:
        return  # interrupted inside a save (the previous checkpoint stands), or nothing new to save
    leaves = jax.tree_util.tree_leaves(p.state)
    if any(x.is_deleted() for x in leaves if isinstance(x, jax.Array)):
        return  # interrupted inside a compiled call: the state was donated to it
    if int(np.asarray(jax.device_get(p.state.step))[0]) != p.step:
        return  # interrupted between the new state and the step count
    save_checkpoint(p, checkpoints, lambda state: np.asarray(health_program(exp)(state, exp.seed_keys)))
    print(f"interrupted: saved a checkpoint at step {p.step}", file=sys.stderr)


def train(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    text: str | None = None,
    progress: bool = True,
) -> dict:
    """Train (or resume) the experiment ``config`` in ``workdir``; return the summary.

    Resumes from the latest good checkpoint when the workdir has one; returns
    the stored summary when the run already finished. Holds the workdir's lock
    throughout, and writes nothing before the run is known to be resumable.
    """
    if text is None:
        text = ex.load_dataset(config.data.dataset)
    exp = ex.Experiment.from_config(config, text=text)
    run = RunDir(workdir)
    resolved = to_dict(config)
    fingerprint = dataset_fingerprint(config.data.dataset, text)
    # With several hosts (jax.distributed), every process runs this loop and takes part in
    # checkpointing (orbax coordinates them); only process 0 holds the lock and writes files.
    writer = jax.process_index() == 0
    checkpoints: Checkpoints | None = None
    resumes_from = ""  # unknown until the checkpoints are read

    def last_good() -> str:  # for messages about system faults
        return checkpoints.describe_latest() if checkpoints is not None else resumes_from

    with run.lock(enabled=writer), storage_faults(run.path, last_good):
        run.check_resumable(resolved, exp.tokenizer, fingerprint)
        reader = run.checkpoints(writable=False)
        try:
            p, restored = restore_or_start(exp, reader)
        finally:
            reader.close()
        resumes_from = f"the last good checkpoint is step {p.step}" if restored else "no checkpoint was saved yet"
        if p.step >= config.max_iters and run.has_summary() and (summary := run.read_summary()) is not None:
            print_summary(summary, prefix="already finished: ")
            return summary
        if writer:
            run.write_start(resolved, exp.tokenizer, fingerprint)
            set_aside(run, reader.damaged)
            run.remove_summary()
        checkpoints = run.checkpoints()
        try:
            metrics = run.metrics_writer(exp.seeds, keep_up_to_step=p.step if restored else -1, enabled=writer)
            try:
                with stop_at_safe_point():
                    timing = _loop(exp, p, checkpoints, metrics, progress)
            except KeyboardInterrupt:
                _save_on_interrupt(exp, p, checkpoints)
                raise
            finally:
                metrics.close()
        finally:
            checkpoints.close()
        summary = _summary(exp, p, run, timing)
        if writer:
            run.write_summary(summary)
    print_summary(summary)
    return summary


@dataclass
class Timing:
    start_step: int
    compile_seconds: float = 0.0
    train_seconds: float = 0.0
    wall_start: float = field(default_factory=time.time)
    programs: Programs | None = None


def _loop(exp: ex.Experiment, p: Progress, checkpoints: Checkpoints, metrics: MetricsWriter, progress: bool) -> Timing:
    """Train from ``p.step`` to ``max_iters``: log, evaluate and checkpoint at their intervals."""
    config = exp.config
    timing = Timing(start_step=p.step)
    programs = Programs(exp, p.state)
    timing.programs = programs
    print(f"compiled in {programs.compile_seconds:.1f} s; training from step {p.step} to {config.max_iters}",
          file=sys.stderr)  # fmt: skip
    schedule = steps.learning_rate_schedule(config)
    if p.step == 0:
        evaluate(exp, programs, p, metrics)
    bar = progress_bar(config.max_iters, p.step, enabled=progress)
    tokens_since, time_since = 0, 0.0
    try:
        while p.step < config.max_iters:
            n = next_boundary(p.step, config) - p.step
            t0 = time.perf_counter()
            p.state, out = programs.advance(p.state, n)
            dt = time.perf_counter() - t0
            first, p.step = p.step, p.step + n
            timing.train_seconds += dt
            tokens_since, time_since = tokens_since + n * exp.tokens_per_step, time_since + dt
            bar.update(n)
            _note_divergence(p, out["loss"], first, checkpoints)
            if at(p.step, config.log_interval, config):
                tok_s = tokens_since / max(time_since, 1e-9)
                metrics.write_many(_train_rows(exp, p, out, float(schedule(p.step - 1)), tok_s))
                tokens_since, time_since = 0, 0.0
                bar.set_postfix(loss=f"{np.nanmean(out['loss'][-1]):.4f}", tok_s=f"{tok_s:,.0f}")
            if at(p.step, config.eval_interval, config):
                evaluate(exp, programs, p, metrics, checkpoints)
                bar.write(eval_line(p.step, p.last_eval))
            if at(p.step, config.checkpoint_every, config):
                save_checkpoint(p, checkpoints, programs.healthy)
    finally:
        bar.close()
    timing.compile_seconds = programs.compile_seconds
    return timing


def _note_divergence(p: Progress, losses: np.ndarray, first_step: int, checkpoints: Checkpoints) -> None:
    """Record the first NaN/Inf step of each seed (losses (n, seeds)); stop when every seed diverged."""
    for i in range(losses.shape[1]):
        bad = np.flatnonzero(~np.isfinite(losses[:, i]))
        if p.diverged[i] is None and bad.size:
            p.diverged[i] = first_step + int(bad[0]) + 1
    if all(d is not None for d in p.diverged):
        raise TrainingDiverged(_diverged_message(p, checkpoints))


def _diverged_message(p: Progress, checkpoints: Checkpoints) -> str:
    return f"loss became NaN/Inf at step {min(p.diverged)}; stopped. {checkpoints.describe_latest()} (left intact)"


def _train_rows(exp: ex.Experiment, p: Progress, out: dict, lr: float, tokens_per_s: float) -> list[dict]:
    rows = []
    for i, seed in enumerate(exp.seeds):
        row = {
            "step": p.step,
            "seed": seed,
            "loss": float(out["loss"][-1, i]),
            "lr": lr,
            "grad_norm": float(out["grad_norm"][-1, i]),
            "tokens_per_s": tokens_per_s,
        }
        if p.diverged[i] is not None:
            row["diverged_at"] = p.diverged[i]
        rows.append(row)
    return rows


def evaluate(
    exp: ex.Experiment,
    programs: Programs,
    p: Progress,
    metrics: MetricsWriter,
    checkpoints: Checkpoints | None = None,
) -> None:
    """Evaluate every seed, write the rows, and (given ``checkpoints``) save the seeds' best states."""
    losses = jax.device_get(programs.evaluate(p.state.params))
    p.last_eval = [
        {"step": p.step, "seed": seed, "train_loss": float(losses["train"][i]), "val_loss": float(losses["val"][i])}
        for i, seed in enumerate(exp.seeds)
    ]
    metrics.write_many(p.last_eval)
    if checkpoints is None:
        return
    improved = [row["val_loss"] < p.best_val_loss[i] for i, row in enumerate(p.last_eval)]
    if any(improved):
        for i, row in enumerate(p.last_eval):
            if improved[i]:
                p.best_val_loss[i], p.best_step[i] = row["val_loss"], p.step
        p.best_state = merge_seeds(improved, p.state, p.best_state)
        checkpoints.save_best(p.step, p.best_state, {"best": p.meta()["best"]})


def merge_seeds(take_new: list[bool], new: steps.TrainState, old: steps.TrainState | None) -> steps.TrainState:
    """Per seed, ``new`` where ``take_new`` else ``old``: each seed's best state, one tree."""
    mask = jnp.asarray(take_new)
    if old is None:
        old = new
    # jnp.where always makes new buffers, so the result survives the donation of ``new``.
    return jax.tree_util.tree_map(lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def _summary(exp: ex.Experiment, p: Progress, run: RunDir, timing: Timing) -> dict:
    last = p.last_eval
    if not last:  # resumed at the end (killed before the summary): reuse the final evaluation
        last = [r for r in run.read_metrics() if r["step"] == p.step and "val_loss" in r]
        if len(last) != exp.num_seeds:
            programs = timing.programs or Programs(exp, p.state)
            evaluate(exp, programs, p, MetricsWriter(run, [], enabled=False))
            last = p.last_eval
    samples = write_samples(exp, p.state, run, writer=jax.process_index() == 0)
    full_val = jax.device_get(ex.full_split_loss(exp, p.state.params, exp.val_data))
    return {
        "steps": p.step,
        "seeds": exp.seeds,
        "final_train_loss": [r["train_loss"] for r in last],
        "final_val_loss": [r["val_loss"] for r in last],
        "best_val_loss": p.best_val_loss,
        "full_val_loss": [float(v) for v in full_val],
        "best_step": p.best_step,
        "diverged_at": p.diverged,
        "params": int(sum(x.size for x in jax.tree_util.tree_leaves(p.state.params)) // exp.num_seeds),
        "compile_seconds_this_session": round(timing.compile_seconds, 2),
        "train_seconds_this_session": round(timing.train_seconds, 2),
        "wall_seconds_this_session": round(time.time() - timing.wall_start, 2),
        "tokens_per_s": round((p.step - timing.start_step) * exp.tokens_per_step / max(timing.train_seconds, 1e-9), 1),
        "sample": samples[0][:200],
    }


def write_samples(exp: ex.Experiment, state: steps.TrainState, run: RunDir, writer: bool = True) -> list[str]:
    """Sample ``sample_tokens`` characters from each seed's final params into sample.txt."""
    n = exp.config.sample_tokens
    if n <= 0:
        return [""] * exp.num_seeds
    chars = exp.tokenizer.chars
    prompt = jnp.asarray(exp.tokenizer.encode("\n" if "\n" in chars else chars[0]))[None]  # (1, 1)
    texts = []
    for i in range(exp.num_seeds):
        params = jax.tree_util.tree_map(lambda a: a[i], state.params)
        key = jax.random.fold_in(exp.seed_keys[i], steps.SAMPLE)
        out = generate(exp.model, params, prompt, n, key, temperature=1.0)
        texts.append(exp.tokenizer.decode(out[0]))
    if writer:
        run.write_samples(exp.seeds, texts)
    return texts


def eval_line(step: int, rows: list[dict]) -> str:
    tl = np.mean([r["train_loss"] for r in rows])
    vl = np.mean([r["val_loss"] for r in rows])
    return f"step {step}: train loss {tl:.4f}, val loss {vl:.4f}"


def print_summary(summary: dict, prefix: str = "") -> None:
    def mean(values):  # summary.json holds null where a value was NaN or infinite
        return np.mean([math.nan if v is None else v for v in values])

    fv, bv, full = mean(summary["final_val_loss"]), mean(summary["best_val_loss"]), mean(summary["full_val_loss"])
    print(
        f"{prefix}{summary['steps']} steps, final val loss {fv:.4f} (best {bv:.4f}; whole val split {full:.4f}), "
        f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['train_seconds_this_session']:.1f} s training",
        file=sys.stderr,
    )


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
