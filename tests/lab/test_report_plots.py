"""The ablate-scale report's figures say what they show: axis labels, fitted y-ranges, every arm and layer
visible and named, heatmaps with a colour bar and token labels, a heading over every table.

The sweep dirs are written by hand (config.json and metrics.jsonl, as training
leaves them), so no model is trained; entropies and attention weights are set
directly. Set ATTENTION_JAX_PLOTS_DIR to keep the PNGs for a look.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from attention_jax.lab.ablate_scale import plots, report, tuned

STEPS = (0, 50, 100, 150, 200)


def write_point(root, name, *, scale="sqrt", head_size=None, n_head=2, lr=1e-3, curves):
    """A point folder: config.json and metrics.jsonl with one eval row per (seed, step)."""
    d = root / name
    d.mkdir(parents=True)
    config = {
        "seed": 1337, "num_seeds": len(curves), "learning_rate": lr,
        "model": {"n_embd": 32, "n_head": n_head, "head_size": head_size, "attn_scale": scale, "qk_norm": False},
        "data": {"dataset": "tinyshakespeare", "train_fraction": 0.9},
    }  # fmt: skip
    (d / "config.json").write_text(json.dumps(config))
    rows = [
        {"step": step, "seed": 1337 + i, "val_loss": v} for i, seq in enumerate(curves) for step, v in zip(STEPS, seq)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text("{}")


def curve(final, start=4.2):
    """A loss curve that falls fast from ``start`` and settles near ``final`` (the shape a reader must see)."""
    return [final + (start - final) * math.exp(-k) for k in range(len(STEPS))]


@pytest.fixture
def sweep(tmp_path):
    """Design a (D=8, 16) and b (D=8): none, sqrt, mup; 'mup' equals 'sqrt' exactly at D=16 (overlapping arms)."""
    root = tmp_path / "sweep"
    for D, heads in ((8, 4), (16, 2)):
        write_point(root, f"none_{D}", scale="none", n_head=heads, curves=[curve(2.60), curve(2.64)])
        write_point(root, f"sqrt_{D}", scale="sqrt", n_head=heads, curves=[curve(2.50), curve(2.52)])
        mup = [curve(2.50), curve(2.52)] if D == 16 else [curve(2.55), curve(2.57)]
        write_point(root, f"mup_{D}", scale="mup", n_head=heads, curves=mup)
    for scale, final in (("none", 2.7), ("sqrt", 2.55)):
        write_point(root, f"b_{scale}", scale=scale, head_size=8, curves=[curve(final), curve(final + 0.03)])
    write_point(root, "sqrt_16_lr3", scale="sqrt", n_head=2, lr=3e-3, curves=[curve(2.45), curve(2.49)])
    return root


@pytest.fixture
def tuned_sweep(tmp_path):
    root = tmp_path / "tuned"
    for scale, best in (("none", 2.6), ("sqrt", 2.5)):
        for lr, extra in ((1e-3, 0.2), (2e-3, 0.0), (4e-3, 0.1)):
            write_point(root, f"{scale}_{lr:g}", scale=scale, lr=lr, curves=[curve(best + extra), curve(best + extra)])
    return root


def out(tmp_path, name):
    keep = os.environ.get("ATTENTION_JAX_PLOTS_DIR")
    folder = tmp_path if not keep else __import__("pathlib").Path(keep)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def drawn(ax) -> np.ndarray:
    """Every finite y value drawn on ``ax``: lines, error bar ends and the min..max bands (not reference
    lines such as ``axhline``, whose x spans the axes)."""
    ys = [np.asarray(line.get_ydata(), np.float64) for line in ax.lines if line.get_transform() is ax.transData]
    for container in ax.containers:  # errorbar: the bar ends
        for segments in container.lines[2]:
            ys += [np.asarray(seg)[:, 1] for seg in segments.get_segments()]
    for collection in ax.collections:  # fill_between bands
        ys += [path.vertices[:, 1] for path in collection.get_paths()]
    v = np.concatenate(ys) if ys else np.array([])
    return v[np.isfinite(v)]


def assert_fitted(ax, high_percentile=90.0, margin=0.06):
    """The y-range shows the data's minimum and (at least) its ``high_percentile``-th percentile, and
    reaches no further than ``margin`` of the data's full span beyond it on either side: the plot is
    mostly data, not empty space."""
    v = drawn(ax)
    lo, hi, top_of_data = v.min(), np.percentile(v, high_percentile), v.max()
    bottom, top = ax.get_ylim()
    assert bottom <= lo and top >= hi, (ax.get_title(), (bottom, top), (lo, hi))
    slack = margin * (top_of_data - lo) + 1e-9
    assert bottom >= lo - slack and top <= top_of_data + slack, (ax.get_title(), (bottom, top), (lo, top_of_data))


def styles(ax) -> dict[str, tuple]:
    return {line.get_label(): (line.get_linestyle(), line.get_marker()) for line in ax.lines
            if not line.get_label().startswith("_")}  # fmt: skip


def test_loss_curves_say_step_fit_the_data_and_keep_overlapping_arms_apart(sweep, tmp_path):
    points = report.load_points(sweep)
    fig = plots.plot_curves(points, out(tmp_path, "curves.png"), 1e-3)
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == 3  # (a, 8), (a, 16), (b, 8)
    for ax in panels:
        assert ax.get_xlabel() == "step"
        assert_fitted(ax)
        look = styles(ax)
        assert len(set(look.values())) == len(look), look  # no two arms drawn alike
        assert all(line.get_alpha() < 1 for line in ax.lines)
        assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == sorted(look)
    a16 = next(ax for ax in panels if ax.get_title() == "design a, D=16")
    by_label = {line.get_label(): line for line in a16.lines}
    np.testing.assert_array_equal(by_label["mup"].get_ydata(), by_label["sqrt"].get_ydata())  # the overlap is real
    assert styles(a16)["mup"] != styles(a16)["sqrt"]
    # The old fixed range (min final - 0.05 .. min final + 0.8) hid the start of training: it must be shown now.
    assert a16.get_ylim()[1] >= np.percentile(drawn(a16), 90)


def test_fitted_ylim_is_a_percentile_range_with_a_margin():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    values = [4.2, 2.5, 2.6, 2.55, 2.52, 2.51, 2.5, math.nan]
    plots.fitted_ylim(ax, values, high_percentile=100.0, margin=0.1)
    assert ax.get_ylim() == pytest.approx((2.5 - 0.17, 4.2 + 0.17))
    plots.fitted_ylim(ax, [3.0, 3.0])  # a flat line still gets a visible range around it
    bottom, top = ax.get_ylim()
    assert bottom < 3.0 < top
    plt.close(fig)


def test_final_loss_against_head_size_fits_its_error_bars(sweep, tmp_path):
    fig = plots.plot_vs_head_size(report.load_points(sweep), out(tmp_path, "final.png"), 1e-3, "final")
    for ax in fig.axes:
        assert ax.get_xlabel() == "head size D" and ax.get_ylabel() == "final val loss"
        assert_fitted(ax, high_percentile=100.0)
        scales = {p.scale for p in report.load_points(sweep) if p.design == ax.get_title()[7]}
        assert {t.get_text() for t in ax.get_legend().get_texts()} == scales
    a = fig.axes[0]  # sqrt and mup have the same mean at D=16: their bars sit side by side, not on each other
    x_at_16 = {c.get_label(): c.lines[0].get_xdata()[-1] for c in a.containers}
    assert x_at_16["mup"] != x_at_16["sqrt"] and all(abs(x / 16 - 1) < 0.1 for x in x_at_16.values())
    assert [t.get_text() for t in a.get_xticklabels()] == ["8", "16"]


def test_entropy_legend_names_every_layer_and_every_scale(sweep, tmp_path):
    points = report.load_points(sweep)
    for p in points:  # three layers; each scale lower than the last by a fixed amount
        p.entropy = [0.9 - 0.1 * layer - 0.02 * report.SCALE_ORDER.index(p.scale) for layer in range(3)]
    fig = plots.plot_vs_head_size(points, out(tmp_path, "entropy.png"), None, "entropy")
    assert "layer" in fig._suptitle.get_text()
    for ax in fig.axes:
        design = ax.get_title()[7]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        scales = sorted({p.scale for p in points if p.design == design}, key=report.scale_rank)
        assert labels == [*scales, "layer 1", "layer 2", "layer 3 (last)"]
        # the legend's line style of each layer is the one its lines are drawn with
        handles = dict(zip(labels, ax.get_legend().legend_handles))
        drawn_styles = {line.get_linestyle() for line in ax.lines}
        layer_styles = [handles[name].get_linestyle() for name in labels[len(scales) :]]
        assert len(set(layer_styles)) == 3 and set(layer_styles) == drawn_styles
        assert_fitted(ax, high_percentile=100.0)


def test_heatmaps_have_a_colour_bar_and_the_prompt_on_both_axes(tmp_path):
    rng = np.random.default_rng(0)
    prompt = "ROMEO:\nBut soft"
    T, H = len(prompt), 2

    def causal_weights():
        logits = rng.normal(size=(H, T, T))
        logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        return w / w.sum(-1, keepdims=True)

    fig = plots.plot_heatmaps({s: (prompt, [causal_weights()]) for s in ("none", "sqrt")}, out(tmp_path, "heat.png"))
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylabel() == "attention weight"
    assert bars[0].get_ylim() == (0.0, 1.0)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4
    want = [plots.token_label(c) for c in prompt]
    assert want[6] == "\\n" and want[10] == "␣"
    for ax in panels:
        assert [t.get_text() for t in ax.get_xticklabels()] == want
        assert [t.get_text() for t in ax.get_yticklabels()] == want


def test_long_prompts_label_every_kth_token(tmp_path):
    prompt = "abcdefghij" * 6  # 60 tokens: every 3rd labelled
    w = np.tril(np.ones((1, 60, 60))) / np.arange(1, 61)[:, None]
    fig = plots.plot_heatmaps({"sqrt": (prompt, [w])}, out(tmp_path, "heat_long.png"))
    ax = next(ax for ax in fig.axes if ax.images)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(prompt[::3])
    assert list(ax.get_xticks()) == list(range(0, 60, 3))


def test_tuned_figures_label_steps_fit_the_data_and_name_each_arm(tuned_sweep, tmp_path):
    rows = tuned.best_rows(report.load_points(tuned_sweep))
    fig = plots.plot_tuned_curves(rows, out(tmp_path, "tuned_curves.png"))
    top, bottom = fig.axes
    for ax in (top, bottom):
        assert ax.get_xlabel() == "step"
    assert_fitted(top)
    assert_fitted(bottom, high_percentile=100.0)
    assert sorted(t.get_text() for t in top.get_legend().get_texts()) == ["none (lr 0.002)", "sqrt (lr 0.002)"]
    fig = plots.plot_tuned_best(rows, out(tmp_path, "tuned_best.png"))
    loss_ax = fig.axes[0]
    assert_fitted(loss_ax, high_percentile=100.0)


def tables_without_heading(md: str) -> list[str]:
    """The first line of every markdown table with no heading between it and the table before it."""
    missing, heading_since_table, in_table = [], False, False
    for line in md.splitlines():
        if line.startswith("#"):
            heading_since_table = True
        if line.startswith("|"):
            if not in_table and not heading_since_table:
                missing.append(line)
            if not in_table:
                heading_since_table = False
            in_table = True
        elif line.strip():
            in_table = False
        else:
            in_table = False
    return missing


def test_tables_without_heading_finds_one():
    md = "# R\n\n| a |\n|---|\n| 1 |\n\n| b |\n|---|\n"
    assert tables_without_heading(md) == ["| b |"]
    assert tables_without_heading("## A\n| a |\n\n### B\ntext\n| b |\n") == []


@pytest.mark.parametrize("which", ["sweep", "tuned_sweep"])
def test_every_report_table_has_a_heading(which, request, tmp_path):
    root = request.getfixturevalue(which)
    md = report.write_report(root, tmp_path / "out", target=2.6, entropy=False).read_text()
    assert md.count("\n|---") >= 2
    assert tables_without_heading(md) == []
