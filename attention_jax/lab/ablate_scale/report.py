"""The ablate-scale report: tables and plots from the points' workdirs of a scale x head-size sweep.

Data flow: ``<sweep dir>/<point>/`` (config.json, metrics.jsonl, optional
checkpoints/) -> ``load_points`` -> ``PointResult`` (per-seed numbers) ->
``aggregate`` (mean ± std over seeds) -> report.md and PNGs.

Everything is read back from what training wrote; nothing is taken from the
sweep definition, so a sweep dir filled by hand, by ``--index`` workers on
several machines or by plain ``experiments.train`` runs reports the same.
An arm is (design, scale, head size, learning rate):
  design a  ``model.head_size`` unset: D = n_embd / n_head (width fixed)
  design b  ``model.head_size`` set: D independent of n_embd (heads fixed)
  scale     ``model.attn_scale``, plus ``+qknorm`` when ``model.qk_norm``
Standard deviations are over seeds with ddof=1 (0 for a single seed).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attention_jax.lab.rundir import RunDir
from attention_jax.lab.runs import load_run

SCALE_ORDER = ("none", "sqrt", "mup", "sqrt+qknorm")
DEFAULT_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"


# ---------------------------------------------------------------------------
# Reading points
# ---------------------------------------------------------------------------


@dataclass
class PointResult:
    name: str
    workdir: Path
    config: dict
    design: str  # "a" (width fixed) or "b" (head count fixed)
    scale: str  # "none", "sqrt", "mup", with "+qknorm" when model.qk_norm
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


def describe_config(config: dict) -> dict:
    """design, scale label, head size, n_head and learning rate of a run's config.json."""
    m = config["model"]
    explicit = m.get("head_size") is not None
    head_size = int(m["head_size"]) if explicit else int(m["n_embd"]) // int(m["n_head"])
    scale = str(m.get("attn_scale", "sqrt")) + ("+qknorm" if m.get("qk_norm") else "")
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
    diverged = {s: False for s in seeds}
    for r in rows:
        s = r.get("seed", base)
        if s not in evals:
            continue
        if "val_loss" in r:
            evals[s].append((int(r["step"]), float(r["val_loss"])))
            if not math.isfinite(float(r["val_loss"])):
                diverged[s] = True
        if "diverged_at" in r or ("loss" in r and not math.isfinite(float(r["loss"]))):
            diverged[s] = True
    for s in evals:
        evals[s].sort()
    status = "done" if run.has_summary() else (run.read_point_record() or {}).get("status", "incomplete")
    return PointResult(
        name=run.path.name, workdir=run.path, config=config, seeds=seeds, evals=evals, diverged=diverged, status=status,
        **describe_config(config),
    )  # fmt: skip


def load_points(sweep_dir: str | os.PathLike) -> list[PointResult]:
    """Every point folder of a sweep dir, sorted by arm."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep dir not found: {sweep_dir}")
    points = [p for d in sorted(sweep_dir.iterdir()) if d.is_dir() and (p := read_point(d)) is not None]
    if not points:
        raise FileNotFoundError(f"no runs in {sweep_dir}: no subfolder has a config.json")
    return sorted(points, key=lambda p: (p.design, _scale_rank(p.scale), p.head_size, p.learning_rate))


def _scale_rank(scale: str) -> tuple:
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


# ---------------------------------------------------------------------------
# Attention from the trained checkpoints
# ---------------------------------------------------------------------------


def load_params(workdir: str | os.PathLike, which: str = "latest"):
    """(model, [params of each seed], tokenizer) of a point's checkpoint, or None without one."""
    if not RunDir(workdir).has_checkpoint(which):
        return None
    try:
        run = load_run(workdir, which)
    except FileNotFoundError:
        return None
    return run.model, [run.params(i) for i in range(run.num_members)], run.tokenizer


def eval_tokens(text: str, tokenizer, block_size: int, batch_size: int = 8, train_fraction: float = 0.9):
    """A fixed (B, T) batch from the validation part of ``text``: the same for every point."""
    import jax
    import jax.numpy as jnp

    from attention_jax.data import get_batch, split

    _, val = split(text, train_fraction)
    ids = jnp.asarray(tokenizer.encode(val))
    x, _ = get_batch(jax.random.key(0), ids, batch_size, block_size)
    return x


