"""The eager PyTorch twin (benchmarks/torch_reference.py) is the same model and optimizer as the JAX one.

Given the JAX weights it gives the same logits and loss and the same whole-split loss; given the same
batches, the same losses over optimizer steps. Skipped without torch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax.lab import experiment as ex
from attention_jax.lab import steps
from attention_jax.lab.config import load_config
from attention_jax.model import ModelConfig, cross_entropy
from tests.helpers import run_losses


@pytest.fixture(scope="module")
def experiment(small_text):
    config = load_config("configs/shakespeare_char.py:smoke")  # 2 layers, C 32, T 16, batch 4
    config.warmup_iters = 2  # the losses cover warmup and decay
    return ex.Experiment.from_config(config, text=small_text())


def jax_params(exp):
    state = ex.init_state(exp)
    params = jax.tree_util.tree_map(lambda a: a[0], state.params)
    # Random weights (std 0.2) instead of GPT init: O(1) logits, so a transposed kernel shows.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [0.2 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])


@pytest.mark.slow
def test_torch_reference_forward_and_loss_match_jax(experiment):
    torch = pytest.importorskip("torch")
    from benchmarks import torch_reference

    params = jax_params(experiment)
    x, y = steps.batch(jax.random.key(0), experiment.train_data, 4, 16)
    logits = experiment.model.apply({"params": params}, x)
    model = torch_reference.GPT.from_config(experiment.model_config).load_flax_params(params)
    with torch.no_grad():
        t_logits = model(torch.from_numpy(np.asarray(x, np.int64)))
        targets = torch.from_numpy(np.asarray(y, np.int64)).flatten()
        t_loss = torch.nn.functional.cross_entropy(t_logits.flatten(0, 1), targets)
    np.testing.assert_allclose(t_logits.numpy(), np.asarray(logits), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(t_loss), float(cross_entropy(logits, y)), rtol=1e-5)
    # Same parameter count: nothing missing or extra on either side.
    assert sum(p.numel() for p in model.parameters()) == sum(a.size for a in jax.tree_util.tree_leaves(params))


def test_torch_reference_trains_like_jax_on_the_same_batches(experiment):
    """Same init, same batches: AdamW, weight-decay mask, clipping and schedule agree step by step."""
    torch = pytest.importorskip("torch")
    from benchmarks import torch_reference

    losses, _ = run_losses(experiment, 1, 6)
    state = ex.init_state(experiment)
    params = jax.tree_util.tree_map(lambda a: a[0], state.params)
    torch.manual_seed(0)
    ref = torch_reference.TorchTrainer(experiment.config, experiment.model_config, np.asarray(experiment.train_data))
    ref.model.load_flax_params(params)
    t_losses = []
    for s in range(6):
        data_key, _ = steps.step_keys(experiment.member_inputs["key"][0], jnp.asarray(s, jnp.int32))
        x, y = steps.batch(data_key, experiment.train_data, 4, 16)
        t_losses.append(ref.step(torch.from_numpy(np.asarray(x, np.int64)), torch.from_numpy(np.asarray(y, np.int64))))
    np.testing.assert_allclose(t_losses, losses, rtol=2e-4)


def test_torch_reference_whole_split_loss_matches_jax(experiment):
    """benchmarks/recipe_quality.py compares the two sides with these two functions: same weights, same number."""
    pytest.importorskip("torch")
    from benchmarks import torch_reference

    params = jax_params(experiment)
    stacked = jax.tree_util.tree_map(lambda a: a[None], params)  # (K=1, ...)
    jax_loss = float(ex.full_split_loss(experiment, stacked, experiment.val_data)[0])
    model = torch_reference.GPT.from_config(experiment.model_config).load_flax_params(params)
    # A chunk that does not divide the window count exercises the ragged last chunk.
    t_loss = torch_reference.full_split_loss(
        model, np.asarray(experiment.val_data), experiment.model_config.block_size, chunk=7
    )
    np.testing.assert_allclose(t_loss, jax_loss, rtol=1e-5)


def test_torch_reference_refuses_what_it_does_not_implement():
    pytest.importorskip("torch")
    from benchmarks import torch_reference

    cfg = ModelConfig(vocab_size=11, block_size=16, n_embd=32, n_head=4, n_layer=1, pos_encoding="rope")
    with pytest.raises(ValueError, match="pos_encoding"):
        torch_reference.GPT.from_config(cfg)
