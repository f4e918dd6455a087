"""The ablate-scale study's figures: loss curves, loss and entropy against head size, attention heatmaps.

Every figure follows the same rules, so that none misleads: curves against
training steps say "step" on the x-axis; a y-range is fitted to the data it
shows (``fitted_ylim``), not fixed; each arm (scale) has its own colour, line
style and marker, drawn slightly transparent, so that arms on top of each
other stay visible; a legend names every line style a title mentions; a
heatmap has a colour bar and the prompt's characters on its axes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from attention_jax.lab.ablate_scale.points import (
    PointResult,
    grid_points,
    mean_curve,
    point_numbers,
    scale_rank,
)

# One look per arm: with the same values two arms' lines coincide, and a different dash and
# marker (and alpha) keeps the one underneath visible.
ARM_STYLES = {"none": ("-", "o"), "sqrt": ("--", "s"), "mup": ("-.", "^"), "sqrt+qknorm": (":", "D")}
OTHER_STYLES = (("-", "v"), ("--", "P"), ("-.", "X"), (":", "*"))
ALPHA = 0.85
# Layers in the entropy plot: the last layer solid, earlier ones dotted or dashed.
LAYER_STYLES = (":", "--", "-.")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def arm_style(scale: str, index: int) -> dict:
    """Plot keywords of one arm: colour by its rank among the scales drawn, its own line style and marker."""
    linestyle, marker = ARM_STYLES.get(scale, OTHER_STYLES[index % len(OTHER_STYLES)])
    return {"color": f"C{index}", "ls": linestyle, "marker": marker, "alpha": ALPHA}


def dodged(xs: list[float], index: int, count: int, width: float = 0.05) -> list[float]:
    """``xs`` (on a log2 axis) moved sideways by arm ``index`` of ``count``, so that error bars of arms
    with equal values sit side by side instead of on top of each other."""
    return [x * 2 ** (width * (index - (count - 1) / 2)) for x in xs]


def _head_size_axis(ax, sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    if sizes:
        ax.set_xticks(sizes, [str(D) for D in sizes])
        ax.minorticks_off()
        ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
    ax.set_xlabel("head size D", fontsize=8)


def fitted_ylim(ax, values: Iterable[float], high_percentile: float = 95.0, margin: float = 0.06) -> None:
    """Fit ``ax``'s y-range to ``values``: from their minimum to their ``high_percentile``-th percentile,
    widened by ``margin`` of that span on each side.

    The minimum is always shown (the best loss is what a reader looks for); the
    top is a percentile so that the first evaluations of a loss curve, far
    above the rest, do not squash it. Non-finite values are ignored.
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return
    lo, hi = float(v.min()), float(np.percentile(v, high_percentile))
    pad = margin * (hi - lo) if hi > lo else max(0.05 * abs(lo), 0.01)
    ax.set_ylim(lo - pad, hi + pad)


