"""Training: optimizer, pure train/eval steps, and the resumable training loop.

Data flow: config -> (ModelConfig, data, optimizer) -> ``Trainer`` (compiled
steps) -> ``train`` loop -> workdir (config.json, metrics.jsonl, checkpoints,
tokenizer.json, sample.txt, summary.json).

Determinism is by construction: the batch and the dropout key at step s are
pure functions of (seed, s), and evaluation uses fixed batches. A run resumed
from a checkpoint therefore does exactly what the uninterrupted run would.

Seeds: ``num_seeds = K`` trains K independent models (seeds seed, seed+1, ...)
in one compiled program with ``jax.vmap`` over params, optimizer state and
keys. Every state leaf carries a leading seed axis (K, ...).

Devices: the batch axis is sharded over a 1-D ``data`` mesh of all devices and
parameters are replicated; XLA inserts the gradient all-reduce. The same code
runs on 1 CPU, simulated CPU devices, or a TPU slice.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attention_jax import checkpoint as ckpt
from attention_jax import data as data_lib
from attention_jax.config_utils import ConfigError, to_dict
from attention_jax.generate import generate
from attention_jax.metrics import MetricsWriter, flops_per_token, read_jsonl
from attention_jax.model import BigramLM, ModelConfig, TransformerLM

Array = jax.Array

# Independent random streams derived from one seed key.
_DATA, _DROPOUT, _EVAL, _INIT, _SAMPLE = range(5)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


@flax.struct.dataclass
class TrainState:
    step: Array  # () int32
    params: Any
    opt_state: Any


# ---------------------------------------------------------------------------
# Config -> model, optimizer
# ---------------------------------------------------------------------------


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """The frozen ModelConfig described by ``config.model``; errors name the field."""
    m = config.model
    scale = m.attn_scale
    if isinstance(scale, str):
        try:
            scale = float(scale)
        except ValueError:
            pass
    # config.model holds every ModelConfig field by the same name (defaults.base_config), plus "type".
    kwargs = {f.name: m[f.name] for f in fields(ModelConfig) if f.name != "vocab_size"}
    try:
        return ModelConfig(vocab_size=vocab_size, **{**kwargs, "attn_scale": scale})
    except ValueError as e:
        raise ConfigError(str(e).replace("ModelConfig.", "model.")) from None


def build_model(config: ml_collections.ConfigDict, mcfg: ModelConfig) -> nn.Module:
    kind = config.model.type
    if kind == "transformer":
        return TransformerLM(mcfg)
    if kind == "bigram":
        return BigramLM(mcfg.vocab_size)
    raise ConfigError(f"model.type must be 'transformer' or 'bigram', got {kind!r}")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> Callable[[Array], Array]:
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr, then flat."""
    lr, min_lr = config.learning_rate, config.min_lr
    warmup, decay = config.warmup_iters, config.lr_decay_iters

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * (step + 1) / (warmup + 1)
        ratio = jnp.clip((step - warmup) / max(decay - warmup, 1), 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (lr - min_lr)
        return jnp.where(step < warmup, warm, jnp.where(step > decay, min_lr, cosine))

    return schedule


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices (kernels, embeddings) only, not on biases or norms."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with the warmup + cosine schedule."""
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(config),
        b1=config.beta1,
        b2=config.beta2,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw


def cross_entropy(logits: Array, targets: Array) -> Array:
    """Mean next-token loss: logits (..., T, V), integer targets (..., T) -> ()."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# ---------------------------------------------------------------------------
# Validation of the experiment config (before any compute)
# ---------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first field whose value cannot work."""

    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ConfigError(f"{key}={_get(config, key)!r}: {what}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for key in (
        "batch_size",
        "eval_interval",
        "eval_iters",
        "checkpoint_every",
        "steps_per_call",
        "num_seeds",
        "log_interval",
    ):
        need(is_int(_get(config, key)) and _get(config, key) > 0, key, "must be a positive integer")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "seed"):
        need(is_int(_get(config, key)) and _get(config, key) >= 0, key, "must be a non-negative integer")
    need(config.learning_rate > 0 and math.isfinite(config.learning_rate), "learning_rate", "must be positive")
    need(0 <= config.min_lr <= config.learning_rate, "min_lr", "must be in [0, learning_rate]")
    need(config.weight_decay >= 0, "weight_decay", "must be non-negative")
    need(0 <= config.beta1 < 1, "beta1", "must be in [0, 1)")
    need(0 <= config.beta2 < 1, "beta2", "must be in [0, 1)")
    need(config.grad_clip >= 0, "grad_clip", "must be non-negative (0 disables clipping)")
    need(0 < config.data.train_fraction < 1, "data.train_fraction", "must be in (0, 1)")
    n_dev = jax.device_count()
    need(config.batch_size % n_dev == 0, "batch_size", f"must be divisible by the {n_dev} devices")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


