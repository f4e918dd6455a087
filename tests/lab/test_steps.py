"""The pure steps: schedule, optimizer, keys, several steps per call, the whole-split loss."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax.lab import experiment as ex
from attention_jax.lab import steps
from attention_jax.lab.config import load_config
from attention_jax.lab.loop import train
from attention_jax.model import cross_entropy
from tests.helpers import assert_same_metrics, run_losses


def nanogpt_lr(it, lr, min_lr, warmup, decay):
    """nanoGPT's get_lr, written out independently."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize("step", [0, 50, 99, 100, 101, 1000, 2500, 4999, 5000, 5001, 9000])
def test_schedule_matches_nanogpt(step):
    config = load_config("configs/shakespeare_char.py")
    got = float(steps.learning_rate_schedule(config)(step))
    want = nanogpt_lr(step, 1e-3, 1e-4, 100, 5000)
    assert got == pytest.approx(want, rel=1e-5)


def test_weight_decay_only_on_matrices(tiny_config):
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}, "ln": {"scale": jnp.ones(4)}}
    mask = steps.decay_mask(params)
    assert mask == {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False}}
    config = tiny_config(learning_rate=0.1, warmup_iters=0, weight_decay=0.5, grad_clip=0.0)
    tx = steps.make_optimizer(config)
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # With zero gradients only weight decay moves parameters: matrices shrink, the rest stay.
    assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0
    assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0
    assert float(jnp.abs(updates["ln"]["scale"]).max()) == 0


