"""Training and evaluation steps: pure functions at module level, jitted where they are used.

Everything here is a function of its arguments: the model, the optimizer and
the data are passed in, never read from an object. Determinism is by
construction: the batch and the dropout key at step s are pure functions of
(seed, s) (``step_keys``), and evaluation uses fixed batches, so a resumed run
does exactly what the uninterrupted one would.

Members: the step functions train one model. ``over_members`` maps them over
a leading member axis of their arguments (``jax.vmap``), so the seeds of a run,
or a whole population of models with their own optimizer values
(:mod:`attention_jax.lab.population`), train in one compiled program. What
makes one member differ from another enters as data, ``member = {"key": its
PRNG key, "hparams": its optimizer scalars}`` (plus ``"attn_scale"`` when the
members' attention scales differ), never as a Python constant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from attention_jax import data as data_lib
from attention_jax import stats
from attention_jax.lab import parts as parts_lib
from attention_jax.lab.parts import Optimizer
from attention_jax.lab.rundir.checkpoints import to_host  # noqa: F401  (re-exported: steps.to_host)
from attention_jax.model import cross_entropy, token_nll

Array = jax.Array

# Independent random streams derived from one seed key.
DATA, DROPOUT, EVAL, INIT, SAMPLE = range(5)


@flax.struct.dataclass
class TrainState:
    step: Array  # () int32: optimizer steps taken
    params: Any
    opt_state: Any
    # () int32: 0 while every loss was finite; else the step whose loss or gradient was not.
    # From then on the member is frozen: its state stays the last finite one.
    diverged_at: Array


# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------


# The optimizer's runtime scalars: what a population's members may set each for themselves.
HPARAM_KEYS = parts_lib.HPARAM_KEYS


def _optimizer_part(optimizer: Optimizer | Any) -> Optimizer:
    if isinstance(optimizer, Optimizer):
        return optimizer
    # Deprecated: an experiment config (ConfigDict); resolve it once with attention_jax.lab.parts.resolve.
    return parts_lib.resolve(optimizer, validate=False).optimizer


def hparams_of(optimizer: Optimizer) -> dict[str, float]:
    """The optimizer scalars: {key: value} for every key of ``HPARAM_KEYS`` (``Optimizer.hparams``)."""
    return _optimizer_part(optimizer).hparams()


def learning_rate(hp: dict[str, Any], step) -> Array:
    """nanoGPT's schedule at ``step``: linear warmup, cosine decay to min_lr, then flat.

    ``hp`` holds the scalars of one member, or (M,) arrays of many (then the result is (M,)).
    """
    lr, min_lr = hp["learning_rate"], hp["min_lr"]
    warmup, decay = hp["warmup_iters"], hp["lr_decay_iters"]
    step = jnp.asarray(step, jnp.float32)
    warm = lr * (step + 1) / (warmup + 1)
    ratio = jnp.clip((step - warmup) / jnp.maximum(decay - warmup, 1), 0.0, 1.0)
    cosine = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (lr - min_lr)
    return jnp.where(step < warmup, warm, jnp.where(step > decay, min_lr, cosine))


def learning_rate_schedule(optimizer: Optimizer) -> Callable[[Array], Array]:
    """The optimizer's schedule, as optax takes it: step -> learning rate."""
    hp = hparams_of(optimizer)
    return lambda step: learning_rate(hp, step)


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices (kernels, embeddings) only, not on biases, norms or per-head scalars.

    By name, not by rank: a q/k/v bias (3, H, D) or a stack of layers' LayerNorm scales (L, C) has two
    axes or more and is still no matrix. For every model before those existed the two rules agree.
    """
    decays = lambda path: str(getattr(path[-1], "key", path[-1])).endswith(("kernel", "embedding"))
    return jax.tree_util.tree_map_with_path(lambda path, p: decays(path), params)


def make_optimizer(optimizer: Optimizer, hp: dict[str, Any] | None = None) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with the warmup + cosine schedule.

    ``hp`` (default: the optimizer's own ``hparams``) gives the schedule and
    AdamW's scalars; inside a step over members they are one member's traced values.
    """
    optimizer = _optimizer_part(optimizer)
    hp = optimizer.hparams() if hp is None else hp
    adamw = optax.adamw(
        learning_rate=lambda step: learning_rate(hp, step),
        b1=hp["beta1"],
        b2=hp["beta2"],
        weight_decay=hp["weight_decay"],
        mask=decay_mask,
    )
    if optimizer.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optimizer.grad_clip), adamw)
    return adamw


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, block_size: int, key: Array) -> TrainState:
    """Fresh parameters and optimizer state of one member (``key``: its PRNG key)."""
    dummy = jnp.zeros((1, block_size), jnp.int32)
    params = model.init(jax.random.fold_in(key, INIT), dummy)["params"]
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), diverged_at=zero)