# ---------------------------------------------------------------------------
# The experiment: data, model, compiled steps
# ---------------------------------------------------------------------------


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, block_size: int, seed_key: Array):
    """Fresh parameters and optimizer state of one seed."""
    dummy = jnp.zeros((1, block_size), jnp.int32)
    params = model.init(jax.random.fold_in(seed_key, _INIT), dummy)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_train_state(model, tx, block_size: int, num_seeds: int, sharding) -> TrainState:
    """Shapes, dtypes and shardings of a (num_seeds, ...) state, for restoring checkpoints."""
    keys = jnp.stack([jax.random.key(i) for i in range(num_seeds)])
    shapes = jax.eval_shape(jax.vmap(lambda k: init_train_state(model, tx, block_size, k)), keys)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def step_keys(seed_key: Array, step: Array) -> tuple[Array, Array]:
    """The data and dropout keys of one training step: a pure function of (seed, step)."""
    data_key = jax.random.fold_in(jax.random.fold_in(seed_key, _DATA), step)
    dropout_key = jax.random.fold_in(jax.random.fold_in(seed_key, _DROPOUT), step)
    return data_key, dropout_key


@dataclass
class Trainer:
    """Everything one experiment needs, built once from a config: data, model, compiled steps."""

    config: ml_collections.ConfigDict
    tokenizer: data_lib.CharTokenizer
    mcfg: ModelConfig
    model: nn.Module
    tx: optax.GradientTransformation
    mesh: Mesh
    train_data: Array
    val_data: Array
    seed_keys: Array  # (K,) typed PRNG keys, one per seed

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, text: str | None = None) -> "Trainer":
        validate(config)
        if text is None:
            text = data_lib.load_text(config.data.dataset)
        tokenizer, train, val = data_lib.prepare(text, config.data.train_fraction)
        mcfg = model_config(config, tokenizer.vocab_size)
        model = build_model(config, mcfg)
        T = mcfg.block_size
        for name, split_ in (("training", train), ("validation", val)):
            if split_.shape[0] <= T + 1:
                raise ConfigError(
                    f"model.block_size={T} is too long for the {name} split ({split_.shape[0]} tokens); "
                    "use a shorter block_size or a longer text"
                )
        mesh = Mesh(np.array(jax.devices()), ("data",))
        replicated = NamedSharding(mesh, P())
        seeds = [config.seed + i for i in range(config.num_seeds)]
        seed_keys = jnp.stack([jax.random.key(s) for s in seeds])
        return cls(
            config=config,
            tokenizer=tokenizer,
            mcfg=mcfg,
            model=model,
            tx=make_optimizer(config),
            mesh=mesh,
            train_data=jax.device_put(train, replicated),
            val_data=jax.device_put(val, replicated),
            seed_keys=seed_keys,
        )

    # -- sizes ------------------------------------------------------------
    @property
    def num_seeds(self) -> int:
        return self.config.num_seeds

    @property
    def seeds(self) -> list[int]:
        return [self.config.seed + i for i in range(self.num_seeds)]

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step consumes, over all seeds."""
        return self.num_seeds * self.config.batch_size * self.mcfg.block_size

    # -- pure functions of one seed ----------------------------------------
    def _init_one(self, seed_key: Array) -> TrainState:
        return init_train_state(self.model, self.tx, self.mcfg.block_size, seed_key)

    def _batch(self, key: Array, data: Array) -> tuple[Array, Array]:
        x, y = data_lib.get_batch(key, data, self.config.batch_size, self.mcfg.block_size)
        batch_sharding = NamedSharding(self.mesh, P("data"))
        return jax.lax.with_sharding_constraint(x, batch_sharding), jax.lax.with_sharding_constraint(y, batch_sharding)

    def _loss(self, params, x, y, dropout_key, deterministic):
        logits = self.model.apply({"params": params}, x, deterministic=deterministic, rngs={"dropout": dropout_key})
        return cross_entropy(logits, y)

    def _train_step_one(self, state: TrainState, seed_key: Array) -> tuple[TrainState, dict]:
        data_key, dropout_key = step_keys(seed_key, state.step)
        x, y = self._batch(data_key, self.train_data)
        loss, grads = jax.value_and_grad(self._loss)(state.params, x, y, dropout_key, False)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def _eval_one(self, params: Any, seed_key: Array, data: Array) -> Array:
        eval_key = jax.random.fold_in(seed_key, _EVAL)

        def one(i):
            x, y = self._batch(jax.random.fold_in(eval_key, i), data)
            return self._loss(params, x, y, eval_key, True)

        return jnp.mean(jax.lax.map(one, jnp.arange(self.config.eval_iters)))

    # -- compiled, over all seeds ------------------------------------------
    def _over_seeds(self, fn: Callable, in_axes) -> Callable:
        """vmap ``fn`` over the leading seed axis (a plain call when there is one seed)."""
        if self.num_seeds > 1:
            return jax.vmap(fn, in_axes=in_axes)

        def single(*args):
            args = [jax.tree_util.tree_map(lambda a: a[0], a) if ax == 0 else a for a, ax in zip(args, in_axes)]
            return jax.tree_util.tree_map(lambda a: a[None], fn(*args))

        return single

    def init_state(self) -> TrainState:
        replicated = NamedSharding(self.mesh, P())
        init = jax.jit(self._over_seeds(self._init_one, (0,)), out_shardings=replicated)
        return init(self.seed_keys)

    def compile_train(self, num_steps: int) -> Callable[[TrainState], tuple[TrainState, dict]]:
        """A compiled function doing ``num_steps`` optimizer steps (a ``lax.scan``).

        Returns per-step metrics stacked as (num_steps, K). Several steps per
        call cut per-call dispatch overhead; the result equals single steps.
        """
        step = self._over_seeds(self._train_step_one, (0, 0))
        seed_keys = self.seed_keys

        def many(state):
            def body(s, _):
                return step(s, seed_keys)

            return jax.lax.scan(body, state, None, length=num_steps)

        replicated = NamedSharding(self.mesh, P())
        return jax.jit(many, out_shardings=replicated, donate_argnums=0)

    def compile_eval(self) -> Callable[[Any], dict]:
        """Mean loss over ``eval_iters`` fixed batches of each split -> {"train": (K,), "val": (K,)}."""
        ev = self._over_seeds(self._eval_one, (0, 0, None))

        def evaluate(params):
            return {
                "train": ev(params, self.seed_keys, self.train_data),
                "val": ev(params, self.seed_keys, self.val_data),
            }

        return jax.jit(evaluate)

    def full_split_loss(self, params: Any, data: Array) -> Array:
        """Mean loss over a whole split, as non-overlapping windows of block_size -> (K,).

        Unlike the ``eval_iters`` random-crop estimate, this has no sampling
        noise: every token of the split (but the first) is predicted exactly once.
        """
        T, B = self.mcfg.block_size, self.config.batch_size
        n_windows = (data.shape[0] - 1) // T
        n_chunks = -(-n_windows // B)
        pad = n_chunks * B - n_windows
        x = jnp.pad(data[: n_windows * T].reshape(n_windows, T), ((0, pad), (0, 0)))
        y = jnp.pad(data[1 : n_windows * T + 1].reshape(n_windows, T), ((0, pad), (0, 0)))
        weight = jnp.pad(jnp.ones((n_windows,), jnp.float32), (0, pad))
        chunks = (x.reshape(n_chunks, B, T), y.reshape(n_chunks, B, T), weight.reshape(n_chunks, B))

        def one_seed(params):
            def chunk_loss(chunk):
                xc, yc, wc = chunk
                logits = self.model.apply({"params": params}, xc)
                nll = optax.softmax_cross_entropy_with_integer_labels(logits, yc).mean(axis=-1)  # (B,)
                return jnp.sum(nll * wc)

            return jnp.sum(jax.lax.map(chunk_loss, chunks)) / n_windows

        return jax.jit(self._over_seeds(one_seed, (0,)))(params)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, for restoring checkpoints."""
        replicated = NamedSharding(self.mesh, P())
        return abstract_train_state(self.model, self.tx, self.mcfg.block_size, self.num_seeds, replicated)

    def flops_per_step(self) -> float:
        """Model FLOPs of one optimizer step (forward + backward), all seeds."""
        return flops_per_token(self.mcfg, self.config.model.type) * self.tokens_per_step


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def _summary_path(workdir: Path) -> Path:
    return workdir / "summary.json"