def test_weight_decay_follows_names_in_a_real_model_biases_of_any_rank_excluded():
    """A GPT-2-like model: its q/k/v bias (3, H, D) is no matrix; every kernel and embedding is decayed, and for a
    model without q/k/v biases the mask is what the rank rule gave."""
    from attention_jax.model import ModelConfig, TransformerLM

    cfg = ModelConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2, n_layer=1, qkv_bias=True, sinks=True)
    params = jax.eval_shape(lambda: TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    mask = steps.decay_mask(params["params"])
    attn = mask["block_0"]["attn"]
    assert attn["qkv_kernel"] and attn["proj_kernel"] and not attn["qkv_bias"] and not attn["sinks"]
    assert mask["token_embedding"]["embedding"] and mask["positions"]["embedding"] and mask["lm_head"]["kernel"]
    plain = jax.eval_shape(lambda: TransformerLM(cfg.replace(qkv_bias=False, sinks=False)).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]  # fmt: skip
    assert steps.decay_mask(plain) == jax.tree_util.tree_map(lambda p: p.ndim >= 2, plain)


def test_batches_are_a_pure_function_of_seed_and_step():
    key = jax.random.key(3)
    a = steps.step_keys(key, 7)
    b = steps.step_keys(key, 7)
    c = steps.step_keys(key, 8)
    assert all(bool(jnp.all(jax.random.key_data(x) == jax.random.key_data(y))) for x, y in zip(a, b))
    assert not bool(jnp.all(jax.random.key_data(a[0]) == jax.random.key_data(c[0])))
    assert not bool(jnp.all(jax.random.key_data(a[0]) == jax.random.key_data(a[1])))  # data != dropout stream


@pytest.fixture(scope="module")
def experiment(small_text):
    config = load_config("configs/shakespeare_char.py:smoke")  # 2 layers, C 32, T 16, batch 4
    config.warmup_iters = 2  # the losses below cover warmup and decay
    return ex.Experiment.from_config(config, text=small_text())


def test_steps_per_call_gives_the_losses_of_single_steps(experiment):
    one, s1 = run_losses(experiment, 1, 6)
    three, s3 = run_losses(experiment, 3, 2)
    assert one.shape == three.shape == (6,)
    np.testing.assert_allclose(three, one, rtol=1e-5, atol=1e-6)
    assert int(s1.step[0]) == int(s3.step[0]) == 6
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s3.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert one[-1] < one[0]  # it trains


def test_train_step_is_a_plain_function_of_its_arguments(experiment):
    """One step called without any Experiment: model, optimizer and data passed in; equals the jitted program."""
    exp = experiment
    state = ex.init_state(exp)
    one_state = jax.tree_util.tree_map(lambda a: a[0], state)
    member = {"key": jax.random.key(exp.config.seed), "hparams": steps.hparams_of(exp.config)}
    optimizer = functools.partial(steps.make_optimizer, exp.config)
    new, metrics = jax.jit(
        lambda s, m: steps.train_step(
            s, m, model=exp.model, optimizer=optimizer, data=exp.train_data, batch_size=4, block_size=16
        )
    )(one_state, member)
    _, out = ex.train_steps(exp, 1)(state)
    assert int(new.step) == 1 and int(new.diverged_at) == 0
    np.testing.assert_allclose(float(metrics["loss"]), float(out["loss"][0, 0]), rtol=1e-6)


def test_the_objective_is_the_loss_plus_z_loss_times_the_mean_squared_log_normalizer(experiment, rng):
    """Against numpy float64 on the model's own logits; the loss it returns is the next-token loss alone."""
    exp = experiment
    params = jax.tree_util.tree_map(lambda a: a[0], ex.init_state(exp).params)
    x, y = (jnp.asarray(rng.integers(0, exp.tokenizer.vocab_size, (4, 16)), jnp.int32) for _ in range(2))
    logits = np.asarray(exp.model.apply({"params": params}, x), np.float64)  # (B, T, V)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want_loss = np.mean(log_z - np.take_along_axis(logits, np.asarray(y)[..., None], -1)[..., 0])
    for z in (0.0, 1e-4, 0.5):
        objective, loss = steps.objective(params, exp.model, x, y, jax.random.key(0), True, z)
        assert float(loss) == pytest.approx(want_loss, rel=1e-5)
        assert float(objective) == pytest.approx(want_loss + z * np.mean(log_z**2), rel=1e-5)


def test_z_loss_pulls_the_log_normalizer_towards_zero_and_is_a_member_value(tiny_config, small_text):
    """The same run with and without z-loss, as two members of one program: after 30 steps at z_loss 1 the
    mean log² Z on a batch is below a quarter of the plain member's (measured: 1.5 against 9.9)."""
    config = tiny_config(batch_size=4, population=({"z_loss": 0.0}, {"z_loss": 1.0}), learning_rate=1e-2)
    exp = ex.Experiment.from_config(config, text=small_text(3000))
    state, _ = ex.train_steps(exp, 30)(ex.init_state(exp))
    x = exp.train_data[: 4 * 8].reshape(4, 8)
    mean_sq = []
    for i in range(2):
        params = jax.tree_util.tree_map(lambda a: a[i], state.params)
        log_z = jax.nn.logsumexp(exp.model.apply({"params": params}, x), axis=-1)
        mean_sq.append(float(jnp.mean(log_z**2)))
    assert mean_sq[1] < 0.25 * mean_sq[0], mean_sq


def test_full_split_loss_equals_independent_computation(tiny_config, small_text):
    exp = ex.Experiment.from_config(tiny_config(batch_size=4), text=small_text(3000))
    state = ex.init_state(exp)
    got = float(ex.full_split_loss(exp, state.params, exp.val_data)[0])
    params = jax.tree_util.tree_map(lambda a: a[0], state.params)
    val = np.asarray(exp.val_data)
    T = exp.model_config.block_size
    losses = []
    for start in range(0, (len(val) - 1) // T * T, T):  # every complete window, one at a time
        x, y = val[start : start + T], val[start + 1 : start + T + 1]
        logits = exp.model.apply({"params": params}, jnp.asarray(x)[None])[0]
        losses.append(float(cross_entropy(logits, jnp.asarray(y))))
    assert got == pytest.approx(np.mean(losses), rel=1e-5)


def test_seeds_learning_rates_and_texts_of_one_shape_share_one_program(tiny_config, small_text):
    """The members' keys and scalars and the data are arguments of the compiled programs, not constants in them:
    one program (one compilation-cache entry) serves every run of the same shapes. A process keeps its programs
    by ``ProgramKey``: two experiments' keys agree exactly when their freshly built programs are the same."""
    from attention_jax.lab.loop import health_program

    def programs(text, **overrides):
        ex.clear_programs()  # built afresh from this experiment, not taken from an earlier one
        exp = ex.Experiment.from_config(tiny_config(**overrides), text=text)
        state = jax.eval_shape(lambda: ex.init_state(exp))
        return ex.ProgramKey.of(exp), [
            ex.train_program(exp, 2).lower(state, *exp.train_inputs).as_text(),
            ex.eval_program(exp).lower(state.params, *exp.eval_inputs).as_text(),
            health_program(exp).lower(state, *exp.train_inputs).as_text(),
        ]

    text = small_text(3000)
    other_text = text[::-1]  # the same characters (vocabulary) and length, another text
    base_key, base = programs(text)
    key, texts = programs(other_text, seed=7, learning_rate=3e-3, beta2=0.9, warmup_iters=3, weight_decay=0.0)
    assert texts == base and key == base_key
    for static in ({"model.n_embd": 32}, {"grad_clip": 0.5}, {"eval_iters": 3}, {"model.dropout": 0.1}):
        key, texts = programs(text, **static)
        assert texts != base and key != base_key, static  # a shape or a constant of the program: its own
    ex.clear_programs()


@pytest.mark.slow
def test_a_run_takes_the_programs_of_an_earlier_run_of_one_shape_and_trains_as_it_would_alone(
    tmp_path, tiny_config, small_text
):
    text = small_text(3000)
    run = dict(max_iters=6, eval_interval=3, log_interval=1, checkpoint_every=3, eval_iters=2)
    ex.clear_programs()
    train(tiny_config(**run), tmp_path / "first", text=text, progress=False)
    kept = dict(ex._PROGRAMS)
    other = tiny_config(**run, seed=5, learning_rate=3e-3, min_lr=1e-4)
    shared = train(other, tmp_path / "shared", text=text, progress=False)
    new = [k[0] for k in ex._PROGRAMS if k not in kept]
    assert new == ["init"] and all(ex._PROGRAMS[k] is p for k, p in kept.items())  # the initializer's alone
    ex.clear_programs()
    alone = train(other, tmp_path / "alone", text=text, progress=False)
    assert_same_metrics(tmp_path / "shared", tmp_path / "alone", rel=0, abs=0)
    assert shared["final_val_loss"] == alone["final_val_loss"]