def add_entropies(points: list[PointResult], text: str | None) -> None:
    """Set ``p.entropy`` (per layer, mean over seeds) from each point's latest checkpoint on a fixed batch."""
    from attention_jax.data import load_text
    from attention_jax.stats import layer_entropies

    texts: dict[str, str] = {}
    for p in points:
        loaded = load_params(p.workdir)
        if loaded is None:
            continue
        model, seed_params, tokenizer = loaded
        model_config = getattr(model, "model_config", None)
        if model_config is None or model_config.attention_impl != "dense":  # bigram or a fused path: no weights
            continue
        if text is None:
            dataset = p.config["data"]["dataset"]
            if dataset not in texts:
                texts[dataset] = load_text(dataset)
            t = texts[dataset]
        else:
            t = text
        tokens = eval_tokens(t, tokenizer, model_config.block_size, train_fraction=p.config["data"]["train_fraction"])
        per_seed = [layer_entropies(model, params, tokens) for params in seed_params]
        p.entropy = [float(x) for x in np.mean(per_seed, axis=0)]


def prompt_weights(p: PointResult, prompt: str):
    """Attention weights of seed 0 for ``prompt``: (tokens, [(H, T, T) per layer]) or None."""
    import jax.numpy as jnp

    from attention_jax.stats import sown_attention_weights

    loaded = load_params(p.workdir)
    if loaded is None:
        return None
    model, seed_params, tokenizer = loaded
    if getattr(getattr(model, "model_config", None), "attention_impl", None) != "dense":
        return None  # bigram, or a fused attention path: no weights recorded
    prompt = "".join(c for c in prompt if c in tokenizer.chars)[: model.model_config.block_size]
    tokens = jnp.asarray(tokenizer.encode(prompt))[None]
    return prompt, [np.asarray(w[0]) for w in sown_attention_weights(model, seed_params[0], tokens)]


def format_weights(w: np.ndarray) -> str:
    """A (T, T) weight matrix printed like the lecture's ``wei[0]``: 4 decimals, one row per line."""
    rows = ["[" + ", ".join(f"{x:.4f}" for x in row) + "]" for row in w]
    return "[" + ",\n ".join(rows) + "]"


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def _pm(ms: tuple[float, float]) -> str:
    m, s = ms
    return "—" if not math.isfinite(m) else f"{m:.3f} ± {s:.3f}"


def _signed(ms: tuple[float, float]) -> str:
    m, s = ms
    return "—" if not math.isfinite(m) else f"{m:+.3f} ± {s:.3f}"


def arm_table(points: list[PointResult], target: float | None) -> str:
    """Markdown: one line per point (design, scale, D, lr) with the numbers over its seeds."""
    head = (
        "| design | scale | D | heads | lr | final val loss | best val loss | final − sqrt (paired) | "
        f"steps to {target:.2f} (reached) | diverged | entropy per layer |"
    )
    lines = [head, "|" + "---|" * 11]
    refs = {(p.design, p.head_size, p.learning_rate): p for p in points if p.scale == "sqrt"}
    for p in points:
        ref = refs.get((p.design, p.head_size, p.learning_rate))
        delta = "—" if ref is None or ref is p else _signed(paired_delta(p, ref))
        n = point_numbers(p, target)
        steps, reached = n.get("to_target", (math.nan, 0))
        steps_text = f"{steps:.0f} ({reached}/{n['seeds'] - n['diverged']})" if reached else f"— (0/{n['seeds']})"
        ent = " / ".join(f"{e:.2f}" for e in p.entropy) if p.entropy else "—"
        status = "" if p.status == "done" else f" ({p.status} at step {n['last_step']})"
        arm = f"| {p.design} | {p.scale} | {p.head_size} | {p.n_head} | {p.learning_rate:g} "
        diverged = f"{n['diverged']}/{n['seeds']}"
        numbers = f"| {_pm(n['final'])}{status} | {_pm(n['best'])} | {delta} | {steps_text} | {diverged} | {ent} |"
        lines.append(arm + numbers)
    return "\n".join(lines) + "\n"


