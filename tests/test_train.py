"""The training library: schedule, optimizer, config checks, loop, resume, divergence."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import train as train_lib
from attention_jax.config_utils import ConfigError, apply_overrides, load_config, parse_override_args
from attention_jax.metrics import read_jsonl

SMOKE = "configs/shakespeare_char.py:smoke"


def small_text(n_chars: int = 6000, seed: int = 0) -> str:
    """A deterministic pseudo-English text with some structure to learn."""
    rng = np.random.default_rng(seed)
    words = ["the", "king", "queen", "shall", "not", "be", "my", "lord", "good", "night", "and", "to"]
    out = []
    while sum(len(w) + 1 for w in out) < n_chars:
        out.append(words[rng.integers(len(words))])
        if rng.random() < 0.1:
            out[-1] += ".\n"
    return " ".join(out)[:n_chars]


def tiny_config(**overrides):
    config = load_config(SMOKE)
    apply_overrides(config, {"model.block_size": 8, "model.n_embd": 16, "model.n_layer": 1, "sample_tokens": 0})
    apply_overrides(config, overrides)
    return config


# ---------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------


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
    got = float(train_lib.learning_rate_schedule(config)(step))
    want = nanogpt_lr(step, 1e-3, 1e-4, 100, 5000)
    assert got == pytest.approx(want, rel=1e-5)


def test_weight_decay_only_on_matrices():
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}, "ln": {"scale": jnp.ones(4)}}
    mask = train_lib.decay_mask(params)
    assert mask == {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False}}
    config = tiny_config(learning_rate=0.1, warmup_iters=0, weight_decay=0.5, grad_clip=0.0)
    tx = train_lib.make_optimizer(config)
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # With zero gradients only weight decay moves parameters: matrices shrink, the rest stay.
    assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0
    assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0
    assert float(jnp.abs(updates["ln"]["scale"]).max()) == 0


def test_cross_entropy_equals_independent_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 7)
    z = np.asarray(logits, np.float64)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    want = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1).mean()
    assert float(train_lib.cross_entropy(logits, targets)) == pytest.approx(want, rel=1e-5)


def test_batches_are_a_pure_function_of_seed_and_step():
    key = jax.random.key(3)
    a = train_lib.step_keys(key, 7)
    b = train_lib.step_keys(key, 7)
    c = train_lib.step_keys(key, 8)
    assert all(bool(jnp.all(jax.random.key_data(x) == jax.random.key_data(y))) for x, y in zip(a, b))
    assert not bool(jnp.all(jax.random.key_data(a[0]) == jax.random.key_data(c[0])))
    assert not bool(jnp.all(jax.random.key_data(a[0]) == jax.random.key_data(a[1])))  # data != dropout stream


# ---------------------------------------------------------------------------
# Config errors: one line that names the field
# ---------------------------------------------------------------------------


def test_unknown_key_names_closest_valid_key():
    config = load_config(SMOKE)
    with pytest.raises(ConfigError, match=r"unknown config key 'model.n_heads'.*model\.n_head"):
        apply_overrides(config, {"model.n_heads": "4"})
    with pytest.raises(ConfigError, match=r"learning_rate"):
        apply_overrides(config, {"learnig_rate": "1e-3"})
    with pytest.raises(ConfigError, match=r"model\.n_layer"):
        apply_overrides(config, {"n_layers": "2"})  # leaf name close to a nested key


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("batch_size", "twelve", r"batch_size.*expects int"),
        ("learning_rate", "fast", r"learning_rate.*expects float"),
        ("model.qk_norm", "maybe", r"model\.qk_norm.*expects bool"),
    ],
)
def test_wrong_type_names_field(key, value, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(load_config(SMOKE), {key: value})


def test_override_parsing_and_types():
    overrides = parse_override_args(["--config.model.n_head=4", "--config.seed", "3", "--config.model.qk_norm=true"])
    config = apply_overrides(load_config(SMOKE), overrides)
    assert (config.model.n_head, config.seed, config.model.qk_norm) == (4, 3, True)
    apply_overrides(config, {"model.head_size": "8", "model.attn_scale": 0.25})
    assert config.model.head_size == 8 and config.model.attn_scale == "0.25"
    with pytest.raises(ConfigError, match="unrecognized argument"):
        parse_override_args(["--model.n_head=4"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"learning_rate": -1.0}, r"learning_rate=-1\.0: must be positive"),
        ({"batch_size": 0}, r"batch_size=0"),
        ({"beta2": 1.0}, r"beta2"),
        ({"model.n_head": 3}, r"model\.head_size.*not divisible by n_head=3"),
        ({"model.attn_scale": "sqrtt"}, r"model\.attn_scale.*'sqrt'"),
        ({"model.pos_encoding": "alibi"}, r"model\.pos_encoding"),
        ({"model.block_size": 5000}, r"model\.block_size=5000 is too long for the validation split"),
        ({"data.dataset": "/nonexistent/file.txt"}, r"data file not found: /nonexistent/file\.txt"),
    ],
)
def test_impossible_values_fail_before_compute(overrides, match):
    config = tiny_config(**overrides)
    with pytest.raises((ConfigError, FileNotFoundError), match=match):
        train_lib.Trainer.from_config(config, text=None if "data.dataset" in overrides else small_text())


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def losses_of(workdir):
    rows = read_jsonl(workdir / "metrics.jsonl")
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], [
        (r["step"], r["val_loss"]) for r in rows if "val_loss" in r
    ]


def test_training_learns_and_writes_workdir(tmp_path):
    config = tiny_config(max_iters=60, eval_interval=30, checkpoint_every=30, learning_rate=1e-2, sample_tokens=20)
    summary = train_lib.train(config, tmp_path, text=small_text(), progress=False)
    for name in ("config.json", "metrics.jsonl", "tokenizer.json", "sample.txt", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "checkpoints" / "60").is_dir() and (tmp_path / "best").is_dir()
    _, val = losses_of(tmp_path)
    assert [s for s, _ in val] == [0, 30, 60]
    assert val[0][1] == pytest.approx(math.log(summary_vocab(tmp_path)), rel=0.05)  # uniform at init
    assert val[-1][1] < val[0][1] - 0.4  # it learns
    assert json.loads((tmp_path / "config.json").read_text())["max_iters"] == 60
    assert summary["final_val_loss"][0] == pytest.approx(val[-1][1])


def summary_vocab(workdir):
    return len(json.loads((workdir / "tokenizer.json").read_text())["chars"])


def test_resume_continues_exactly(tmp_path):
    text = small_text()
    base = dict(eval_interval=10, checkpoint_every=10, log_interval=5)
    straight = train_lib.train(tiny_config(max_iters=30, **base), tmp_path / "a", text=text, progress=False)
    train_lib.train(tiny_config(max_iters=20, **base), tmp_path / "b", text=text, progress=False)
    resumed = train_lib.train(tiny_config(max_iters=30, **base), tmp_path / "b", text=text, progress=False)
    np.testing.assert_allclose(resumed["final_val_loss"], straight["final_val_loss"], rtol=1e-6)
    a_train, a_val = losses_of(tmp_path / "a")
    b_train, b_val = losses_of(tmp_path / "b")
    assert [s for s, _ in a_train] == [s for s, _ in b_train]
    np.testing.assert_allclose([v for _, v in b_train], [v for _, v in a_train], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in b_val], [v for _, v in a_val], rtol=1e-6)
    # Finished runs are not trained again.
    again = train_lib.train(tiny_config(max_iters=30, **base), tmp_path / "b", text=text, progress=False)
    assert again["final_val_loss"] == resumed["final_val_loss"]


def test_rows_written_after_the_last_checkpoint_are_dropped_on_resume(tmp_path):
    text = small_text()
    config = tiny_config(max_iters=10, eval_interval=10, checkpoint_every=10, log_interval=5)
    train_lib.train(config, tmp_path, text=text, progress=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # as if killed after logging step 15, and mid-line
        f.write(json.dumps({"step": 15, "seed": 1337, "loss": 123.0}) + '\n{"step": 1')
    (tmp_path / "summary.json").unlink()
    train_lib.train(
        tiny_config(max_iters=20, eval_interval=10, checkpoint_every=10, log_interval=5),
        tmp_path,
        text=text,
        progress=False,
    )
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(r.get("loss") != 123.0 for r in rows)
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20]


def test_different_config_in_same_workdir_is_refused(tmp_path):
    text = small_text()
    train_lib.train(tiny_config(max_iters=10), tmp_path, text=text, progress=False)
    with pytest.raises(ConfigError, match=r"different config.*learning_rate"):
        train_lib.train(tiny_config(max_iters=10, learning_rate=5e-3), tmp_path, text=text, progress=False)


@pytest.mark.parametrize("k", [5, 3])  # 3 does not divide log_interval=5: calls split into single steps
def test_steps_per_call_gives_the_same_losses(tmp_path, k):
    text = small_text()
    one = train_lib.train(tiny_config(max_iters=20), tmp_path / "one", text=text, progress=False)
    five = train_lib.train(tiny_config(max_iters=20, steps_per_call=k), tmp_path / "five", text=text, progress=False)
    np.testing.assert_allclose(five["final_val_loss"], one["final_val_loss"], rtol=1e-5)
    np.testing.assert_allclose(
        [v for _, v in losses_of(tmp_path / "five")[0]], [v for _, v in losses_of(tmp_path / "one")[0]], rtol=1e-5
    )


def test_divergence_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    text = small_text()
    huge = {"grad_clip": 0.0, "warmup_iters": 0, "learning_rate": 1e30, "min_lr": 1e30}
    bad = tiny_config(max_iters=40, eval_interval=10, checkpoint_every=10, **huge)
    with pytest.raises(train_lib.TrainingDiverged, match=r"NaN/Inf at step \d+.*no checkpoint was saved yet"):
        train_lib.train(bad, tmp_path / "bad", text=text, progress=False)
    bad.checkpoint_every = 1
    with pytest.raises(train_lib.TrainingDiverged) as info:
        train_lib.train(bad, tmp_path / "bad2", text=text, progress=False)
    message = str(info.value)
    step = int(message.split("at step ")[1].split(";")[0])
    assert f"last good checkpoint is step {step - 1}" in message
    # The last good checkpoint restores to finite parameters.
    from attention_jax.sampling import load_run

    run = load_run(tmp_path / "bad2")
    assert run.step == step - 1
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(run.params))


def test_full_split_loss_equals_independent_computation():
    text = small_text(3000)
    trainer = train_lib.Trainer.from_config(tiny_config(batch_size=4), text=text)
    state = trainer.init_state()
    got = float(trainer.full_split_loss(state.params, trainer.val_data)[0])
    params = jax.tree_util.tree_map(lambda a: a[0], state.params)
    val = np.asarray(trainer.val_data)
    T = trainer.mcfg.block_size
    losses = []
    for start in range(0, (len(val) - 1) // T * T, T):  # every complete window, one at a time
        x, y = val[start : start + T], val[start + 1 : start + T + 1]
        logits = trainer.model.apply({"params": params}, jnp.asarray(x)[None])[0]
        losses.append(float(train_lib.cross_entropy(logits, jnp.asarray(y))))
    assert got == pytest.approx(np.mean(losses), rel=1e-5)


def test_best_state_is_kept_per_seed():
    new = train_lib.TrainState(step=jnp.array([4, 4]), params={"w": jnp.array([[1.0, 1.0], [2.0, 2.0]])}, opt_state=())
    old = train_lib.TrainState(step=jnp.array([2, 2]), params={"w": jnp.array([[9.0, 9.0], [8.0, 8.0]])}, opt_state=())
    merged = train_lib._merge_seeds([False, True], new, old)
    np.testing.assert_array_equal(merged.step, [2, 4])  # seed 0 keeps its earlier best, seed 1 takes the new
    np.testing.assert_array_equal(merged.params["w"], [[9.0, 9.0], [2.0, 2.0]])


def test_killed_after_the_last_checkpoint_but_before_the_summary(tmp_path):
    text = small_text()
    config = tiny_config(max_iters=20, eval_interval=10, checkpoint_every=10, log_interval=5)
    first = train_lib.train(config, tmp_path, text=text, progress=False)
    rows_before = read_jsonl(tmp_path / "metrics.jsonl")
    (tmp_path / "summary.json").unlink()  # as if killed while writing the sample
    again = train_lib.train(config, tmp_path, text=text, progress=False)
    assert read_jsonl(tmp_path / "metrics.jsonl") == rows_before  # no evaluation written twice
    assert again["final_val_loss"] == first["final_val_loss"]


@pytest.mark.parametrize("key", ["learning_rate", "data.train_fraction", "model.n_head"])
def test_none_is_refused_where_the_default_is_not_none(key):
    with pytest.raises(ConfigError, match=rf"'{key}' expects \w+, got None"):
        apply_overrides(load_config(SMOKE), {key: "none"})
    config = apply_overrides(load_config(SMOKE), {"model.head_size": "8"})
    assert apply_overrides(config, {"model.head_size": "none"}).model.head_size is None


SHIPPED = [
    "configs/shakespeare_char.py",
    "configs/shakespeare_char.py:cpu",
    "configs/shakespeare_char.py:gpu",
    "configs/lecture_gpt.py",
    "configs/bigram.py",
]


@pytest.mark.parametrize("spec", SHIPPED)
def test_shipped_configs_validate_against_tiny_shakespeare(spec):
    """Reads $ATTENTION_JAX_DATA_DIR (CI points it at the real file); skips without it."""
    import os

    from attention_jax import data as data_lib

    folder = os.environ.get("ATTENTION_JAX_DATA_DIR")
    if not folder or not os.path.isfile(os.path.join(folder, "tinyshakespeare.txt")):
        pytest.skip("tinyshakespeare.txt not in $ATTENTION_JAX_DATA_DIR")
    raw = open(os.path.join(folder, "tinyshakespeare.txt"), "rb").read()
    assert len(raw) == data_lib.TINYSHAKESPEARE_BYTES
    trainer = train_lib.Trainer.from_config(load_config(spec))  # validation and data only: no compile
    assert trainer.tokenizer.vocab_size == 65
    assert trainer.train_data.shape[0] == int(0.9 * len(raw.decode("utf-8")))


def test_config_file_problems_are_one_line_errors(tmp_path):
    from attention_jax.sweep import load_sweep

    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg):\n    return undefined_name\nx = 1/0\n")
    with pytest.raises(ConfigError, match=r"could not load config file .*broken\.py: ZeroDivisionError"):
        load_config(str(broken))
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ConfigError, match=r"defines no get_config\(arg\)"):
        load_config(str(empty))
    with pytest.raises(ConfigError, match=r"defines no get_sweep\(arg\): it is not a sweep"):
        load_sweep(SMOKE)
    with pytest.raises(ConfigError, match=r"unknown variant 'tpu'"):
        load_config("configs/shakespeare_char.py:tpu")
