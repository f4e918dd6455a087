"""The tuned answer: each arm at its own best learning rate, per head size, and how that evolves in training.

Input: the points of a sweep with several learning rates per (design, scale, D)
(``configs/ablate_scale.py:tuned*``), as :func:`points.load_points` reads them.

- The best learning rate of an arm at a head size minimizes the mean final val
  loss over its seeds; a learning rate at which any seed diverged is not
  eligible. ``edge`` says the best one is the smallest or largest tried (then
  the true optimum may lie outside the range).
- Paired difference to sqrt: per seed, the arm's final val loss at its best
  learning rate minus sqrt's at sqrt's best (seeds share data order and eval
  batches across points), then mean ± std over seeds.
- Ranking over time: at every evaluation, the arms of one (design, D) ranked by
  their mean val loss at their best learning rates; "stable from" is the first
  evaluation after which the ranking never changes again.
"""

from __future__ import annotations

import math
from collections import defaultdict

from attention_jax.lab.ablate_scale.plots import plot_tuned_best, plot_tuned_curves
from attention_jax.lab.ablate_scale.points import PointResult, mean_curve, mean_std, scale_rank


def is_tuned(points: list[PointResult]) -> bool:
    """True when every (design, scale, D) was trained at two or more learning rates."""
    lrs = defaultdict(set)
    for p in points:
        lrs[(p.design, p.scale, p.head_size)].add(p.learning_rate)
    return bool(lrs) and all(len(v) >= 2 for v in lrs.values())


def _finals(p: PointResult) -> dict[int, float]:
    """Final val loss per seed that did not diverge."""
    return {s: p.evals[s][-1][1] for s in p.seeds if p.evals[s] and not p.diverged[s]}


def best_rows(points: list[PointResult]) -> list[dict]:
    """One row per (design, scale, D): every learning rate's mean final loss, the best one, whether at an edge."""
    groups: dict[tuple, list[PointResult]] = defaultdict(list)
    for p in points:
        groups[(p.design, p.scale, p.head_size)].append(p)
    rows = []
    for (design, scale, D), pts in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], scale_rank(kv[0][1]))):
        pts = sorted(pts, key=lambda p: p.learning_rate)
        by_lr = {p.learning_rate: p for p in pts}
        means = {lr: mean_std(_finals(p).values()) for lr, p in by_lr.items()}
        eligible = {lr: m for lr, (m, _) in means.items() if math.isfinite(m) and not any(by_lr[lr].diverged.values())}
        best = min(eligible, key=eligible.get) if eligible else None
        rows.append({
            "design": design, "scale": scale, "head_size": D, "n_head": pts[0].n_head,
            "learning_rates": sorted(by_lr), "means": means, "best_lr": best,
            "best": means[best] if best is not None else (math.nan, math.nan),
            "edge": best is not None and best in (min(by_lr), max(by_lr)),
            "diverged": {lr: sum(p.diverged.values()) for lr, p in by_lr.items()},
            "point": by_lr.get(best),
        })  # fmt: skip
    return rows


def paired_to_sqrt(rows: list[dict]) -> dict[tuple, tuple[float, float]]:
    """(design, scale, D) -> mean ± std over seeds of (arm at its best lr) − (sqrt at its best lr)."""
    sqrt = {(r["design"], r["head_size"]): r["point"] for r in rows if r["scale"] == "sqrt" and r["point"]}
    out = {}
    for r in rows:
        ref = sqrt.get((r["design"], r["head_size"]))
        if r["point"] is None or ref is None or r["point"] is ref:
            continue
        mine, theirs = _finals(r["point"]), _finals(ref)
        out[(r["design"], r["scale"], r["head_size"])] = mean_std([mine[s] - theirs[s] for s in mine if s in theirs])
    return out


