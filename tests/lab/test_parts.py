"""Typed experiment parts: a config resolved once into frozen values; nothing downstream reads the config."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import inspect
import io
import math
import pkgutil
import sys
import threading
from pathlib import Path

import ml_collections
import numpy as np
import pytest

import attention_jax.lab
from attention_jax.lab import parts as parts_lib
from attention_jax.lab import population
from attention_jax.lab.config import ConfigError, to_dict
from attention_jax.lab.parts import resolve
from attention_jax.lab.rundir import RunDir
from attention_jax.model import ModelConfig

ENTRIES = ({"learning_rate": 3e-3, "seed": 5}, {"model.attn_scale": "mup", "warmup_iters": 0})


def test_resolution_gives_the_typed_values(tiny_config):
    config = tiny_config(num_seeds=2, batch_size=8, population=ENTRIES, **{"model.n_head": 4, "grad_clip": 0.5})
    p = resolve(config, device_count=4)
    assert p.model.type == "transformer" and isinstance(p.model.config, ModelConfig)
    mc = p.model.config
    assert (mc.block_size, mc.n_embd, mc.n_head, mc.head_dim, mc.n_layer) == (8, 16, 4, 4, 1)
    assert mc.vocab_size == parts_lib.PLACEHOLDER_VOCAB and p.with_vocab(65).model.config.vocab_size == 65
    assert p.optimizer == parts_lib.Optimizer(1e-3, 1e-4, 2, 20, 0.1, 0.9, 0.99, 0.5)  # the smoke config's values
    assert p.data == parts_lib.Data("tinyshakespeare", 0.9, 8)
    assert (p.run.max_iters, p.run.eval_interval, p.run.log_interval, p.run.sample_tokens) == (20, 10, 5, 0)
    assert p.mesh.shape == (4, 1)  # 4 members over 4 devices, each member's batch on one
    assert resolve(tiny_config(num_seeds=2), device_count=4).mesh.shape == (2, 2)
    assert not p.distributed.enabled and p.ray == parts_lib.Ray(1.0, 0.0, 0, 1, 3)
    # Members: entries times seeds, each with its own optimizer and attention scale, the config's elsewhere.
    assert [(m.seed, m.values) for m in p.members] == [
        (5, {"learning_rate": 3e-3}), (6, {"learning_rate": 3e-3}),
        (1337, {"model.attn_scale": "mup", "warmup_iters": 0}), (1338, {"model.attn_scale": "mup", "warmup_iters": 0}),
    ]  # fmt: skip
    assert [m.optimizer.learning_rate for m in p.members] == [3e-3, 3e-3, 1e-3, 1e-3]
    assert [m.optimizer.warmup_iters for m in p.members] == [2, 2, 0, 0]
    assert {m.optimizer.grad_clip for m in p.members} == {0.5}
    assert [m.attn_scale for m in p.members] == ["sqrt", "sqrt", "mup", "mup"]
    np.testing.assert_allclose(population.attention_scales(p.population, head_dim=4), [0.5, 0.5, 0.25, 0.25])
    hp = population.hparams(p.population)
    np.testing.assert_allclose(hp["learning_rate"], [3e-3, 3e-3, 1e-3, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(hp["warmup_iters"], [2, 2, 0, 0])
    assert p.population.is_population and not resolve(tiny_config()).population.is_population
    # A number given as text (the command line) is a number: with it the members' scales are runtime values.
    numeric = resolve(tiny_config(**{"model.attn_scale": "0.5"}))
    assert numeric.model.config.attn_scale == 0.5
    assert resolve(tiny_config(**{"model.type": "bigram"})).model.build().__class__.__name__ == "BigramLM"


@pytest.mark.parametrize(
    "overrides, device_count, match",
    [
        ({"model.n_head": 3}, 1, r"^model\.head_size: n_embd=16 is not divisible by n_head=3"),
        ({"model.pos_encoding": "xpos"}, 1, r"^model\.pos_encoding"),
        ({"model.type": "gpt"}, 1, r"^model\.type must be 'transformer' or 'bigram', got 'gpt'"),
        ({"learning_rate": -1.0}, 1, r"^learning_rate=-1\.0: must be positive"),
        ({"batch_size": 6}, 4, r"^batch_size=6: must be divisible by the 4 devices"),
        ({"population": ({"learning_rate": 1e-3, "min_lr": 1e-2},)}, 1, r"^population member 0 \(.*\): min_lr=0\.01"),
        ({"population": ({"model.attn_scale": "sqrtt"},)}, 1, r"^population member 0 \(.*\): model\.attn_scale"),
        ({"population": ({"batch_size": 8},)}, 1, r"^population: 'batch_size' is part of the compiled program"),
        ({"distributed.enabled": True, "distributed.num_processes": 0}, 1, r"^distributed\.num_processes=0"),
    ],
)
def test_an_error_names_the_config_key(tiny_config, overrides, device_count, match):
    with pytest.raises(ConfigError, match=match):
        resolve(tiny_config(**overrides), device_count=device_count)


def test_derived_variants_come_from_replace_and_are_checked(tiny_config):
    p = resolve(tiny_config())
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.run.max_iters = 3  # type: ignore[misc]
    short = p.replace(run=dataclasses.replace(p.run, max_iters=3), optimizer=dataclasses.replace(p.optimizer,
                      learning_rate=2e-3))  # fmt: skip
    assert (short.run.max_iters, short.optimizer.learning_rate) == (3, 2e-3)
    assert (p.run.max_iters, p.optimizer.learning_rate) == (20, 1e-3)  # the original is untouched
    assert short.model is p.model and short.data is p.data  # the parts not replaced are shared
    with pytest.raises(ValueError, match=r"ModelConfig\.head_size"):  # a model variant is checked again
        p.model.config.replace(n_head=3)
    # The sweep's grouping: parts that differ only in member values share their shared() parts.
    other = resolve(tiny_config(seed=7, learning_rate=5e-3, **{"model.attn_scale": "mup"}))
    assert parts_lib.shared(other) == parts_lib.shared(p)
    assert parts_lib.shared(resolve(tiny_config(batch_size=8))) != parts_lib.shared(p)
    assert parts_lib.member_entry(other) == {"seed": 7, "learning_rate": 5e-3, "min_lr": 1e-4, "warmup_iters": 2,
                                             "lr_decay_iters": 20, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99,
                                             "z_loss": 0.0, "model.attn_scale": "mup"}  # fmt: skip


# ---------------------------------------------------------------------------
# Resolved once: nothing after resolution takes, or reads, the ConfigDict
# ---------------------------------------------------------------------------

DOWNSTREAM = ("loop", "experiment", "steps", "population", "sweep", "distributed", "bench", "sampling")
# The edges, which take a config and resolve it (or build configs, which is what a sweep does),
# and the deprecated ConfigDict forms kept for old callers (each resolves, then calls the parts form).
TAKES_A_CONFIG = {
    "loop.train", "loop.train_members", "experiment.Experiment.from_config", "bench.benchmark_training",  # edges
    "loop.Output.__init__",  # what an output's config.json records: saved unchanged, and compared on resume
    "population.entries", "population.members", "population.check", "population._with_values",  # deprecated
    "experiment.Experiment.__init__",  # its deprecated ``config`` (what from_config was given); never read
}  # fmt: skip


def _functions(module):
    for name, obj in vars(module).items():
        if inspect.isfunction(obj) and obj.__module__ == module.__name__:
            yield f"{module.__name__.rsplit('.', 1)[-1]}.{name}", obj
        elif inspect.isclass(obj) and obj.__module__ == module.__name__:
            for attr, member in vars(obj).items():
                fn = getattr(member, "__func__", member)
                if inspect.isfunction(fn):
                    yield f"{module.__name__.rsplit('.', 1)[-1]}.{name}.{attr}", fn


def test_nothing_downstream_takes_a_config_dict_but_the_edges():
    """By the type hints: every function of the training path takes parts; the edges that resolve are listed."""
    takes = set()
    for short in DOWNSTREAM:
        module = importlib.import_module(f"attention_jax.lab.{short}")
        for name, fn in _functions(module):
            hints = {k: v for k, v in fn.__annotations__.items() if k != "return"}
            if any("ConfigDict" in str(v) for v in hints.values()):
                takes.add(name)
    assert takes == TAKES_A_CONFIG
    for short in ("loop", "experiment", "steps", "population", "distributed"):  # and none reads a dotted key
        source = Path(importlib.import_module(f"attention_jax.lab.{short}").__file__).read_text()
        assert "config.get(" not in source and "flat_keys" not in source and "config_lib.get" not in source, short


def test_training_resolves_once_and_then_reads_no_value_of_the_config(tiny_config, text_file, tmp_path, monkeypatch):
    """A run through the real loop with its config sealed after resolution: any read of it fails the run.

    Also the cold start's status lines: they come before the first result (the first evaluation line).
    """
    from attention_jax.lab import loop

    config = tiny_config(max_iters=4, eval_interval=2, log_interval=2, checkpoint_every=2, sample_tokens=5,
                         **{"data.dataset": str(text_file)})  # fmt: skip
    saved = to_dict(config)  # what config.json must hold
    calls, sealed, reads = [], [], []
    real_resolve = loop.resolve

    def resolve_once(c, **kw):
        calls.append(c)
        out = real_resolve(c, **kw)
        sealed.append(c)
        return out

    def guarded(name):
        original = getattr(ml_collections.ConfigDict, name)

        def read(self, *args, **kwargs):
            if any(self is s for s in sealed):
                reads.append((name, args[:1]))
                raise AssertionError(f"the config was read after resolution: {name}{args[:1]}")
            return original(self, *args, **kwargs)

        return read

    monkeypatch.setattr(loop, "resolve", resolve_once)
    for name in ("__getattr__", "__getitem__", "get", "items", "keys", "values"):
        monkeypatch.setattr(ml_collections.ConfigDict, name, guarded(name))
    out = io.StringIO()  # stdout and stderr in one stream, in the order written
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        summary = loop.train(config, tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert reads == [] and len(calls) == 1 and calls[0] is config
    assert summary["steps"] == 4 and math.isfinite(summary["final_val_loss"][0])
    assert RunDir(tmp_path / "run").read_config() == saved  # config.json: the config, unchanged
    lines = out.getvalue().splitlines()
    first_result = next(i for i, line in enumerate(lines) if line.startswith("step 2: train loss"))
    loading = next(i for i, line in enumerate(lines) if line == "loading data ...")
    initializing = next(i for i, line in enumerate(lines) if line.startswith("initializing 1 model"))
    compiling = next(i for i, line in enumerate(lines) if line.startswith("compiling 2 programs"))
    assert loading < initializing < compiling < first_result, lines
    assert lines[loading] == lines[0]  # nothing comes before it: the first line of a cold start


# ---------------------------------------------------------------------------
# No module-level mutable flags
# ---------------------------------------------------------------------------


def test_no_module_level_mutable_flags_under_the_lab():
    """No ``global`` statement and no module-level Event anywhere under attention_jax/lab (the Ctrl-C flag is
    owned by the training call, ``loop.SafeStop``)."""
    root = Path(attention_jax.lab.__file__).parent
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)], path
    for info in pkgutil.walk_packages(attention_jax.lab.__path__, "attention_jax.lab."):
        if info.name.endswith("ray_backend") and "ray" not in sys.modules:
            continue  # imports Ray lazily; its globals are checked by the source scan above
        module = importlib.import_module(info.name)
        events = [k for k, v in vars(module).items() if isinstance(v, threading.Event)]
        assert not events, (info.name, events)
    assert not hasattr(importlib.import_module("attention_jax.lab.loop"), "stop_requested")


def test_each_training_call_owns_its_ctrl_c_flag():
    from attention_jax.lab.loop import SafeStop

    a, b = SafeStop(), SafeStop()
    with a:
        a.requested.set()
        with pytest.raises(KeyboardInterrupt):
            a.check()
        b.check()  # another call's flag is untouched
    a.check()  # cleared when its call ends
