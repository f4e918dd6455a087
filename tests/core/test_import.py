"""The core is light: importing it loads none of the experiment toolkit's dependencies.

One interpreter serves every check (starting one costs seconds): it imports
``attention_jax``, then ``attention_jax.nnx``, then plants ``import
attention_jax.lab.config``, and prints the full ``sys.modules`` names after each
step. The last step is the check's own mutation test: the function that finds
no toolkit module after ``import attention_jax`` must find the lab there.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

HEAVY = ("optax", "orbax", "ml_collections", "tqdm", "matplotlib", "tensorboardX", "torch", "ray")
TOOLKIT = ("attention_jax.lab", *HEAVY)  # each one and every submodule of it

STEPS = {  # step name -> the statement run before the snapshot (in this order, in one interpreter)
    "core": "import attention_jax",
    "nnx": "import attention_jax.nnx",
    "planted_lab": "import attention_jax.lab.config",  # a submodule: the package and it
}
SNAPSHOTS = """
import json, sys
out = {}
for name, statement in json.loads(sys.argv[1]).items():
    exec(statement)
    out[name] = sorted(sys.modules)
print(json.dumps(out))
"""


def toolkit_modules(loaded: list[str]) -> list[str]:
    """The names in ``loaded`` (full module names) that are a TOOLKIT package or inside one."""
    return sorted(m for m in loaded if any(m == p or m.startswith(p + ".") for p in TOOLKIT))


@pytest.fixture(scope="module")
def modules_after() -> dict[str, list[str]]:
    """{step: every module name in sys.modules after that step of STEPS}, from one fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", SNAPSHOTS, json.dumps(STEPS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout)


def test_import_attention_jax_loads_no_toolkit_dependency(modules_after):
    loaded = modules_after["core"]
    assert "attention_jax" in loaded and "flax" in loaded
    assert toolkit_modules(loaded) == []


def test_the_toolkit_check_finds_a_planted_lab_import(modules_after):
    # The mutation: the same check after `import attention_jax.lab.config` names the lab and its submodule.
    found = toolkit_modules(modules_after["planted_lab"])
    assert "attention_jax.lab" in found
    assert "attention_jax.lab.config" in found and "optax" in found, found
    assert toolkit_modules(["optax._src.base", "attention_jax.layers", "torchvision"]) == ["optax._src.base"]


def test_the_nnx_twins_are_imported_explicitly_only(modules_after):
    # flax.nnx imports optax: attention_jax.nnx must stay out of ``import attention_jax``
    core = modules_after["core"]
    assert "attention_jax.nnx" not in core and "flax.nnx" not in core
    nnx = modules_after["nnx"]
    assert "attention_jax.nnx" in nnx and "optax" in nnx  # as documented: NNX brings optax along
    assert "attention_jax.lab" not in nnx
    from attention_jax import nnx as module

    assert module.TransformerLM.__module__ == "attention_jax.nnx"


def test_core_modules_import_nothing_from_the_lab():
    from pathlib import Path

    import attention_jax

    root = Path(attention_jax.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "attention_jax.lab" not in text.replace("attention_jax.lab`", ""), path.name
        for name in HEAVY:
            assert f"import {name}" not in text and f"from {name}" not in text, (path.name, name)