def _check_same_config(workdir: Path, resolved: dict) -> None:
    """Refuse to resume a workdir that holds a run of a different config."""
    path = workdir / "config.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    may_change = {"max_iters", "checkpoint_every", "log_interval", "steps_per_call", "sample_tokens"}
    diffs = []

    def walk(a, b, prefix=""):
        for key in sorted(set(a) | set(b)):
            full = prefix + key
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                walk(a[key], b[key], full + ".")
            elif a.get(key) != b.get(key) and full not in may_change:
                diffs.append(f"{full}: {a.get(key)!r} -> {b.get(key)!r}")

    walk(old, resolved)
    if diffs:
        raise ConfigError(
            f"workdir {workdir} holds a run with a different config ({'; '.join(diffs[:3])}); "
            "use a new --workdir, or delete this one to start over"
        )


def _next_boundary(step: int, config: ml_collections.ConfigDict) -> int:
    """The next step at which the loop must stop to log, evaluate or checkpoint."""
    candidates = [config.max_iters]
    for every in (config.log_interval, config.eval_interval, config.checkpoint_every):
        candidates.append((step // every + 1) * every)
    return min(candidates)


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
    workdir = Path(workdir).absolute()
    trainer = Trainer.from_config(config, text=text)
    resolved = to_dict(config)
    _check_same_config(workdir, resolved)
    workdir.mkdir(parents=True, exist_ok=True)
    # With several hosts (jax.distributed), every process runs this loop and takes
    # part in checkpointing (orbax coordinates them); only process 0 writes files.
    writer = jax.process_index() == 0
    if writer:
        (workdir / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True))
        trainer.tokenizer.save(workdir / "tokenizer.json")

    manager = ckpt.Checkpoints(workdir)
    restored = manager.restore_latest(trainer.abstract_state())
    best_state = None  # per seed, the state at that seed's best val loss so far
    if restored is not None:
        state, meta = restored
        start = int(state.step[0])
        best = meta["best"]
        diverged = meta.get("diverged", [None] * trainer.num_seeds)
        restored_best = manager.restore_best(trainer.abstract_state())
        best_state = restored_best[0] if restored_best is not None else None
    else:
        state, start = trainer.init_state(), 0
        best = {"val_loss": [math.inf] * trainer.num_seeds, "step": [None] * trainer.num_seeds}
        diverged = [None] * trainer.num_seeds
    summary_file = _summary_path(workdir)
    if start >= config.max_iters and summary_file.exists():
        summary = json.loads(summary_file.read_text())
        _print_summary(summary, prefix="already finished: ")
        return summary
    if writer:
        summary_file.unlink(missing_ok=True)

    metrics = MetricsWriter(workdir / "metrics.jsonl", keep_up_to_step=start if restored else -1, enabled=writer)
    schedule = learning_rate_schedule(config)
    t_compile = time.perf_counter()
    evaluate = trainer.compile_eval().lower(state.params).compile()
    K = config.steps_per_call
    step_k = trainer.compile_train(K).lower(state).compile()
    # Single steps are needed only when a log/eval/checkpoint boundary splits a call of K
    # steps; the shipped configs never do that, so that program is compiled on first use.
    step_1 = step_k if K == 1 else None
    compile_s = time.perf_counter() - t_compile
    print(f"compiled in {compile_s:.1f} s; training from step {start} to {config.max_iters}", file=sys.stderr)

    def run_eval(state, step):
        losses = jax.device_get(evaluate(state.params))
        rows = []
        for i, seed in enumerate(trainer.seeds):
            tl, vl = float(losses["train"][i]), float(losses["val"][i])
            rows.append({"step": step, "seed": seed, "train_loss": tl, "val_loss": vl})
        metrics.write_many(rows)
        return rows

    t_start = time.time()
    train_time, tokens_since, time_since = 0.0, 0, 0.0
    last_rows: list[dict] = []
    if start == 0:
        last_rows = run_eval(state, 0)
    bar = _progress_bar(config.max_iters, start, enabled=progress)
    step = start
    try:
        while step < config.max_iters:
            n = _next_boundary(step, config) - step
            if n % K and step_1 is None:
                t_compile = time.perf_counter()
                step_1 = trainer.compile_train(1).lower(state).compile()
                compile_s += time.perf_counter() - t_compile
            t0 = time.perf_counter()
            chunk = []
            while n > 0:
                fn, m = (step_k, K) if n >= K else (step_1, 1)
                state, out = fn(state)
                chunk.append(out)
                n -= m
            out = jax.device_get(chunk)
            dt = time.perf_counter() - t0
            losses = np.concatenate([o["loss"] for o in out])  # (steps, seeds)
            grad_norms = np.concatenate([o["grad_norm"] for o in out])
            first_step = step
            step += losses.shape[0]
            train_time += dt
            tokens_since += losses.shape[0] * trainer.tokens_per_step
            time_since += dt
            bar.update(losses.shape[0])
            for i in range(trainer.num_seeds):
                bad = np.flatnonzero(~np.isfinite(losses[:, i]))
                if diverged[i] is None and bad.size:
                    diverged[i] = first_step + int(bad[0]) + 1
            if all(d is not None for d in diverged):
                raise TrainingDiverged(
                    f"loss became NaN/Inf at step {min(diverged)}; stopped. {manager.describe_latest()} (left intact)"
                )
            if step % config.log_interval == 0 or step == config.max_iters:
                tok_s = tokens_since / max(time_since, 1e-9)
                rows = []
                for i, seed in enumerate(trainer.seeds):
                    row = {
                        "step": step,
                        "seed": seed,
                        "loss": float(losses[-1, i]),
                        "lr": float(schedule(step - 1)),
                        "grad_norm": float(grad_norms[-1, i]),
                        "tokens_per_s": tok_s,
                    }
                    if diverged[i] is not None:
                        row["diverged_at"] = diverged[i]
                    rows.append(row)
                metrics.write_many(rows)
                tokens_since, time_since = 0, 0.0
                bar.set_postfix(loss=f"{np.nanmean(losses[-1]):.4f}", tok_s=f"{tok_s:,.0f}")
            if step % config.eval_interval == 0 or step == config.max_iters:
                last_rows = run_eval(state, step)
                improved = [row["val_loss"] < best["val_loss"][i] for i, row in enumerate(last_rows)]
                if any(improved):
                    for i, row in enumerate(last_rows):
                        if improved[i]:
                            best["val_loss"][i], best["step"][i] = row["val_loss"], step
                    best_state = _merge_seeds(improved, state, best_state)
                    manager.save_best(step, best_state, {"best": best})
                bar.write(_eval_line(step, last_rows))
            if step % config.checkpoint_every == 0 or step == config.max_iters:
                manager.save_latest(step, state, {"best": best, "diverged": diverged})
    finally:
        bar.close()
        metrics.close()
        manager.close()

    if not last_rows:  # resumed at the end (killed before the summary): reuse the final evaluation
        last_rows = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["step"] == step and "val_loss" in r]
        if len(last_rows) != trainer.num_seeds:
            last_rows = run_eval(state, step)
    samples = _write_sample(trainer, state, workdir, writer)
    summary = {
        "steps": step,
        "seeds": trainer.seeds,
        "final_train_loss": [r["train_loss"] for r in last_rows],
        "final_val_loss": [r["val_loss"] for r in last_rows],
        "best_val_loss": best["val_loss"],
        "full_val_loss": [float(v) for v in jax.device_get(trainer.full_split_loss(state.params, trainer.val_data))],
        "best_step": best["step"],
        "diverged_at": diverged,
        "params": int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)) // trainer.num_seeds),
        "compile_seconds_this_session": round(compile_s, 2),
        "train_seconds_this_session": round(train_time, 2),
        "wall_seconds_this_session": round(time.time() - t_start, 2),
        "tokens_per_s": round((step - start) * trainer.tokens_per_step / max(train_time, 1e-9), 1),
        "sample": samples[0][:200],
    }
    if writer:
        summary_file.write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    return summary


