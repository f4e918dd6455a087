"""Trained runs shared by the toolkit's tests: each trained once per session, in this process.

A test that kills, resumes, damages or extends a run copies it first
(``tests.helpers.copy_run`` into its own ``tmp_path``); the shared folder is
never changed. Training a tiny run costs about 5-10 s (tracing and lowering
five programs), so the uninterrupted runs that resume tests compare against
are trained here once instead of once per test.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import REFERENCE, SOURCE, checkpoint_steps


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_config, text_file):
    """``trained(**overrides)``: the folder of a finished ``tiny_config(**overrides)`` run on ``text_file``.

    Trained on first use, once per session for each distinct ``overrides``. Read it, or copy it
    (``copy_run``) before changing anything in it.
    """
    from attention_jax.lab.loop import train

    runs = {}

    def get(**overrides):
        key = json.dumps(overrides, sort_keys=True)
        if key not in runs:
            workdir = tmp_path_factory.mktemp("trained") / "run"
            train(tiny_config(**{"data.dataset": str(text_file), **overrides}), workdir, progress=False)
            runs[key] = workdir
        return runs[key]

    return get


@pytest.fixture(scope="session")
def reference_run(trained):
    """The uninterrupted ``REFERENCE`` run (60 steps; checkpoints every 5, evaluations every 10)."""
    return trained(**REFERENCE)


@pytest.fixture(scope="session")
def source_run(trained):
    """The finished ``SOURCE`` run: 20 steps, checkpoints at 10 and 20 (copy it before changing it)."""
    workdir = trained(**SOURCE)
    assert checkpoint_steps(workdir) == [10, 20]
    return workdir
