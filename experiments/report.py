"""Aggregate a sweep's points into a markdown report with plots.

    python -m experiments.report --sweep DIR [--outdir DIR] [--target LOSS]
        [--prompt TEXT] [--heatmap_head_size D] [--no-entropy]

Reads every ``DIR/<point>/`` (config.json, metrics.jsonl, checkpoints) and
writes report.md, val_loss_curves.png, final_loss_vs_head_size.png,
entropy_vs_head_size.png and attention_heatmaps.png into --outdir (default:
the sweep dir). The entropy and the heatmaps load the trained checkpoints and
the runs' dataset (tiny shakespeare: set ATTENTION_JAX_DATA_DIR or have it
cached); --no-entropy skips them.
"""

from __future__ import annotations

import sys

from attention_jax import cli


@cli.main_wrapper
def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m experiments.report", description="Report of a sweep.")
    parser.add_argument("--sweep", required=True, help="the sweep dir (one subfolder per point)")
    parser.add_argument("--outdir", help="where report.md and the PNGs go (default: the sweep dir)")
    parser.add_argument("--target", type=float, help="val loss for 'steps to target' (default: median final loss)")
    parser.add_argument("--prompt", help="text for the attention heatmaps")
    parser.add_argument("--heatmap_head_size", type=int, help="head size of the points shown as heatmaps")
    parser.add_argument("--no-entropy", action="store_true", help="do not load checkpoints (no entropy, no heatmaps)")
    parser.add_argument("--dpi", type=int, default=90)
    args = parser.parse_args(argv)

    from attention_jax import report

    path = report.write_report(
        args.sweep,
        args.outdir,
        target=args.target,
        prompt=args.prompt or report.DEFAULT_PROMPT,
        heatmap_head_size=args.heatmap_head_size,
        entropy=not args.no_entropy,
        dpi=args.dpi,
    )
    print(path.read_text())
    print(f"wrote {path} and its plots", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
