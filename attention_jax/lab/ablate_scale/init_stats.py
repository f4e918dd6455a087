"""The ablate-scale study at initialization: attention statistics over arms x head sizes, no training.

An arm is a scale rule with or without QK-LayerNorm (``"sqrt+qknorm"``). Two
settings: unit-Gaussian q, k, v (the lecture's), and freshly initialized
TransformerLMs on real tokens. The statistics themselves are the pure
functions of :mod:`attention_jax.stats`; this module runs the grid and writes
its table and plot (``attention-jax-attention-stats``).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np

from attention_jax import attention
from attention_jax import data as data_lib
from attention_jax.model import ModelConfig, TransformerLM, init_params
from attention_jax.stats import STAT_KEYS, gaussian_qk_stats, model_qk_stats

__all__ = [
    "STAT_KEYS",
    "arm_label",
    "gaussian_grid",
    "markdown_table",
    "model_grid",
    "parse_arm",
    "plot_grid",
    "run_grid",
    "write_outputs",
]


def parse_arm(label: str) -> tuple[str, bool]:
    """``"sqrt+qknorm"`` -> ("sqrt", True); ``"none"`` -> ("none", False)."""
    scale, _, extra = label.partition("+")
    if extra not in ("", "qknorm"):
        raise ValueError(f"arm {label!r}: expected SCALE or SCALE+qknorm, e.g. 'sqrt+qknorm'")
    attention.resolve_scale(scale, 1)  # raises with the valid choices
    return scale, extra == "qknorm"


def arm_label(scale: str | float, qk_norm: bool) -> str:
    return f"{scale}+qknorm" if qk_norm else str(scale)


def gaussian_grid(arms, head_sizes, *, seeds: int, B: int, H: int, T: int) -> list[dict]:
    """One row per (arm, D): every statistic of ``gaussian_qk_stats`` averaged over seeds."""
    rows = []
    for label in arms:
        scale, qk_norm = parse_arm(label)
        for D in head_sizes:
            runs = [
                gaussian_qk_stats(jax.random.key(s), head_size=D, scale=scale, qk_norm=qk_norm, B=B, H=H, T=T)
                for s in range(seeds)
            ]
            rows.append({"setting": "gaussian", "arm": label, "head_size": D, **_mean_dicts(runs)})
    return rows


def model_grid(
    arms, head_sizes, *, tokens: jax.Array, targets: jax.Array, seeds: int, model_kwargs: dict
) -> list[dict]:
    """One row per (arm, D): ``model_qk_stats`` of freshly initialized TransformerLMs, mean over init seeds.

    ``model_kwargs`` are ModelConfig fields; ``head_size``, ``attn_scale`` and
    ``qk_norm`` come from the grid.
    """
    rows = []
    for label in arms:
        scale, qk_norm = parse_arm(label)
        for D in head_sizes:
            model = TransformerLM(ModelConfig(**model_kwargs, head_size=D, attn_scale=scale, qk_norm=qk_norm))
            runs = []
            for s in range(seeds):
                params = init_params(model, jax.random.key(s), model.model_config.block_size)
                runs.append(model_qk_stats(model, params, tokens, targets))
            rows.append({"setting": "model", "arm": label, "head_size": D, **_mean_dicts(runs)})
    return rows


def _mean_dicts(runs: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table, one line per (setting, arm, D)."""
    head = "| setting | arm | D | logit var | entropy | max weight | rows > 0.99 | grad q | grad k |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['arm']} | {r['head_size']} | {r['logit_var']:.3g} | {r['entropy']:.3f} | "
            f"{r['max_weight']:.3f} | {r['saturated']:.1%} | {r['grad_q']:.3g} | {r['grad_k']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def plot_grid(rows: list[dict], path, dpi: int = 90) -> None:
    """One row of panels per setting, one panel per statistic, one line per arm, against D (log2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    keys = ("logit_var", "entropy", "max_weight", "saturated", "grad_q")
    titles = {
        "logit_var": "logit variance",
        "entropy": "row entropy / log(len)",
        "max_weight": "mean max weight",
        "saturated": "rows with max > 0.99",
        "grad_q": "grad norm at q",
    }
    fig, axes = plt.subplots(len(settings), len(keys), figsize=(3.2 * len(keys), 2.8 * len(settings)), squeeze=False)
    for i, setting in enumerate(settings):
        for j, key in enumerate(keys):
            ax = axes[i][j]
            for arm in dict.fromkeys(r["arm"] for r in rows):
                pts = [(r["head_size"], r[key]) for r in rows if r["setting"] == setting and r["arm"] == arm]
                ax.plot(*zip(*pts), marker="o", ms=3, label=arm)
            ax.set_xscale("log", base=2)
            if key in ("logit_var", "grad_q"):
                ax.set_yscale("log")
            ax.set_title(f"{setting}: {titles[key]}", fontsize=9)
            ax.set_xlabel("head size D", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# ---------------------------------------------------------------------------
# The whole study: configs/attention_stats.py -> rows -> table, CSV, plot
# ---------------------------------------------------------------------------


def run_grid(config: ml_collections.ConfigDict) -> list[dict]:
    """Every row of the study described by ``config`` (configs/attention_stats.py); bad values fail first."""
    arms = [a.strip() for a in config.arms.split(",") if a.strip()]
    for arm in arms:
        parse_arm(arm)  # bad arms fail before any compute
    try:
        head_sizes = [int(d) for d in config.head_sizes.split(",")]
    except ValueError:
        raise ValueError(f"head_sizes={config.head_sizes!r}: expected comma-separated integers like 4,8,16") from None
    if not arms or any(d <= 0 for d in head_sizes):
        raise ValueError("arms must name at least one arm and head_sizes must be positive")
    g = config.gaussian
    for key, value in (
        ("seeds", config.seeds),
        ("gaussian.batch_size", g.batch_size),
        ("gaussian.n_head", g.n_head),
        ("gaussian.seq_len", g.seq_len),
    ):
        if value < 1:
            raise ValueError(f"{key}={value}: must be a positive integer")
    rows = gaussian_grid(arms, head_sizes, seeds=config.seeds, B=g.batch_size, H=g.n_head, T=g.seq_len)
    if not config.model.enabled:
        return rows
    m = config.model
    try:
        text = data_lib.load_text(m.dataset)
    except FileNotFoundError as e:
        print(f"skipping the model setting: {e}", file=sys.stderr)
        return rows
    tokenizer, _, val = data_lib.prepare(text)
    x, y = data_lib.get_batch(jax.random.key(0), val, m.batch_size, m.block_size)  # a fixed batch
    kwargs = dict(
        vocab_size=tokenizer.vocab_size,
        block_size=m.block_size,
        n_embd=m.n_embd,
        n_head=m.n_head,
        n_layer=m.n_layer,
        pos_encoding=m.pos_encoding,
    )
    return rows + model_grid(arms, head_sizes, tokens=x, targets=y, seeds=config.seeds, model_kwargs=kwargs)


def write_outputs(rows: list[dict], outdir: str | Path) -> str:
    """attention_stats.md, .csv and .png in ``outdir``; returns the markdown table."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (outdir / "attention_stats.md").write_text(table)
    with open(outdir / "attention_stats.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["setting", "arm", "head_size", *STAT_KEYS])
        writer.writeheader()
        writer.writerows(rows)
    plot_grid(rows, outdir / "attention_stats.png")
    return table