def _finish(fig, path, dpi: int):
    """Save ``fig`` to ``path`` and let pyplot forget it; the figure is returned (tests read its axes)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return fig


def plot_curves(points: list[PointResult], path, lr: float | None, dpi: int = 90, *, series=None, ylabel="val loss"):
    """Val loss against step: a panel per (design, D), a line per scale (mean over seeds, band min..max).

    ``series(p, seed)`` -> [(step, value)] draws another per-evaluation number instead (a diagnostic).
    """
    series = series or (lambda p, s: p.evals[s])
    plt = _plt()
    pts = grid_points(points, lr)
    designs = sorted({p.design for p in pts})
    sizes = sorted({p.head_size for p in pts})
    fig, axes = plt.subplots(len(designs), len(sizes), figsize=(2.8 * len(sizes), 2.5 * len(designs)), squeeze=False)
    scales = sorted({p.scale for p in pts}, key=scale_rank)
    shown: dict[int, list[float]] = {}  # id(ax) -> every value drawn there
    for p in sorted(pts, key=lambda p: scale_rank(p.scale)):
        ax = axes[designs.index(p.design)][sizes.index(p.head_size)]
        ok = [s for s in p.seeds if series(p, s) and not p.diverged[s]]
        if not ok:
            continue
        n = min(len(series(p, s)) for s in ok)
        steps = [st for st, _ in series(p, ok[0])[:n]]
        vals = np.array([[v for _, v in series(p, s)[:n]] for s in ok])
        style = arm_style(p.scale, scales.index(p.scale))
        ax.plot(steps, vals.mean(0), lw=1.2, ms=3, label=p.scale, **style)
        ax.fill_between(steps, vals.min(0), vals.max(0), color=style["color"], alpha=0.15, lw=0)
        shown.setdefault(id(ax), []).extend(vals.ravel().tolist())
    for i, d in enumerate(designs):
        for j, D in enumerate(sizes):
            ax = axes[i][j]
            ax.set_title(f"design {d}, D={D}", fontsize=8)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            fitted_ylim(ax, shown.get(id(ax), []))
            if ax.get_legend_handles_labels()[1]:
                ax.legend(fontsize=6)
            elif not ax.lines:  # no point of this sweep has this design and D
                ax.text(0.5, 0.5, "no run", ha="center", va="center", fontsize=8, color="grey", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
        axes[i][0].set_ylabel(ylabel, fontsize=8)
    return _finish(fig, path, dpi)


def plot_vs_head_size(points: list[PointResult], path, lr: float | None, what: str = "final", dpi: int = 90):
    """Final val loss (``what="final"``, error bars = std over seeds) or entropy per layer against D.

    In the entropy plot the colour is the scale and the line style the layer;
    the legend lists both (every scale, every layer).
    """
    plt = _plt()
    pts = grid_points(points, lr)
    designs = sorted({p.design for p in pts})
    width = 4.4 if what == "final" else 5.4  # the entropy legend sits beside each panel
    fig, axes = plt.subplots(1, len(designs), figsize=(width * len(designs), 3.4), squeeze=False)
    for i, d in enumerate(designs):
        ax = axes[0][i]
        scales = sorted({p.scale for p in pts if p.design == d}, key=scale_rank)
        shown: list[float] = []
        layers = max((len(p.entropy or []) for p in pts if p.design == d), default=0)
        for k, scale in enumerate(scales):
            row = sorted((p for p in pts if p.design == d and p.scale == scale), key=lambda p: p.head_size)
            xs = [p.head_size for p in row]
            style = arm_style(scale, k)
            if what == "final":
                ms = [point_numbers(p, None)["final"] for p in row]
                ax.errorbar(dodged(xs, k, len(scales)), [m for m, _ in ms], yerr=[s for _, s in ms], ms=3, capsize=3,
                            label=scale, **style)  # fmt: skip
                shown += [m - s for m, s in ms] + [m + s for m, s in ms]
                continue
            for layer in range(layers):
                ys = [p.entropy[layer] if p.entropy and layer < len(p.entropy) else math.nan for p in row]
                ls = "-" if layer == layers - 1 else LAYER_STYLES[layer % len(LAYER_STYLES)]
                ax.plot(xs, ys, ls=ls, marker=style["marker"], ms=3, color=style["color"], alpha=ALPHA)
                shown += ys
        if what != "final":
            _entropy_legend(ax, scales, layers)
        elif ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=6)
        _head_size_axis(ax, sorted({p.head_size for p in pts if p.design == d}))
        ax.set_ylabel("final val loss" if what == "final" else "row entropy / log(len)", fontsize=8)
        title = "width fixed (heads = C/D)" if d == "a" else "head count fixed"
        ax.set_title(f"design {d}: {title}", fontsize=9)
        ax.tick_params(labelsize=7)
        fitted_ylim(ax, shown, high_percentile=100.0)
    if what != "final":
        fig.suptitle("attention entropy after training (colour: scale; line style: layer, last solid)", fontsize=9)
    return _finish(fig, path, dpi)


def _entropy_legend(ax, scales: list[str], layers: int) -> None:
    """A legend entry per scale (its colour and marker) and per layer (its line style, in grey)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=arm_style(s, k)["color"], marker=arm_style(s, k)["marker"], ls="none", label=s)
               for k, s in enumerate(scales)]  # fmt: skip
    for layer in range(layers):
        last = layer == layers - 1
        ls = "-" if last else LAYER_STYLES[layer % len(LAYER_STYLES)]
        handles.append(Line2D([], [], color="grey", ls=ls, label=f"layer {layer + 1}" + (" (last)" if last else "")))
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not over, the data


def token_label(char: str) -> str:
    """A prompt character as an axis label: whitespace made visible."""
    return {"\n": "\\n", " ": "␣", "\t": "\\t"}.get(char, char)


