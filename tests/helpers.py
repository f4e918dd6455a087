"""Helpers shared by the test folders (conftest.py exposes them as fixtures too)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the checkout: configs/, experiments/, benchmarks/
SMOKE = "configs/shakespeare_char.py:smoke"
TINY = {"model.block_size": 8, "model.n_embd": 16, "model.n_layer": 1, "sample_tokens": 0}  # the tiny_config fixture
WORDS = ["the", "king", "queen", "shall", "not", "be", "my", "lord", "good", "night", "and", "to"]


def make_small_text(n_chars: int = 6000, seed: int = 0) -> str:
    """A deterministic pseudo-English text with some structure to learn (words, full stops, lines)."""
    rng = np.random.default_rng(seed)
    out = []
    while sum(len(w) + 1 for w in out) < n_chars:
        out.append(WORDS[rng.integers(len(WORDS))])
        if rng.random() < 0.1:
            out[-1] += ".\n"
    return " ".join(out)[:n_chars]


def run_entry_point(name: str, *args, env: dict | None = None, timeout: float = 300, cwd: Path = ROOT):
    """``python -m experiments.<name> ARGS`` as a user runs it, from the checkout."""
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{name}", *map(str, args)],
        cwd=cwd,
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_args(workdir, text_file, overrides: dict | None = None) -> list[str]:
    """experiments.train flags for the ``tiny_config`` fixture's config (plus ``overrides``) on ``text_file``."""
    config = {**TINY, "data.dataset": text_file, **(overrides or {})}
    flags = [f"--config.{key}={value}" for key, value in config.items()]
    return ["--config", SMOKE, "--workdir", str(workdir), "--no-progress", *flags]


def assert_one_line_error_result(result, pattern: str, code: int = 2) -> None:
    """Exit ``code``, no traceback, exactly one ``error:`` line, and it matches ``pattern``."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def run_losses(exp, steps_per_call: int, calls: int):
    """Losses (calls * steps_per_call,) of seed 0 and the final state, from the jitted train program."""
    from attention_jax.lab import experiment as ex

    state = ex.init_state(exp)
    step = ex.train_program(exp, steps_per_call)
    losses = []
    for _ in range(calls):
        state, out = step(state)
        losses.append(np.asarray(out["loss"]))
    return np.concatenate(losses)[:, 0], state


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under ``folder``: {relative path: (size, mtime_ns, sha256) or "dir"}.

    Two equal snapshots mean nothing was created, deleted, renamed or rewritten.
    """
    import hashlib

    out: dict[str, tuple] = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_dir():
            out[rel] = ("dir",)
        else:
            st = path.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


HOLDER = """
import sys
from attention_jax.lab.rundir import RunDir
with RunDir(sys.argv[1]).lock():
    print("locked", flush=True)
    sys.stdin.readline()
"""


def start_holder(workdir):
    """A process holding ``workdir``'s lock (``RunDir.lock``) until its stdin closes (or it is killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the live processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # it ended meanwhile
            continue
        if text in cmdline and state != "Z":  # a zombie has ended; only its exit status is left
            found.append(cmdline.strip())
    return found