def lr_table(points: list[PointResult]) -> str:
    """Markdown: final val loss per scale (rows) and learning rate (columns) where several lrs were run."""
    groups: dict[tuple, dict[float, PointResult]] = {}
    for p in points:
        groups.setdefault((p.design, p.head_size, p.scale), {})[p.learning_rate] = p
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return ""
    lrs = sorted({lr for v in groups.values() for lr in v})
    lines = ["| design | D | scale | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |"]
    lines.append("|" + "---|" * (len(lrs) + 4))
    for (design, D, scale), by_lr in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], _scale_rank(kv[0][2]))):
        finals = {lr: point_numbers(p, None)["final"] for lr, p in by_lr.items()}
        cells = [_pm(finals[lr]) if lr in finals else "" for lr in lrs]
        ok = {lr: f[0] for lr, f in finals.items() if math.isfinite(f[0])}
        best = f"{min(ok, key=ok.get):g}" if ok else "—"
        lines.append(f"| {design} | {D} | {scale} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid_points(points, lr):
    """The points at learning rate ``lr`` (all of them for None)."""
    return [p for p in points if lr is None or p.learning_rate == lr]


def plot_curves(points: list[PointResult], path, lr: float, dpi: int = 90) -> None:
    """Val loss against step: a panel per (design, D), a line per scale (mean over seeds, band min..max)."""
    plt = _plt()
    pts = _grid_points(points, lr)
    designs = sorted({p.design for p in pts})
    sizes = sorted({p.head_size for p in pts})
    fig, axes = plt.subplots(len(designs), len(sizes), figsize=(2.6 * len(sizes), 2.3 * len(designs)), squeeze=False)
    colors = {}
    for p in pts:
        ax = axes[designs.index(p.design)][sizes.index(p.head_size)]
        ok = [s for s in p.seeds if p.evals[s] and not p.diverged[s]]
        if not ok:
            continue
        steps = [st for st, _ in p.evals[ok[0]]]
        n = min(len(p.evals[s]) for s in ok)
        vals = np.array([[v for _, v in p.evals[s][:n]] for s in ok])
        color = colors.setdefault(p.scale, f"C{len(colors)}")
        ax.plot(steps[:n], vals.mean(0), color=color, lw=1.2, label=p.scale)
        ax.fill_between(steps[:n], vals.min(0), vals.max(0), color=color, alpha=0.2)
    for i, d in enumerate(designs):
        for j, D in enumerate(sizes):
            ax = axes[i][j]
            ax.set_title(f"design {d}, D={D}", fontsize=8)
            ax.tick_params(labelsize=7)
            finals = [point_numbers(p, None)["final"][0] for p in pts]
            finite = [f for f in finals if math.isfinite(f)]
            if finite:
                ax.set_ylim(min(finite) - 0.05, min(finite) + 0.8)
    axes[0][0].set_ylabel("val loss", fontsize=8)
    with_lines = [ax for row in axes for ax in row if ax.lines]
    if with_lines:
        with_lines[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_vs_head_size(points: list[PointResult], path, lr: float, what: str = "final", dpi: int = 90) -> None:
    """Final val loss (``what="final"``, error bars = std over seeds) or entropy per layer against D."""
    plt = _plt()
    pts = _grid_points(points, lr)
    designs = sorted({p.design for p in pts})
    fig, axes = plt.subplots(1, len(designs), figsize=(4.2 * len(designs), 3.2), squeeze=False)
    for i, d in enumerate(designs):
        ax = axes[0][i]
        scales = sorted({p.scale for p in pts if p.design == d}, key=_scale_rank)
        for k, scale in enumerate(scales):
            row = sorted((p for p in pts if p.design == d and p.scale == scale), key=lambda p: p.head_size)
            xs = [p.head_size for p in row]
            if what == "final":
                ms = [point_numbers(p, None)["final"] for p in row]
                ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", ms=3, capsize=3,
                            color=f"C{k}", label=scale)  # fmt: skip
            else:
                layers = max((len(p.entropy or []) for p in row), default=0)
                for layer in range(layers):
                    ys = [p.entropy[layer] if p.entropy else math.nan for p in row]
                    style = "-" if layer == layers - 1 else ":"
                    label = f"{scale} (last layer)" if layer == layers - 1 else None
                    ax.plot(xs, ys, style, marker="o", ms=3, color=f"C{k}", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("head size D", fontsize=8)
        ax.set_ylabel("final val loss" if what == "final" else "row entropy / log(len)", fontsize=8)
        title = "width fixed (heads = C/D)" if d == "a" else "head count fixed"
        ax.set_title(f"design {d}: {title}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    if what != "final":
        fig.suptitle("attention entropy after training (dotted: earlier layers)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_heatmaps(weights_by_scale: dict[str, tuple[str, list[np.ndarray]]], path, layer: int = -1, dpi: int = 90):
    """A row per scale, a column per head: the (T, T) weights of one layer for the prompt."""
    plt = _plt()
    scales = list(weights_by_scale)
    H = max(ws[layer].shape[0] for _, ws in weights_by_scale.values())
    fig, axes = plt.subplots(len(scales), H, figsize=(2.1 * H, 2.2 * len(scales)), squeeze=False)
    for i, scale in enumerate(scales):
        prompt, ws = weights_by_scale[scale]
        w = ws[layer]
        for h in range(H):
            ax = axes[i][h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h < w.shape[0]:
                ax.imshow(w[h], cmap="viridis", vmin=0, vmax=1)
                ax.set_title(f"{scale}, head {h}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# ---------------------------------------------------------------------------
# The whole report
# ---------------------------------------------------------------------------


def write_report(
    sweep_dir: str | os.PathLike,
    outdir: str | os.PathLike | None = None,
    *,
    target: float | None = None,
    text: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    heatmap_head_size: int | None = None,
    entropy: bool = True,
    dpi: int = 90,
) -> Path:
    """Write report.md and PNGs for a sweep dir; returns the report's path.

    ``text``: the text the runs trained on (default: each run's
    ``data.dataset``), for the entropy batch. ``entropy=False`` skips
    everything that loads checkpoints.
    """
    sweep_dir = Path(sweep_dir)
    outdir = Path(outdir or sweep_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    points = load_points(sweep_dir)
    if target is None:
        target = default_target(points)
    if entropy:
        add_entropies(points, text)
    lr = base_learning_rate(points)
    main = _grid_points(points, lr)
    md = [f"# Sweep report: {sweep_dir.name}\n"]
    counts: dict[str, int] = {}
    for p in points:
        counts[p.status] = counts.get(p.status, 0) + 1
    md.append(
        f"{len(points)} points ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}), "
        f"{max(len(p.seeds) for p in points)} seeds each. Val loss: mean ± std over seeds (ddof=1) of the "
        f"last evaluation; best = lowest evaluation. Steps to target: first evaluation at or below {target:.2f}, "
        "mean over the seeds that reached it. final − sqrt: per seed, this arm's final val loss minus the sqrt arm's "
        "at the same design, D and learning rate (seeds share data order and eval batches), then mean ± std. "
        "Entropy: mean normalized row entropy of the causal attention weights per layer (first layer first), "
        "latest checkpoint, fixed validation batch, mean over seeds.\n"
    )
    from attention_jax.lab.ablate_scale import tuned

    if tuned.is_tuned(points):  # a learning rate per arm and D: the tuned answer, every point in detail
        tuned_md, figures = tuned.section(points, outdir, dpi=dpi)
        md.extend(tuned_md)
        md.append("## Every point\n")
        md.append(arm_table(points, target))
        main = [r["point"] for r in tuned.best_rows(points) if r["point"] is not None]
        at = ", each arm at its best learning rate"
    else:
        at = ""
        md.append(f"## Scale x head size (learning rate {lr:g})\n")
        md.append(arm_table(main, target))
        lr_md = lr_table(points)
        if lr_md:
            md.append("## Learning-rate axis (final val loss)\n")
            md.append(lr_md)
            md.append("\n" + arm_table([p for p in points if p.learning_rate != lr], target))
        figures = []
        plot_curves(points, outdir / "val_loss_curves.png", lr, dpi=dpi)
        figures.append(("Validation loss curves (mean over seeds; band: min..max)", "val_loss_curves.png"))
        plot_vs_head_size(points, outdir / "final_loss_vs_head_size.png", lr, "final", dpi=dpi)
        figures.append(
            ("Final validation loss against head size (error bars: std over seeds)", "final_loss_vs_head_size.png")
        )
    if any(p.entropy for p in main):
        plot_vs_head_size(main, outdir / "entropy_vs_head_size.png", None, "entropy", dpi=dpi)
        figures.append((f"Attention entropy after training against head size{at}", "entropy_vs_head_size.png"))
        md.extend(_heatmap_section(main, outdir, prompt, heatmap_head_size, figures, dpi))
    md.append("## Plots\n")
    for caption, name in figures:
        md.append(f"![{caption}]({name})\n\n*{caption}.*\n")
    path = outdir / "report.md"
    path.write_text("\n".join(md))
    return path


def _heatmap_section(points, outdir, prompt, head_size, figures, dpi) -> list[str]:
    design_a = [p for p in points if p.design == "a" and p.entropy]
    pool = design_a or [p for p in points if p.entropy]
    sizes = sorted({p.head_size for p in pool})
    D = head_size if head_size in sizes else sizes[len(sizes) // 2]
    chosen = sorted((p for p in pool if p.head_size == D), key=lambda p: _scale_rank(p.scale))
    weights = {}
    for p in chosen:
        got = prompt_weights(p, prompt)
        if got is not None:
            weights[p.scale] = got
    if not weights:
        return []
    plot_heatmaps(weights, outdir / "attention_heatmaps.png", dpi=dpi)
    some_prompt = next(iter(weights.values()))[0]
    figures.append(
        (f"Attention weights of the last layer, one column per head, design {chosen[0].design}, D={D}, seed "
         f"{chosen[0].seeds[0]}, prompt {some_prompt[:24]!r}...", "attention_heatmaps.png")
    )  # fmt: skip
    md = [f"## Attention weights for an 8-token window (design {chosen[0].design}, D={D}, last layer, head 0)\n"]
    window = some_prompt[:8]
    md.append(f"Prompt window {window!r}; row t = the weights token t gives to tokens 0..t.\n")
    for scale, (_, ws) in weights.items():
        md.append(f"{scale}:\n```\n{format_weights(ws[-1][0][:8, :8])}\n```\n")
    return md
