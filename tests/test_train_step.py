"""The fast training step computes what the simple one does, and the PyTorch baseline is the same model.

- several optimizer steps per compiled call (a ``lax.scan``) give the losses of one step per call;
- ``attention_impl="xla"`` (jax.nn.dot_product_attention) equals the hand-written dense path in a Block;
- the eager PyTorch reference of :mod:`attention_jax.torch_reference`, given the JAX weights, gives the
  same logits and loss, the same whole-split loss, and the same losses over optimizer steps on the same
  batches (skipped without torch);
- the benchmark's side-by-side result and its hardware-peak estimate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import benchmark
from attention_jax.config_utils import load_config
from attention_jax.layers import Block
from attention_jax.model import ModelConfig
from attention_jax.train import Trainer, cross_entropy, step_keys


def small_text(n_chars: int = 6000) -> str:
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "shall", "not", "be", "my", "lord", "good", "night"]
    return " ".join(words[i] for i in rng.integers(len(words), size=n_chars // 4))[:n_chars]


def tiny_config(**overrides):
    c = load_config("configs/shakespeare_char.py:smoke")  # 2 layers, C 32, T 16, batch 4
    c.warmup_iters = 2  # the losses below cover warmup and decay
    for key, value in overrides.items():
        c[key] = value
    return c


@pytest.fixture(scope="module")
def trainer():
    return Trainer.from_config(tiny_config(), text=small_text())


def run_losses(trainer: Trainer, steps_per_call: int, calls: int) -> np.ndarray:
    state = trainer.init_state()
    step = trainer.compile_train(steps_per_call)
    losses = []
    for _ in range(calls):
        state, out = step(state)
        losses.append(np.asarray(out["loss"]))
    return np.concatenate(losses)[:, 0], state


def test_steps_per_call_gives_the_losses_of_single_steps(trainer):
    one, s1 = run_losses(trainer, 1, 6)
    three, s3 = run_losses(trainer, 3, 2)
    assert one.shape == three.shape == (6,)
    np.testing.assert_allclose(three, one, rtol=1e-5, atol=1e-6)
    assert int(s1.step[0]) == int(s3.step[0]) == 6
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s3.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert one[-1] < one[0]  # it trains


def test_xla_attention_equals_dense_in_a_block():
    cfg = ModelConfig(vocab_size=11, block_size=16, n_embd=32, n_head=4, n_layer=2)
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    dense, xla = Block(cfg), Block(cfg.replace(attention_impl="xla"))
    params = dense.init(jax.random.key(1), x)
    # Random weights of std 0.3 give O(1) logits: a wrong mask or scale shows far above float noise.
    params = jax.tree_util.tree_map(lambda p: 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)
    np.testing.assert_allclose(jax.jit(xla.apply)(params, x), jax.jit(dense.apply)(params, x), rtol=1e-5, atol=1e-5)
    grad = lambda block: jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(block.apply(p, x)))))  # noqa: E731
    g_dense, g_xla = grad(dense)(params), grad(xla)(params)
    for a, b in zip(jax.tree_util.tree_leaves(g_dense), jax.tree_util.tree_leaves(g_xla)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


# --- the PyTorch reference ------------------------------------------------------


def jax_params(trainer):
    state = trainer.init_state()
    params = jax.tree_util.tree_map(lambda a: a[0], state.params)
    # Random weights (std 0.2) instead of GPT init: O(1) logits, so a transposed kernel shows.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [0.2 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])


def test_torch_reference_forward_and_loss_match_jax(trainer):
    torch = pytest.importorskip("torch")
    from attention_jax import torch_reference

    params = jax_params(trainer)
    x, y = trainer._batch(jax.random.key(0), trainer.train_data)
    logits = trainer.model.apply({"params": params}, x)
    model = torch_reference.GPT.from_config(trainer.mcfg).load_flax_params(params)
    with torch.no_grad():
        t_logits = model(torch.from_numpy(np.asarray(x, np.int64)))
        targets = torch.from_numpy(np.asarray(y, np.int64)).flatten()
        t_loss = torch.nn.functional.cross_entropy(t_logits.flatten(0, 1), targets)
    np.testing.assert_allclose(t_logits.numpy(), np.asarray(logits), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(t_loss), float(cross_entropy(logits, y)), rtol=1e-5)
    # Same parameter count: nothing missing or extra on either side.
    assert sum(p.numel() for p in model.parameters()) == sum(a.size for a in jax.tree_util.tree_leaves(params))


def test_torch_reference_trains_like_jax_on_the_same_batches(trainer):
    """Same init, same batches: AdamW, weight-decay mask, clipping and schedule agree step by step."""
    torch = pytest.importorskip("torch")
    from attention_jax import torch_reference

    losses, _ = run_losses(trainer, 1, 6)
    state = trainer.init_state()
    params = jax.tree_util.tree_map(lambda a: a[0], state.params)
    torch.manual_seed(0)
    ref = torch_reference.TorchTrainer(trainer.config, trainer.mcfg, np.asarray(trainer.train_data))
    ref.model.load_flax_params(params)
    t_losses = []
    for s in range(6):
        data_key, _ = step_keys(trainer.seed_keys[0], jnp.asarray(s, jnp.int32))
        x, y = trainer._batch(data_key, trainer.train_data)
        t_losses.append(ref.step(torch.from_numpy(np.asarray(x, np.int64)), torch.from_numpy(np.asarray(y, np.int64))))
    np.testing.assert_allclose(t_losses, losses, rtol=2e-4)


def test_torch_reference_whole_split_loss_matches_jax(trainer):
    """benchmarks/recipe_quality.py compares the two sides with these two functions: same weights, same number."""
    pytest.importorskip("torch")
    from attention_jax import torch_reference

    params = jax_params(trainer)
    stacked = jax.tree_util.tree_map(lambda a: a[None], params)  # (K=1, ...)
    jax_loss = float(trainer.full_split_loss(stacked, trainer.val_data)[0])
    model = torch_reference.GPT.from_config(trainer.mcfg).load_flax_params(params)
    # A chunk that does not divide the window count exercises the ragged last chunk.
    t_loss = torch_reference.full_split_loss(model, np.asarray(trainer.val_data), trainer.mcfg.block_size, chunk=7)
    np.testing.assert_allclose(t_loss, jax_loss, rtol=1e-5)


def test_torch_reference_refuses_what_it_does_not_implement():
    pytest.importorskip("torch")
    from attention_jax import torch_reference

    cfg = ModelConfig(vocab_size=11, block_size=16, n_embd=32, n_head=4, n_layer=1, pos_encoding="rope")
    with pytest.raises(ValueError, match="pos_encoding"):
        torch_reference.GPT.from_config(cfg)


# --- the benchmark ------------------------------------------------------------------


def test_benchmark_times_jax_and_torch_side_by_side(tmp_path):
    c = tiny_config(steps_per_call=2)
    c.data.dataset = str(tmp_path / "text.txt")
    (tmp_path / "text.txt").write_text(small_text(), encoding="utf-8")
    result = benchmark.benchmark_training(c, steps=4, warmup=1, matmul_n=128)
    off = benchmark.benchmark_training(c, steps=2, warmup=0, matmul_n=128, torch_compare=False, peak_flops=1e12)
    assert result["steps_per_call"] == 2 and result["measured_steps"] == 4
    if result["torch_ms_per_step"] is None:  # torch not installed: skipped with a reason
        assert "torch" in result["torch_skipped"]
    else:
        assert result["torch_ms_per_step"] > 0
        ratio = result["ms_per_step"] / result["torch_ms_per_step"]
        assert result["jax_over_torch"] == pytest.approx(ratio, rel=1e-2, abs=1e-3)  # rounded to 3 places
        assert "JAX / PyTorch" in benchmark.format_table(result)
    assert off["torch_ms_per_step"] is None and "--no-torch" in off["torch_skipped"]
    assert off["hardware_peak_flops_per_s"] == 1e12
    assert off["mfu_hardware"] == pytest.approx(off["model_flops_per_s"] / 1e12, abs=1e-4)  # rounded to 4 places
    assert "PyTorch comparison off" in benchmark.format_table(off)


@pytest.mark.parametrize(
    "vendor, flags, mhz, expected",
    [
        ("AuthenticAMD", "fma avx2 avx512f", "2600.0", 2 * 32 * 2.6e9),  # Zen 4: 512-bit FMAs on 256-bit pipes
        ("GenuineIntel", "fma avx2 avx512f", "2500.0", 2 * 64 * 2.5e9),  # 2 AVX-512 FMA units
        ("GenuineIntel", "fma avx2", "3000.0", 2 * 32 * 3.0e9),
        ("GenuineIntel", "sse4_2", "3000.0", None),  # no FMA: not estimated
    ],
)
def test_cpu_peak_flops_estimate(vendor, flags, mhz, expected):
    info = {"vendor_id": vendor, "flags": flags, "cpu MHz": mhz}
    got = benchmark.cpu_peak_flops(cores=2, cpuinfo=info)
    if expected is None:
        assert got is None
    else:
        assert got[0] == pytest.approx(expected) and "nominal clock" in got[1]
    assert benchmark.cpu_peak_flops(cores=2, cpuinfo={"flags": flags}) is None  # no clock: omitted
