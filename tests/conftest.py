"""Shared test setup: no network, one compilation cache, and the helpers every test folder uses, as fixtures.

Tests mirror the package: ``tests/core`` (the library; jax, flax, numpy),
``tests/lab`` (the experiment toolkit and its commands), ``tests/benchmarks``
(the benchmark scripts and the PyTorch twin). Tests that take more than about
5 s carry ``@pytest.mark.slow``; ``pytest -m "not slow"`` runs the rest.

float64 is never switched on globally: independent references are computed in
numpy float64 instead. ``jax_numpy_rank_promotion="raise"`` (equinox-style) is
not set: the library broadcasts (C,) biases and (T, C) position tables against
(B, T, C) by rank promotion on purpose.
"""

from __future__ import annotations

import os
import tempfile
import urllib.request
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _compile_quickly() -> None:
    """XLA:CPU's backend (LLVM) optimizes at level 0 in the tests, here and in the subprocesses they start.

    The suite compiles hundreds of tiny programs that run for milliseconds, so
    LLVM's optimization passes are most of its time: measured 154 -> 108 s for
    tests/core/test_decode.py and test_model.py. XLA's own HLO passes (fusion,
    layout) still run, so the programs compute the same operations; every
    comparison keeps its tolerance. Runs outside the tests keep XLA's default.
    Flags already in XLA_FLAGS are kept (``tests.helpers.with_devices`` adds to them).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {TEST_XLA_FLAGS}".strip()


def _share_compilation_cache() -> None:
    """One persistent XLA cache for this session and the subprocesses it starts.

    Many tests compile the same tiny programs (in-process and in subprocesses
    running the entry points); the cache makes the second compile a lookup.
    Every program is stored, however fast it compiled (the commands' default
    skips those under 0.5 s). Honours an ATTENTION_JAX_CACHE_DIR that is
    already set (CI sets one).
    """
    where = os.environ.setdefault("ATTENTION_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="attention_jax_xla_"))
    os.environ["ATTENTION_JAX_CACHE_MIN_COMPILE_S"] = "0"  # read by the commands, here and in subprocesses
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


from tests.helpers import SMOKE, TEST_XLA_FLAGS, TINY, make_small_text  # noqa: E402

_compile_quickly()  # before JAX starts its CPU backend (the first computation), not before the import
_share_compilation_cache()


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject.toml): a worker per core, at most 4.

    Most tests compile and run tiny programs on one core; more workers than
    cores only slow each other's timed waits. Four keeps a large machine from
    starting dozens of JAX processes (and Ray clusters) at once.
    """
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items) -> None:
    """The files with the most slow tests first (the order within a file kept).

    The workers (``--dist loadfile``) take files in this order, so the long
    multi-process and Ray files start at once instead of running alone at the end.
    """
    slow = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.path])  # stable: the rest keeps its order


@pytest.fixture(scope="session")
def small_text():
    """``small_text(n_chars=6000, seed=0)``: the text most training tests train on (no dataset needed)."""
    return make_small_text


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """``small_text(8000)`` as a file, for commands run as subprocesses (``--config.data.dataset=...``)."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(make_small_text(8000), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(**overrides)``: the smoke config shrunk to a one-layer, width-16, block-8 model."""
    from attention_jax.lab.config import apply_overrides, load_config

    def make(**overrides):
        config = load_config(SMOKE)
        apply_overrides(config, TINY)
        return apply_overrides(config, overrides)

    return make


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any test that reaches for the network fails loudly (tests that fake a download re-patch it)."""

    def refuse(*args, **kwargs):
        raise RuntimeError("tests must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def influence_matrix(jacobian: jax.Array) -> np.ndarray:
    """(T, T) matrix M[i, j] = sum |d out[0, i, :] / d in[0, j, :]|.

    ``jacobian`` is a jacrev of an output (1, T, *) by an input (1, T, *).
    """
    jac = np.asarray(jacobian)
    T = jac.shape[1]
    assert jac.ndim == 6 and jac.shape[0] == jac.shape[3] == 1 and jac.shape[4] == T, jac.shape
    return np.abs(jac[0]).sum(axis=(1, 4))[:, 0, :]  # (T, T)


def assert_causal_influence(m: np.ndarray) -> None:
    """Exactly zero influence from the future, nonzero influence from every visible position.

    The second half makes the check fail for a flipped (upper-triangular) or
    missing-diagonal mask, not only for a missing one.
    """
    T = m.shape[0]
    future = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(m[future] == 0.0), f"output depends on future inputs:\n{m}"
    assert np.all(m[~future] > 0.0), f"output ignores some visible inputs:\n{m}"


@pytest.fixture(scope="session")
def causal_check():
    """Returns a function: jacobian (1, T, *, 1, T, *) -> asserts causal influence pattern."""
    return lambda jac: assert_causal_influence(influence_matrix(jac))


@pytest.fixture(scope="session")
def influence():
    return influence_matrix


def fake_init_params(module, *args, std: float = 0.02, seed: int = 0, **kwargs):
    """Parameters with ``module``'s structure, drawn with numpy.

    LayerNorm scales are 1 + N(0, std^2), every other leaf N(0, std^2).
    ``jax.eval_shape`` gives the structure without running the initializers,
    and numpy draws the values, so no threefry program is compiled per
    parameter shape (that compile dominates a CPU test suite). With std 0.02
    this is GPT-style init; with a larger std it is a generic point in
    parameter space, with O(1) logits, where an order effect cannot hide
    under float noise. Properties that must hold for all parameters are
    checked there.
    """
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs)).get("params", {})
    rng = np.random.default_rng(seed)

    def draw(path, s):
        noise = rng.normal(0.0, std, s.shape)
        is_ln_scale = getattr(path[-1], "key", None) == "scale"
        return jnp.asarray(1.0 + noise if is_ln_scale else noise, s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="session")
def fake_init():
    return fake_init_params


@pytest.fixture
def rng():
    """A fresh, fixed-seed numpy generator (cheap inputs: no XLA compile per shape)."""
    return np.random.default_rng(0)


def randomize_params(params, key: jax.Array, std: float):
    """Every leaf of an existing tree replaced by N(0, std^2) from ``key`` (see ``fake_init_params``)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    new = [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)


@pytest.fixture(scope="session")
def randomize():
    return randomize_params


@pytest.fixture
def leaky_decode_mask(monkeypatch):
    """A mutation for tests of the tests: while active, ``decode_mask`` lets each query of a
    multi-token decode call (a prefill or refill) also see the next slot, one position in its
    future; a one-token step has nothing to leak. generate's compiled programs are dropped
    before and after, so neither the leak nor the correct mask is served from jit's cache.
    """
    from attention_jax import attention
    from attention_jax.generate import _generate

    correct = attention.decode_mask

    def leaky(index, T, S, *, causal=True, window=None):
        s = jnp.arange(S)[None, :]
        one_ahead = (s == index + jnp.arange(T)[:, None] + 1) & (s < index + T)  # (T, S)
        return correct(index, T, S, causal=causal, window=window) | one_ahead

    _generate.clear_cache()
    monkeypatch.setattr(attention, "decode_mask", leaky)
    yield leaky
    monkeypatch.undo()
    _generate.clear_cache()
