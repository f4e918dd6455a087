"""The names of a run's files, and strict JSON read and written atomically: the bottom of the run directory.

Every file name of a run is defined here and nowhere else (``RunDir`` in
``workdir.py`` says what each holds).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from attention_jax.lab.rundir.faults import DamagedFile, naming

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
DATASET = "dataset.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
BEST = "best"
SAMPLE = "sample.txt"
SUMMARY = "summary.json"
SWEEP_POINT = "sweep_point.json"
LOCK = "train.lock"
DAMAGED = "damaged"


# ---------------------------------------------------------------------------
# JSON and JSONL: atomic writes, strict JSON (no NaN/Infinity), damaged files named
# ---------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, so that it is strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write strict JSON atomically (a temporary file, synced, then a rename): readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    text = json.dumps(json_safe(payload), indent=2, default=str, allow_nan=False)
    try:
        with naming(path), open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data (power loss)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; a file that is not JSON raises ``DamagedFile`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{path} is damaged: not valid JSON ({e})") from None


def read_jsonl(path: str | os.PathLike, damaged: list[int] | None = None) -> list[dict]:
    """Rows of a JSONL file. Lines that are not JSON objects (a torn last line after a crash,
    or damage) are skipped, and their line numbers appended to ``damaged``."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif damaged is not None:
            damaged.append(number)
    return rows


def note(message: str) -> None:
    """One line on stderr about something the user should know but that does not stop the command."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def dataset_fingerprint(dataset: str, text: str) -> dict:
    """What identifies a run's data: its name, length and the sha256 of its UTF-8 bytes
    (for a file, the same digest ``sha256sum`` prints)."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return {"dataset": str(dataset), "characters": len(text), "sha256": digest}