def abstract_train_state(model, tx, block_size: int, num_members: int, sharding) -> TrainState:
    """Shapes, dtypes and shardings of a (num_members, ...) state, for restoring checkpoints."""
    keys = jnp.stack([jax.random.key(i) for i in range(num_members)])
    shapes = jax.eval_shape(jax.vmap(lambda k: init_train_state(model, tx, block_size, k)), keys)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


# ---------------------------------------------------------------------------
# Steps of one member
# ---------------------------------------------------------------------------


def step_keys(key: Array, step: Array) -> tuple[Array, Array]:
    """The data and dropout keys of one training step: a pure function of (member key, step)."""
    data_key = jax.random.fold_in(jax.random.fold_in(key, DATA), step)
    dropout_key = jax.random.fold_in(jax.random.fold_in(key, DROPOUT), step)
    return data_key, dropout_key


def batch(key: Array, data: Array, batch_size: int, block_size: int, sharding=None) -> tuple[Array, Array]:
    """Random crops x, y (B, T) of ``data``, laid out by ``sharding`` (the batch axis over devices)."""
    x, y = data_lib.get_batch(key, data, batch_size, block_size)
    if sharding is None:
        return x, y
    return jax.lax.with_sharding_constraint(x, sharding), jax.lax.with_sharding_constraint(y, sharding)


def member_model(model: nn.Module, member: dict[str, Any]) -> nn.Module:
    """``model``, with the member's own attention scale when it has one (a runtime number, see ``population``)."""
    if "attn_scale" not in member:
        return model
    return model.clone(model_config=model.model_config.replace(attn_scale=member["attn_scale"]))


def _logits(params: Any, model: nn.Module, x: Array, dropout_key: Array, deterministic: bool) -> Array:
    return model.apply({"params": params}, x, deterministic=deterministic, rngs={"dropout": dropout_key})


def loss_fn(params: Any, model: nn.Module, x: Array, y: Array, dropout_key: Array, deterministic: bool) -> Array:
    """Mean next-token loss of ``model`` on (x, y)."""
    return cross_entropy(_logits(params, model, x, dropout_key, deterministic), y)


def objective(
    params: Any, model: nn.Module, x: Array, y: Array, dropout_key: Array, deterministic: bool, z_loss: Array | float
) -> tuple[Array, Array]:
    """What training minimizes, and the mean next-token loss of ``model`` on (x, y) -> (objective, loss).

    The objective is the loss plus ``z_loss`` times the mean of log² Z over positions, Z the
    normalizer of the output softmax (PaLM, Chowdhery et al. 2022; Wortsman et al. 2023): it
    keeps log Z near 0, against the output-logit divergence of long or high-learning-rate runs.
    """
    logits = _logits(params, model, x, dropout_key, deterministic)
    loss = cross_entropy(logits, y)
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # (B, T)
    return loss + z_loss * jnp.mean(jnp.square(log_z)), loss


