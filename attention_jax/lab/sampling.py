"""Text from a trained run: its prompt encoded, continued by :func:`attention_jax.generate`, decoded."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_jax.generate import generate
from attention_jax.lab.runs import Run


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
    if not prompt:
        raise ValueError("--prompt must not be empty")
    tokens = jnp.asarray(run.tokenizer.encode(prompt))[None]  # (1, T0)
    params = run.params(member)
    out = generate(run.model_for(member), params, tokens, max_new_tokens, jax.random.key(seed), temperature, top_k)
    return run.tokenizer.decode(out[0])
