"""Text from a trained run: its prompt encoded, continued by :func:`attention_jax.generate`, decoded."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

from attention_jax.generate import generate
from attention_jax.lab.rundir import CONFIG
from attention_jax.lab.runs import Run

SHOWN_POINTS = 3  # a sweep directory given as --workdir: how many of its points the error names


def check_run_dir(workdir: str | os.PathLike) -> None:
    """Refuse, in one line that says what it is, a --workdir that is no run: missing, a file, a sweep directory.

    A directory without config.json that is none of these is left to ``load_run``'s message.
    """
    path = Path(workdir)
    if not path.exists():
        raise FileNotFoundError(f"no run in {path}: no such directory")
    if not path.is_dir():
        raise NotADirectoryError(f"no run in {path}: it is a file, not a run directory")
    if (path / CONFIG).is_file():
        return
    from attention_jax.lab.sweep import SWEEP_FILE

    points = sorted(p for p in path.iterdir() if (p / CONFIG).is_file())
    if not points and (path / SWEEP_FILE).is_file():
        raise FileNotFoundError(f"no run in {path}: it is a sweep directory, and none of its points has started")
    if points:
        shown = ", ".join(str(p) for p in points[:SHOWN_POINTS])
        more = f" (and {len(points) - SHOWN_POINTS} more)" if len(points) > SHOWN_POINTS else ""
        raise FileNotFoundError(f"no run in {path}: it is a sweep directory; pass one of its points: {shown}{more}")


def check_prompt(run: Run, prompt: str) -> None:
    """Refuse an empty prompt, or one with characters outside the run's vocabulary (naming each once)."""
    if not prompt:
        raise ValueError("--prompt must not be empty")
    known = set(run.tokenizer.chars)
    unknown = list(dict.fromkeys(c for c in prompt if c not in known))
    if len(unknown) == 1:
        raise ValueError(f"character {unknown[0]!r} is not in the tokenizer's vocabulary of {run.tokenizer.vocab_size}")
    if unknown:
        raise ValueError(
            f"characters {', '.join(repr(c) for c in unknown)} are not in the tokenizer's vocabulary of "
            f"{run.tokenizer.vocab_size}"
        )


def sample_text(
    run: Run,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    member: int = 0,
) -> str:
    """The prompt followed by ``max_new_tokens`` characters sampled from the run's model ``member``."""
    check_prompt(run, prompt)
    tokens = jnp.asarray(run.tokenizer.encode(prompt))[None]  # (1, T0)
    params = run.params(member)
    out = generate(run.model_for(member), params, tokens, max_new_tokens, jax.random.key(seed), temperature, top_k)
    return run.tokenizer.decode(out[0])