def _merge_seeds(take_new: list[bool], new: TrainState, old: TrainState | None) -> TrainState:
    """Per seed, ``new`` where ``take_new`` else ``old``: each seed's best state, one tree."""
    mask = jnp.asarray(take_new)
    if old is None:
        old = new
    # jnp.where always makes new buffers, so the result survives the donation of ``new``.
    return jax.tree_util.tree_map(lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def _eval_line(step: int, rows: list[dict]) -> str:
    tl = np.mean([r["train_loss"] for r in rows])
    vl = np.mean([r["val_loss"] for r in rows])
    return f"step {step}: train loss {tl:.4f}, val loss {vl:.4f}"


def _print_summary(summary: dict, prefix: str = "") -> None:
    fv = np.mean(summary["final_val_loss"])
    bv = np.mean(summary["best_val_loss"])
    full = np.mean(summary["full_val_loss"])
    print(
        f"{prefix}{summary['steps']} steps, final val loss {fv:.4f} (best {bv:.4f}; whole val split {full:.4f}), "
        f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['train_seconds_this_session']:.1f} s training",
        file=sys.stderr,
    )


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def _write_sample(trainer: Trainer, state: TrainState, workdir: Path, writer: bool = True) -> list[str]:
    """Sample text from each seed's final params into sample.txt."""
    n = trainer.config.sample_tokens
    if n <= 0:
        return [""] * trainer.num_seeds
    texts = []
    prompt = jnp.asarray(
        trainer.tokenizer.encode("\n" if "\n" in trainer.tokenizer.chars else trainer.tokenizer.chars[0])
    )
    for i in range(trainer.num_seeds):
        params = jax.tree_util.tree_map(lambda a: a[i], state.params)
        key = jax.random.fold_in(trainer.seed_keys[i], _SAMPLE)
        out = generate(trainer.model, params, prompt[None], n, key, temperature=1.0)
        texts.append(trainer.tokenizer.decode(out[0]))
    if not writer:
        return texts
    with open(workdir / "sample.txt", "w", encoding="utf-8") as f:
        for seed, text in zip(trainer.seeds, texts):
            f.write(f"=== seed {seed} ===\n{text}\n")
    return texts


# Re-exported for callers that only want the pure pieces.
__all__ = [
    "TrainState",
    "Trainer",
    "TrainingDiverged",
    "cross_entropy",
    "decay_mask",
    "learning_rate_schedule",
    "make_optimizer",
    "model_config",
    "step_keys",
    "train",
    "validate",
]
