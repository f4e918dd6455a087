"""The points of an ablate-scale sweep, read back from their workdirs, and the numbers over their seeds.

Data flow: ``<sweep dir>/<point>/`` (config.json, metrics.jsonl) ->
``load_points`` -> ``PointResult`` (per-seed numbers) -> mean ± std over seeds.
The report (``report.py``), the tuned answer (``tuned.py``) and the plots
(``plots.py``) all start from here. Standard deviations are over seeds with
ddof=1 (0 for a single seed).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attention_jax.lab.rundir import RunDir

SCALE_ORDER = ("none", "sqrt", "mup", "sqrt+qknorm")

# ---------------------------------------------------------------------------
# Reading points
# ---------------------------------------------------------------------------


@dataclass
class PointResult:
    name: str
    workdir: Path
    config: dict
    design: str  # "a" (width fixed) or "b" (head count fixed)
    scale: str  # "none", "sqrt", "mup" or a number, then the variants' label (variant_label)
    head_size: int
    n_head: int
    learning_rate: float
    seeds: list[int]
    evals: dict[int, list[tuple[int, float]]]  # seed -> [(step, val_loss)] in step order
    diverged: dict[int, bool]
    status: str = "done"
    entropy: list[float] | None = None  # per layer, mean over seeds (from the checkpoint)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def arm(self) -> tuple:
        return (self.design, self.scale, self.head_size, self.learning_rate)


def variant_label(m: dict) -> str:
    """A run's attention variants in an arm's label, so that arms differing in one never merge.

    The q/k norm: "+qknorm" (LayerNorm), "+qkrms", "-nogain" without gains; then "+softcap30",
    "+window64" (one per layer: "+window64/none"), "+sinks", "+logn0.3" ("+logn0.3L" learned),
    "+alibi". A run written before a key existed has its default, so its label is unchanged.
    """
    label, norm = "", m.get("qk_norm")
    if norm:
        label += ("+qkrms" if norm == "rms" else "+qknorm") + ("" if m.get("qk_norm_gain", True) else "-nogain")
    if m.get("softcap") is not None:
        label += f"+softcap{m['softcap']:g}"
    window = m.get("window")
    if window is not None:
        windows = window if isinstance(window, (list, tuple)) else [window]
        label += "+window" + "/".join("none" if w is None else str(w) for w in windows)
    if m.get("sinks"):
        label += "+sinks"
    if m.get("logn_scale") is not None:
        label += f"+logn{m['logn_scale']:g}" + ("L" if m.get("logn_learned") else "")
    if m.get("pos_encoding") == "alibi":
        label += "+alibi"
    return label


def describe_config(config: dict) -> dict:
    """design, scale label, head size, n_head and learning rate of a run's config.json."""
    m = config["model"]
    explicit = m.get("head_size") is not None
    head_size = int(m["head_size"]) if explicit else int(m["n_embd"]) // int(m["n_head"])
    scale = str(m.get("attn_scale", "sqrt")) + variant_label(m)
    return {
        "design": "b" if explicit else "a",
        "scale": scale,
        "head_size": head_size,
        "n_head": int(m["n_head"]),
        "learning_rate": float(config["learning_rate"]),
    }


def read_point(workdir: str | os.PathLike) -> PointResult | None:
    """One point's results, or None when the folder holds no run (no config.json)."""
    run = RunDir(workdir)
    if not run.has_config():
        return None
    config = run.read_config()
    rows = run.read_metrics()
    base = config.get("seed", 0)
    seeds = [base + i for i in range(config.get("num_seeds", 1))]
    evals: dict[int, list[tuple[int, float]]] = {s: [] for s in seeds}
    diagnostics: dict[int, list[tuple[int, dict]]] = {s: [] for s in seeds}
    diverged = {s: False for s in seeds}
    for r in rows:
        s = r.get("seed", base)
        if s not in evals:
            continue
        if isinstance(r.get("diagnostics"), dict):
            diagnostics[s].append((int(r["step"]), diagnostic_numbers(r["diagnostics"])))
        if "val_loss" in r:
            evals[s].append((int(r["step"]), float(r["val_loss"])))
            if not math.isfinite(float(r["val_loss"])):
                diverged[s] = True
        if "diverged_at" in r or ("loss" in r and not math.isfinite(float(r["loss"]))):
            diverged[s] = True
    for s in evals:
        evals[s].sort()
        diagnostics[s].sort(key=lambda row: row[0])
    status = "done" if run.has_summary() else (run.read_point_record() or {}).get("status", "incomplete")
    return PointResult(
        name=run.path.name, workdir=run.path, config=config, seeds=seeds, evals=evals, diverged=diverged, status=status,
        extra={"diagnostics": diagnostics}, **describe_config(config),
    )  # fmt: skip


DIAGNOSTIC_NUMBERS = ("max_logit", "min_entropy", "log_z", "log_z_max")


