"""The ablate-scale report: tables and plots from the points' workdirs of a scale x head-size sweep.

Data flow: ``<sweep dir>/<point>/`` (config.json, metrics.jsonl, optional
checkpoints/) -> ``points.load_points`` -> ``PointResult`` (per-seed numbers)
-> mean ± std over seeds -> report.md (tables here, the tuned section in
``tuned.py``) and PNGs (``plots.py``).

Everything is read back from what training wrote; nothing is taken from the
sweep definition, so a sweep dir filled by hand, by ``--index`` workers on
several machines or by plain ``experiments.train`` runs reports the same.
An arm is (design, scale, head size, learning rate):
  design a  ``model.head_size`` unset: D = n_embd / n_head (width fixed)
  design b  ``model.head_size`` set: D independent of n_embd (heads fixed)
  scale     ``model.attn_scale``, plus ``+qknorm`` (``+qkrms``) for ``model.qk_norm``
Standard deviations are over seeds with ddof=1 (0 for a single seed).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from attention_jax.lab.ablate_scale import tuned
from attention_jax.lab.ablate_scale.plots import plot_curves, plot_heatmaps, plot_vs_head_size
from attention_jax.lab.ablate_scale.points import (  # noqa: F401 (the report's names since before the split)
    DIAGNOSTIC_NUMBERS,
    SCALE_ORDER,
    PointResult,
    base_learning_rate,
    default_target,
    describe_config,
    grid_points,
    load_points,
    mean_std,
    paired_delta,
    point_numbers,
    read_point,
    scale_rank,
    steps_to_target,
)
from attention_jax.lab.rundir import RunDir
from attention_jax.lab.runs import load_run

DEFAULT_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"

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


def diagnostics_table(points: list[PointResult]) -> str:
    """Markdown: per point, the stability diagnostics of its last evaluation (mean over its seeds), or ""."""
    lines = []
    for p in points:
        last = [p.extra.get("diagnostics", {}).get(s) for s in p.seeds]
        last = [d[-1][1] for d in last if d]
        if not last:
            continue
        mean = {k: float(np.mean([d[k] for d in last])) for k in DIAGNOSTIC_NUMBERS}
        cells = " | ".join(f"{mean[k]:.3g}" for k in DIAGNOSTIC_NUMBERS)
        lines.append(f"| {p.design} | {p.scale} | {p.head_size} | {p.learning_rate:g} | {cells} |")
    if not lines:
        return ""
    head = "| design | scale | D | lr | largest attention logit | lowest layer entropy | log Z (mean) | log Z (max) |"
    return "\n".join([head, "|" + "---|" * 8, *lines]) + "\n"


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
    for (design, D, scale), by_lr in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], scale_rank(kv[0][2]))):
        finals = {lr: point_numbers(p, None)["final"] for lr, p in by_lr.items()}
        cells = [_pm(finals[lr]) if lr in finals else "" for lr in lrs]
        ok = {lr: f[0] for lr, f in finals.items() if math.isfinite(f[0])}
        best = f"{min(ok, key=ok.get):g}" if ok else "—"
        lines.append(f"| {design} | {D} | {scale} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines) + "\n"


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
    main = grid_points(points, lr)
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
            md.append("### Every point at the other learning rates\n")
            md.append(arm_table([p for p in points if p.learning_rate != lr], target))
        figures = []
        plot_curves(points, outdir / "val_loss_curves.png", lr, dpi=dpi)
        figures.append(("Validation loss curves (mean over seeds; band: min..max)", "val_loss_curves.png"))
        plot_vs_head_size(points, outdir / "final_loss_vs_head_size.png", lr, "final", dpi=dpi)
        figures.append(
            ("Final validation loss against head size (error bars: std over seeds)", "final_loss_vs_head_size.png")
        )
    diag_md = diagnostics_table(points)
    if diag_md:
        md.append("## Stability diagnostics (last evaluation)\n")
        md.append(
            "Logged at every evaluation on the same validation rows (metrics.jsonl, TensorBoard), mean over seeds: "
            "the largest attention logit q·kᵀ·scale of any layer and head, the lowest layer's mean head entropy, "
            "and the log-normalizer log Z of the output softmax (Wortsman et al. 2023; Zhai et al. 2023).\n"
        )
        md.append(diag_md)
        max_logits = lambda p, s: [(st, d["max_logit"]) for st, d in p.extra.get("diagnostics", {}).get(s, [])]
        plot_curves(points, outdir / "max_logit_curves.png", lr, dpi=dpi, ylabel="largest attention logit",
                    series=max_logits)  # fmt: skip
        figures.append(("The largest attention logit against step (mean over seeds; band: min..max)",
                        "max_logit_curves.png"))  # fmt: skip
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
    chosen = sorted((p for p in pool if p.head_size == D), key=lambda p: scale_rank(p.scale))
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