def train_step(
    state: TrainState,
    member: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: Callable[[dict[str, Any]], optax.GradientTransformation],
    data: Array,
    batch_size: int,
    block_size: int,
    batch_sharding=None,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer step of one member -> (new state, {"loss", "grad_norm"}).

    The gradient is the ``objective``'s (the loss plus the member's ``z_loss`` term); "loss" is the
    next-token loss alone, comparable between runs with and without z-loss.
    ``member`` is {"key": its PRNG key, "hparams": its optimizer scalars};
    ``optimizer(hparams)`` builds its optax transformation. A loss or gradient
    that is not finite freezes the member: the update is dropped, ``diverged_at``
    records the step, and the state stays the last finite one from then on.
    """
    data_key, dropout_key = step_keys(member["key"], state.step)
    x, y = batch(data_key, data, batch_size, block_size, batch_sharding)
    z_loss = member["hparams"]["z_loss"]
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (_, loss), grads = grad_fn(state.params, member_model(model, member), x, y, dropout_key, False, z_loss)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer(member["hparams"]).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = finite & (state.diverged_at == 0)
    step = state.step + 1
    new = TrainState(
        step=step,
        params=jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), params, state.params),
        opt_state=jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), opt_state, state.opt_state),
        diverged_at=jnp.where((state.diverged_at == 0) & ~finite, step, state.diverged_at),
    )
    return new, {"loss": loss, "grad_norm": grad_norm}


def eval_loss(
    params: Any,
    member: dict[str, Any],
    data: Array,
    *,
    model: nn.Module,
    batch_size: int,
    block_size: int,
    eval_iters: int,
    batch_sharding=None,
) -> Array:
    """Mean loss over ``eval_iters`` fixed batches of ``data`` (the same batches at every evaluation) -> ()."""
    model = member_model(model, member)

    def one(i):
        x, y = eval_batch(member, i, data, batch_size, block_size, batch_sharding)
        return loss_fn(params, model, x, y, jax.random.fold_in(member["key"], EVAL), True)

    return jnp.mean(jax.lax.map(one, jnp.arange(eval_iters)))


def eval_batch(member: dict[str, Any], i, data: Array, batch_size: int, block_size: int, sharding=None):
    """A member's i-th fixed evaluation batch of ``data`` (the same at every evaluation): (x, y)."""
    return batch(jax.random.fold_in(jax.random.fold_in(member["key"], EVAL), i), data, batch_size, block_size, sharding)


# The stability diagnostics' sample: the first rows of the first fixed evaluation batch, at most this
# long (their dense twin materializes (rows, H, T, T) weights per layer).
DIAGNOSTIC_ROWS, DIAGNOSTIC_MAX_T = 4, 512


def eval_diagnostics(
    params: Any, member: dict[str, Any], data: Array, *, model: nn.Module, batch_size: int, block_size: int
) -> dict[str, Array]:
    """``stats.stability_diagnostics`` of a member on the same validation rows at every evaluation."""
    x, _ = eval_batch(member, 0, data, batch_size, block_size)
    x = x[:DIAGNOSTIC_ROWS, :DIAGNOSTIC_MAX_T]
    return stats.stability_diagnostics(member_model(model, member), params, x)


def full_split_loss(
    params: Any,
    data: Array,
    *,
    model: nn.Module,
    batch_size: int,
    block_size: int,
    member: dict[str, Any] | None = None,
) -> Array:
    """Mean loss over a whole split, as non-overlapping windows of block_size -> ().

    Unlike the ``eval_iters`` random-crop estimate, this has no sampling
    noise: every token of the split (but the first) is predicted exactly once.
    ``member`` (optional) gives the model its member's attention scale.
    """
    model = member_model(model, member or {})
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
# Over members, over steps
# ---------------------------------------------------------------------------


def over_members(fn: Callable, in_axes: tuple, num_members: int, mesh_axis: str | None = None) -> Callable:
    """``fn`` mapped over the leading member axis of the arguments whose ``in_axes`` is 0.

    The outputs get a leading member axis too. With one member the axis is
    stripped and re-added instead of vmapped (same result, simpler program).
    ``mesh_axis`` names the device-mesh axis the member axis is laid on.
    """
    if num_members > 1:
        return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=mesh_axis)

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
