"""The core is light: importing it loads none of the experiment toolkit's dependencies."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("optax", "orbax", "ml_collections", "tqdm", "matplotlib", "tensorboardX", "torch", "ray")


def test_import_attention_jax_loads_no_toolkit_dependency():
    code = "import sys, json, attention_jax; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = set(json.loads(out.stdout))
    assert "attention_jax" in loaded and "flax" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert "attention_jax.lab" not in out.stdout


def test_the_nnx_twins_are_imported_explicitly_only():
    # flax.nnx imports optax: attention_jax.nnx must stay out of ``import attention_jax``
    code = "import sys, attention_jax; print('attention_jax.nnx' in sys.modules, 'flax.nnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]
    code = "import sys, attention_jax.nnx as m; print(m.TransformerLM.__module__, 'optax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["attention_jax.nnx", "True"]  # as documented: NNX brings optax along


def test_core_modules_import_nothing_from_the_lab():
    from pathlib import Path

    import attention_jax

    root = Path(attention_jax.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "attention_jax.lab" not in text.replace("attention_jax.lab`", ""), path.name
        for name in HEAVY:
            assert f"import {name}" not in text and f"from {name}" not in text, (path.name, name)