def ranking_stable_from(rows: list[dict]) -> dict[tuple, tuple[int, list[str]]]:
    """(design, D) -> (first step from which the arms' ranking stays the same, that final ranking)."""
    by_shape: dict[tuple, dict[str, tuple]] = defaultdict(dict)
    for r in rows:
        if r["point"] is not None:
            by_shape[(r["design"], r["head_size"])][r["scale"]] = mean_curve(r["point"])
    out = {}
    for shape, curves in by_shape.items():
        n = min(len(steps) for steps, _ in curves.values())
        steps = next(iter(curves.values()))[0][:n]
        rankings = [tuple(sorted(curves, key=lambda s: curves[s][1][t])) for t in range(n)]
        first = n - 1
        while first > 0 and rankings[first - 1] == rankings[-1]:
            first -= 1
        out[shape] = (steps[first], list(rankings[-1]))
    return out


def markdown(rows: list[dict]) -> str:
    """The tuned table: per design, D and arm, the best learning rate and the loss there."""
    pairs = paired_to_sqrt(rows)
    stable = ranking_stable_from(rows)
    lrs = sorted({lr for r in rows for lr in r["learning_rates"]})
    head = ("| design | D | heads | scale | best lr | final val loss at best lr | − sqrt at its best (paired) | "
            + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")  # fmt: skip
    lines = [head, "|" + "---|" * (7 + len(lrs))]
    for r in rows:
        m, s = r["best"]
        best = "—" if r["best_lr"] is None else f"{r['best_lr']:g}" + (" (edge)" if r["edge"] else "")
        delta = pairs.get((r["design"], r["scale"], r["head_size"]))
        delta_text = "—" if delta is None or not math.isfinite(delta[0]) else f"{delta[0]:+.3f} ± {delta[1]:.3f}"
        cells = []
        for lr in lrs:
            if lr not in r["means"]:
                cells.append("")
                continue
            mean = r["means"][lr][0]
            div = f" ({r['diverged'][lr]} div.)" if r["diverged"][lr] else ""
            cells.append(("—" if not math.isfinite(mean) else f"{mean:.3f}") + div)
        lines.append(
            f"| {r['design']} | {r['head_size']} | {r['n_head']} | {r['scale']} | {best} | "
            f"{'—' if not math.isfinite(m) else f'{m:.3f} ± {s:.3f}'} | {delta_text} | " + " | ".join(cells) + " |"
        )
    lines.append("")
    lines.append("### Ranking of the arms over training (each at its best learning rate)\n")
    lines.append("| design | D | ranking of the arms at the end (best first) | stable from step |")
    lines.append("|---|---|---|---|")
    for (design, D), (step, ranking) in sorted(stable.items()):
        lines.append(f"| {design} | {D} | {' < '.join(ranking)} | {step} |")
    return "\n".join(lines) + "\n"


def section(points: list[PointResult], outdir, dpi: int = 90) -> tuple[list[str], list[tuple[str, str]]]:
    """The report's tuned section (markdown parts) and its figures [(caption, file name)]."""
    rows = best_rows(points)
    plot_tuned_best(rows, outdir / "tuned_best_lr.png", dpi=dpi)
    plot_tuned_curves(rows, outdir / "tuned_curves.png", dpi=dpi)
    md = [
        "## Tuned: each arm at its own best learning rate\n",
        "Best lr: the learning rate with the lowest mean final val loss over the seeds, among those at which no "
        "seed diverged; (edge) marks a best lr at the end of the range tried. Paired difference: per seed, the "
        "arm at its best lr minus sqrt at sqrt's best lr. Columns lr ...: mean final val loss at each learning "
        "rate. Ranking stable from: the first evaluation after which the order of the arms (each at its best lr) "
        "no longer changes.\n",
        markdown(rows),
    ]
    figures = [
        ("Final val loss at each arm's best learning rate (error bars: std over seeds, which share data order, "
         "so the paired differences in the table are tighter), and that learning rate, against head size "
         "(dashed: some best lr at the edge of the range; the axis spans the learning rates tried)",
         "tuned_best_lr.png"),
        ("Val loss curves at each arm's best learning rate (top) and their difference to sqrt (bottom)",
         "tuned_curves.png"),
    ]  # fmt: skip
    return md, figures
