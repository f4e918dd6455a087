"""Training and evaluation steps: pure functions at module level, jitted where they are used.

Everything here is a function of its arguments: the model, the optimizer and
the data are passed in, never read from an object. Determinism is by
construction: the batch and the dropout key at step s are pure functions of
(seed, s) (``step_keys``), and evaluation uses fixed batches, so a resumed run
does exactly what the uninterrupted one would.

Seeds: ``over_seeds`` maps a one-seed function over a leading seed axis of
its arguments (``jax.vmap``), so K seeds train in one compiled program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from attention_jax import data as data_lib
from attention_jax.model import cross_entropy, token_nll

Array = jax.Array

# Independent random streams derived from one seed key.
DATA, DROPOUT, EVAL, INIT, SAMPLE = range(5)


@flax.struct.dataclass
class TrainState:
    step: Array  # () int32
    params: Any
    opt_state: Any


# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, block_size: int, seed_key: Array):
    """Fresh parameters and optimizer state of one seed."""
    dummy = jnp.zeros((1, block_size), jnp.int32)
    params = model.init(jax.random.fold_in(seed_key, INIT), dummy)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_train_state(model, tx, block_size: int, num_seeds: int, sharding) -> TrainState:
    """Shapes, dtypes and shardings of a (num_seeds, ...) state, for restoring checkpoints."""
    keys = jnp.stack([jax.random.key(i) for i in range(num_seeds)])
    shapes = jax.eval_shape(jax.vmap(lambda k: init_train_state(model, tx, block_size, k)), keys)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


# ---------------------------------------------------------------------------
# Steps of one seed
# ---------------------------------------------------------------------------


def step_keys(seed_key: Array, step: Array) -> tuple[Array, Array]:
    """The data and dropout keys of one training step: a pure function of (seed, step)."""
    data_key = jax.random.fold_in(jax.random.fold_in(seed_key, DATA), step)
    dropout_key = jax.random.fold_in(jax.random.fold_in(seed_key, DROPOUT), step)
    return data_key, dropout_key


def batch(key: Array, data: Array, batch_size: int, block_size: int, sharding=None) -> tuple[Array, Array]:
    """Random crops x, y (B, T) of ``data``, laid out by ``sharding`` (the batch axis over devices)."""
    x, y = data_lib.get_batch(key, data, batch_size, block_size)
    if sharding is None:
        return x, y
    return jax.lax.with_sharding_constraint(x, sharding), jax.lax.with_sharding_constraint(y, sharding)


def loss_fn(params: Any, model: nn.Module, x: Array, y: Array, dropout_key: Array, deterministic: bool) -> Array:
    """Mean next-token loss of ``model`` on (x, y)."""
    logits = model.apply({"params": params}, x, deterministic=deterministic, rngs={"dropout": dropout_key})
    return cross_entropy(logits, y)


def train_step(
    state: TrainState,
    seed_key: Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    data: Array,
    batch_size: int,
    block_size: int,
    batch_sharding=None,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer step of one seed on its batch of this step -> (new state, {"loss", "grad_norm"})."""
    data_key, dropout_key = step_keys(seed_key, state.step)
    x, y = batch(data_key, data, batch_size, block_size, batch_sharding)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, model, x, y, dropout_key, False)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def eval_loss(
    params: Any,
    seed_key: Array,
    data: Array,
    *,
    model: nn.Module,
    batch_size: int,
    block_size: int,
    eval_iters: int,
    batch_sharding=None,
) -> Array:
    """Mean loss over ``eval_iters`` fixed batches of ``data`` (the same batches at every evaluation) -> ()."""
    eval_key = jax.random.fold_in(seed_key, EVAL)

    def one(i):
        x, y = batch(jax.random.fold_in(eval_key, i), data, batch_size, block_size, batch_sharding)
        return loss_fn(params, model, x, y, eval_key, True)

    return jnp.mean(jax.lax.map(one, jnp.arange(eval_iters)))


def full_split_loss(params: Any, data: Array, *, model: nn.Module, batch_size: int, block_size: int) -> Array:
    """Mean loss over a whole split, as non-overlapping windows of block_size -> ().

    Unlike the ``eval_iters`` random-crop estimate, this has no sampling
    noise: every token of the split (but the first) is predicted exactly once.
    """
    T, B = block_size, batch_size
    n_windows = (data.shape[0] - 1) // T
    n_chunks = -(-n_windows // B)
    pad = n_chunks * B - n_windows
    x = jnp.pad(data[: n_windows * T].reshape(n_windows, T), ((0, pad), (0, 0)))
    y = jnp.pad(data[1 : n_windows * T + 1].reshape(n_windows, T), ((0, pad), (0, 0)))
    weight = jnp.pad(jnp.ones((n_windows,), jnp.float32), (0, pad))
    chunks = (x.reshape(n_chunks, B, T), y.reshape(n_chunks, B, T), weight.reshape(n_chunks, B))

    def chunk_loss(chunk):
        xc, yc, wc = chunk
        nll = token_nll(model.apply({"params": params}, xc), yc).mean(axis=-1)  # (B,)
        return jnp.sum(nll * wc)

    return jnp.sum(jax.lax.map(chunk_loss, chunks)) / n_windows


# ---------------------------------------------------------------------------
# Over seeds, over steps
# ---------------------------------------------------------------------------


def over_seeds(fn: Callable, in_axes: tuple, num_seeds: int) -> Callable:
    """``fn`` mapped over the leading seed axis of the arguments whose ``in_axes`` is 0.

    The outputs get a leading seed axis too. With one seed the axis is
    stripped and re-added instead of vmapped (same result, simpler program).
    """
    if num_seeds > 1:
        return jax.vmap(fn, in_axes=in_axes)

    def single(*args):
        args = [jax.tree_util.tree_map(lambda a: a[0], a) if ax == 0 else a for a, ax in zip(args, in_axes)]
        return jax.tree_util.tree_map(lambda a: a[None], fn(*args))

    return single


def repeat(step: Callable, num_steps: int) -> Callable:
    """``step(state) -> (state, metrics)`` applied ``num_steps`` times in one ``lax.scan``.

    Metrics come back stacked with a leading (num_steps,) axis. Several steps
    per compiled call cut per-call dispatch overhead; the result equals single steps.
    """

    def many(state):
        return jax.lax.scan(lambda s, _: step(s), state, None, length=num_steps)

    return many