def diagnostic_numbers(d: dict) -> dict[str, float]:
    """One evaluation's stability diagnostics (``stats.stability_diagnostics``, per layer and head) in four numbers.

    ``max_logit``: the largest attention logit of any layer and head; ``min_entropy``: the lowest
    layer's mean head entropy; ``log_z``, ``log_z_max``: the output logits' mean and largest log Z.
    A row missing one (a model without attention, a null) gives NaN there.
    """
    flat = lambda v: [
        x for heads in (v or []) for x in (heads if isinstance(heads, list) else [heads]) if x is not None
    ]
    per_layer = [np.mean([x for x in heads if x is not None]) for heads in d.get("entropy") or [] if heads]
    num = lambda v: math.nan if v is None else float(v)
    return {
        "max_logit": max(flat(d.get("max_logit")), default=math.nan),
        "min_entropy": float(min(per_layer, default=math.nan)),
        "log_z": num(d.get("log_z")),
        "log_z_max": num(d.get("log_z_max")),
    }


def load_points(sweep_dir: str | os.PathLike) -> list[PointResult]:
    """Every point folder of a sweep dir, sorted by arm."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep dir not found: {sweep_dir}")
    points = [p for d in sorted(sweep_dir.iterdir()) if d.is_dir() and (p := read_point(d)) is not None]
    if not points:
        raise FileNotFoundError(f"no runs in {sweep_dir}: no subfolder has a config.json")
    return sorted(points, key=lambda p: (p.design, scale_rank(p.scale), p.head_size, p.learning_rate))


def scale_rank(scale: str) -> tuple:
    return (SCALE_ORDER.index(scale), "") if scale in SCALE_ORDER else (len(SCALE_ORDER), scale)


# ---------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------


def mean_std(values) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for one value) of the finite values; NaNs if none."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def steps_to_target(evals: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose val loss is <= target, or None."""
    for step, loss in evals:
        if math.isfinite(loss) and loss <= target:
            return step
    return None


def point_numbers(p: PointResult, target: float | None) -> dict:
    """Per-seed final/best val loss and steps to target, then their mean ± std (diverged seeds excluded)."""
    ok = [s for s in p.seeds if not p.diverged[s] and p.evals[s]]
    final = [p.evals[s][-1][1] for s in ok]
    best = [min(v for _, v in p.evals[s] if math.isfinite(v)) for s in ok]
    out = {
        "final": mean_std(final),
        "best": mean_std(best),
        "final_per_seed": final,
        "diverged": sum(p.diverged.values()),
        "seeds": len(p.seeds),
        "last_step": max((p.evals[s][-1][0] for s in p.seeds if p.evals[s]), default=0),
    }
    if target is not None:
        reached = [t for s in ok if (t := steps_to_target(p.evals[s], target)) is not None]
        out["to_target"] = (mean_std(reached)[0] if reached else math.nan, len(reached))
    return out


def paired_delta(p: PointResult, ref: PointResult) -> tuple[float, float]:
    """Mean ± std over seeds of p's final val loss minus ref's, seed by seed.

    Seeds share their data order and eval batches across points, so the
    paired difference cancels most of the seed-to-seed spread that the
    unpaired ± shows. Seeds that diverged in either point are left out.
    """
    diffs = []
    for s in p.seeds:
        if s in ref.evals and p.evals[s] and ref.evals[s] and not p.diverged[s] and not ref.diverged[s]:
            diffs.append(p.evals[s][-1][1] - ref.evals[s][-1][1])
    return mean_std(diffs)


def default_target(points: list[PointResult]) -> float:
    """The median over points of the mean final val loss, rounded up to 0.01: half the arms reach it."""
    finals = [point_numbers(p, None)["final"][0] for p in points]
    finals = [f for f in finals if math.isfinite(f)]
    return math.ceil(float(np.median(finals)) * 100) / 100 if finals else math.nan


def base_learning_rate(points: list[PointResult]) -> float:
    """The most common learning rate: the one of the main grid."""
    lrs = [p.learning_rate for p in points]
    return max(set(lrs), key=lambda lr: (lrs.count(lr), -lr))


def grid_points(points: list[PointResult], lr: float | None) -> list[PointResult]:
    """The points at learning rate ``lr`` (all of them for None)."""
    return [p for p in points if lr is None or p.learning_rate == lr]


def mean_curve(p: PointResult) -> tuple[list[int], np.ndarray]:
    """(steps, mean val loss over the seeds that did not diverge), cut to the shortest seed's evaluations."""
    ok = [s for s in p.seeds if p.evals[s] and not p.diverged[s]]
    n = min(len(p.evals[s]) for s in ok)
    steps = [st for st, _ in p.evals[ok[0]][:n]]
    return steps, np.mean([[v for _, v in p.evals[s][:n]] for s in ok], axis=0)