def plot_heatmaps(weights_by_scale: dict[str, tuple[str, list[np.ndarray]]], path, layer: int = -1, dpi: int = 90):
    """A row per scale, a column per head: the (T, T) weights of one layer for the prompt.

    Rows are queries, columns keys, both labelled with the prompt's characters
    (every k-th one beyond 24 tokens); one colour bar for all panels (0..1).
    """
    plt = _plt()
    scales = list(weights_by_scale)
    H = max(ws[layer].shape[0] for _, ws in weights_by_scale.values())
    fig, axes = plt.subplots(len(scales), H, figsize=(2.6 * H + 0.8, 2.6 * len(scales)), squeeze=False)
    image = None
    for i, scale in enumerate(scales):
        prompt, ws = weights_by_scale[scale]
        w = ws[layer]
        T = w.shape[-1]
        every = max(1, math.ceil(T / 24))
        ticks = list(range(0, T, every))
        labels = [token_label(c) for c in prompt[:T]]
        for h in range(H):
            ax = axes[i][h]
            if h >= w.shape[0]:
                ax.axis("off")
                continue
            image = ax.imshow(w[h], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"{scale}, head {h}", fontsize=7)
            ax.set_xticks(ticks, [labels[t] for t in ticks], fontsize=6, fontfamily="monospace")
            ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=6, fontfamily="monospace")
            ax.tick_params(length=1, pad=1)
        axes[i][0].set_ylabel("query token", fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("key token", fontsize=6)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
        bar.set_label("attention weight", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return fig


# ---------------------------------------------------------------------------
# The tuned answer's figures (rows: tuned.best_rows)
# ---------------------------------------------------------------------------


def plot_tuned_best(rows: list[dict], path, dpi: int = 90):
    """Left: final val loss at each arm's best learning rate against D. Right: that learning rate against D."""
    plt = _plt()
    designs = sorted({r["design"] for r in rows})
    fig, axes = plt.subplots(len(designs), 2, figsize=(8.4, 3.2 * len(designs)), squeeze=False)
    for i, design in enumerate(designs):
        scales = sorted({r["scale"] for r in rows if r["design"] == design}, key=scale_rank)
        shown: list[float] = []
        for k, scale in enumerate(scales):
            rs = sorted((r for r in rows if r["design"] == design and r["scale"] == scale and r["best_lr"]),
                        key=lambda r: r["head_size"])  # fmt: skip
            xs = [r["head_size"] for r in rs]
            style = arm_style(scale, k)
            means, stds = [r["best"][0] for r in rs], [r["best"][1] for r in rs]
            axes[i][0].errorbar(dodged(xs, k, len(scales)), means, yerr=stds, ms=3, capsize=3, label=scale, **style)
            shown += [m - s for m, s in zip(means, stds)] + [m + s for m, s in zip(means, stds)]
            style = dict(style, ls="--" if any(r["edge"] for r in rs) else "-")
            axes[i][1].plot(dodged(xs, k, len(scales)), [r["best_lr"] for r in rs], ms=4, label=scale, **style)
        sizes = sorted({r["head_size"] for r in rows if r["design"] == design})
        for ax, ylabel in zip(axes[i], ("final val loss at the best lr", "best learning rate")):
            _head_size_axis(ax, sizes)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"design {design}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
        fitted_ylim(axes[i][0], shown, high_percentile=100.0)
        tried = sorted({lr for r in rows if r["design"] == design for lr in r["learning_rates"]})
        axes[i][1].set_yscale("log", base=2)
        axes[i][1].set_yticks(tried, [f"{lr:g}" for lr in tried])
        axes[i][1].minorticks_off()
        axes[i][1].set_ylim(tried[0] / 1.3, tried[-1] * 1.3)  # the range tried: where a best lr could be
    return _finish(fig, path, dpi)


def plot_tuned_curves(rows: list[dict], path, dpi: int = 90):
    """Top: val loss against step at each arm's best lr, a panel per (design, D). Bottom: arm − sqrt over time."""
    plt = _plt()
    shapes = sorted({(r["design"], r["head_size"]) for r in rows})
    fig, axes = plt.subplots(2, len(shapes), figsize=(3.0 * len(shapes), 5.2), squeeze=False)
    for j, (design, D) in enumerate(shapes):
        rs = sorted((r for r in rows if (r["design"], r["head_size"]) == (design, D) and r["point"]),
                    key=lambda r: scale_rank(r["scale"]))  # fmt: skip
        scales = [r["scale"] for r in rs]
        curves = {r["scale"]: mean_curve(r["point"]) for r in rs}
        top, bottom = [], [0.0]
        for k, r in enumerate(rs):
            steps, mean = curves[r["scale"]]
            style = arm_style(r["scale"], k)
            axes[0][j].plot(steps, mean, lw=1.2, ms=3, label=f"{r['scale']} (lr {r['best_lr']:g})", **style)
            top += mean.tolist()
            if "sqrt" in curves and r["scale"] != "sqrt":
                ref_steps, ref = curves["sqrt"]
                n = min(len(steps), len(ref_steps))
                axes[1][j].plot(steps[:n], mean[:n] - ref[:n], lw=1.2, ms=3, label=r["scale"],
                                **arm_style(r["scale"], scales.index(r["scale"])))  # fmt: skip
                bottom += (mean[:n] - ref[:n]).tolist()
        fitted_ylim(axes[0][j], top)
        fitted_ylim(axes[1][j], bottom, high_percentile=100.0)
        axes[0][j].set_title(f"design {design}, D={D}", fontsize=8)
        axes[1][j].axhline(0.0, color="grey", lw=0.8, ls="--")
        for ax in axes[:, j]:
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            if ax.get_legend_handles_labels()[1]:
                ax.legend(fontsize=5)
    axes[0][0].set_ylabel("val loss (mean over seeds)", fontsize=8)
    axes[1][0].set_ylabel("arm − sqrt, each at its best lr", fontsize=8)
    return _finish(fig, path, dpi)
