"""The import graph of attention_jax has no cycle, and the run directory's I/O layer imports no model or training code.

The graph is built from the source with ``ast``: an edge for every import
statement, also those inside functions (a lazy import that breaks a cycle at
run time is still a cycle in the design). Imports under ``if TYPE_CHECKING:``
are left out: they never run. ``from package import name`` is an edge to
``package.name`` when that is a module, else to ``package``. A module's parent
packages are not edges: importing ``attention_jax.lab.rundir.lock`` runs
``attention_jax/__init__.py`` (the core's public API) first, whatever the lock
imports, so what a module itself imports is what can be checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "attention_jax"
IO_LAYER = "attention_jax.lab.rundir"
# What the run directory must not import: models, layers, Flax, the training code.
FORBIDDEN_IN_IO = ("attention_jax.model", "attention_jax.layers", "attention_jax.nnx", "flax",
                   "attention_jax.lab.experiment", "attention_jax.lab.loop", "attention_jax.lab.steps")  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, is_package: bool, modules: set[str]) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement in ``source``."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child, top)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, top) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level - 1 more
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in modules else target, top))
        inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source), True)
    return found


def build_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, set[str]]]:
    """(every import of each module, those at module level, the internal edges: imports of attention_jax modules)."""
    files = {module_name(p): p for p in sorted((root / PACKAGE).rglob("*.py"))}
    modules = set(files)
    every, top_level, internal = {}, {}, {}
    for name, path in files.items():
        found = imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", modules)
        every[name] = {m for m, _ in found}
        top_level[name] = {m for m, top in found if top}
        internal[name] = {m for m in every[name] if m in modules and m != name}
    return every, top_level, internal


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None when it has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_IO)


def test_the_package_has_no_import_cycle():
    _, _, internal = build_graph()
    assert len(internal) > 30 and "attention_jax.lab.rundir.workdir" in internal
    assert find_cycle(internal) is None, " -> ".join(find_cycle(internal))


def test_a_planted_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (["a", "b", "c", "a"],)
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    # On the real graph: the lowest module of the run directory importing the one that ties it together.
    _, _, internal = build_graph()
    planted = {k: set(v) for k, v in internal.items()}
    planted["attention_jax.lab.rundir.rundir"].add("attention_jax.lab.rundir.workdir")
    cycle = find_cycle(planted)
    assert cycle is not None and "attention_jax.lab.rundir.workdir" in cycle and cycle[0] == cycle[-1]


def test_imports_inside_functions_and_relative_ones_are_edges_type_checking_ones_are_not():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import attention_jax.data\n"
        "from . import steps\n"
        "from .rundir import RunDir\n"
        "if TYPE_CHECKING:\n    from attention_jax.lab import loop\n"
        "def f():\n    from attention_jax.lab import experiment\n    return experiment\n"
    )
    modules = {"attention_jax.data", "attention_jax.lab.steps", "attention_jax.lab.rundir",
               "attention_jax.lab.experiment", "attention_jax.lab.loop"}  # fmt: skip
    found = dict(imports_of(source, "attention_jax.lab.runs", False, modules))
    assert found == {"typing": True, "attention_jax.data": True, "attention_jax.lab.steps": True,
                     "attention_jax.lab.rundir": True, "attention_jax.lab.experiment": False}  # fmt: skip


def test_the_report_and_the_tuned_table_do_not_import_each_other():
    _, _, internal = build_graph()
    report, tuned = "attention_jax.lab.ablate_scale.report", "attention_jax.lab.ablate_scale.tuned"
    assert tuned in internal[report] and report not in internal[tuned]


def test_the_run_directory_imports_no_model_or_training_code():
    every, top_level, internal = build_graph()
    io = sorted(m for m in every if m == IO_LAYER or m.startswith(IO_LAYER + "."))
    assert len(io) >= 6
    for module in io:  # directly, anywhere in the module
        bad = sorted(m for m in every[module] if forbidden(m))
        assert not bad, f"{module} imports {bad}"
    # and at import time, through whatever it imports (module-level imports, followed to the end)
    seen, todo = set(), list(io)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        bad = sorted(m for m in top_level[module] if forbidden(m))
        assert not bad, f"importing {IO_LAYER} imports {module}, which imports {bad}"
        todo.extend(m for m in top_level[module] if m in internal)
    assert "attention_jax.lab.config" not in seen  # config builds models: the I/O layer takes ConfigError elsewhere


@pytest.mark.parametrize("name", ["Run", "load_run"])
def test_load_run_moved_out_of_the_run_directory_and_is_still_found_there(name):
    from attention_jax.lab import rundir, runs

    assert getattr(rundir, name) is getattr(runs, name)
    every, top_level, _ = build_graph()
    assert "attention_jax.lab.runs" in every[IO_LAYER]  # imported inside __getattr__, when asked for,
    assert "attention_jax.lab.runs" not in top_level[IO_LAYER]  # not with the package
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        rundir.nothing  # noqa: B018


def test_the_file_names_of_a_run_are_spelled_in_one_module():
    """tests/lab/test_rundir.py checks this under attention_jax/lab; the core is searched here too."""
    from attention_jax.lab import rundir

    names = [rundir.CONFIG, rundir.TOKENIZER, rundir.DATASET, rundir.METRICS, rundir.TENSORBOARD, rundir.CHECKPOINTS,
             rundir.SAMPLE, rundir.SUMMARY, rundir.SWEEP_POINT, rundir.LOCK]  # fmt: skip
    home = ROOT / PACKAGE / "lab" / "rundir" / "rundir.py"
    hugging_face = ROOT / PACKAGE / "convert.py"  # a Hugging Face checkpoint's own config.json, not a run's
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        spelled = [name for name in names if f'"{name}"' in text or f"'{name}'" in text]
        allowed = names if path == home else [rundir.CONFIG] if path == hugging_face else []
        assert spelled == allowed, f"{path} spells {spelled}: use attention_jax.lab.rundir"
