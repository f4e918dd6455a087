"""Metrics files and model FLOP counts.

``metrics.jsonl`` holds one JSON object per line. On resume, rows past the
restored checkpoint (written after it, then lost with the process) are
dropped, so the file of a resumed run equals that of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file; a torn last line (process killed mid-write) is skipped."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsWriter:
    """Appends rows to metrics.jsonl, keeping only rows up to ``keep_up_to_step``."""

    def __init__(self, path: str | os.PathLike, keep_up_to_step: int = -1, enabled: bool = True):
        self.path = Path(path)
        self._file = None
        if not enabled:  # a non-writing process of a multi-host run
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", -1) <= keep_up_to_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write_many(self, rows: Iterable[dict]) -> None:
        if self._file is None:
            return
        for row in rows:
            self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def matmul_params(cfg) -> int:
    """Weights that take part in a matmul per token (no embedding lookups)."""
    C, H, D, V, L = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size, cfg.n_layer
    per_layer = C * 3 * H * D + H * D * C + 2 * C * 4 * C
    return L * per_layer + C * V


def flops_per_token(cfg, model_type: str = "transformer") -> float:
    """Training FLOPs per token (forward + backward = 3x forward).

    Forward: 2 FLOPs per matmul weight, plus the attention matmuls q·kᵀ and
    w·v over the full T x T block (2 * 2 * T * D per head per layer, counted
    dense as the dense kernel computes it). Embedding lookups are not FLOPs.
    """
    if model_type == "bigram":
        return 0.0
    attn = cfg.n_layer * cfg.n_head * 2 * 2 * cfg.block_size * cfg.head_size
    return 3.0 * (2.0 * matmul_params(cfg) + attn)
