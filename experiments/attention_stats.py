"""Measure attention at initialization across scales and head sizes (no training).

    python -m experiments.attention_stats --config configs/attention_stats.py [--outdir DIR]
        [--config.KEY=VALUE ...]

Writes attention_stats.md (table), attention_stats.csv and attention_stats.png
into --outdir (default: the config's ``outdir``). The model setting needs tiny
shakespeare (or ``--config.model.dataset=PATH``); without it that setting is
skipped with a message, or ``--config.model.enabled=false`` skips it silently.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from attention_jax import cli
from attention_jax.config_utils import apply_overrides, load_config, parse_override_args


@cli.main_wrapper
def main(argv=None):
    parser = cli.ArgumentParser(
        prog="python -m experiments.attention_stats", description="Attention statistics at init."
    )
    parser.add_argument("--config", required=True, help="config file, optionally with :VARIANT")
    parser.add_argument("--outdir", help="output directory (default: the config's outdir)")
    args, rest = parser.parse_known_args(argv)
    config = load_config(args.config)
    apply_overrides(config, parse_override_args(rest))
    outdir = Path(args.outdir or config.outdir)

    import jax

    from attention_jax import data as data_lib
    from attention_jax import stats

    arms = [a.strip() for a in config.arms.split(",") if a.strip()]
    for arm in arms:
        stats.parse_arm(arm)  # bad arms fail before any compute
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
    rows = stats.gaussian_grid(arms, head_sizes, seeds=config.seeds, B=g.batch_size, H=g.n_head, T=g.seq_len)
    if config.model.enabled:
        m = config.model
        try:
            text = data_lib.load_text(m.dataset)
        except FileNotFoundError as e:
            print(f"skipping the model setting: {e}", file=sys.stderr)
        else:
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
            rows += stats.model_grid(arms, head_sizes, tokens=x, targets=y, seeds=config.seeds, model_kwargs=kwargs)
    outdir.mkdir(parents=True, exist_ok=True)
    table = stats.markdown_table(rows)
    (outdir / "attention_stats.md").write_text(table)
    with open(outdir / "attention_stats.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["setting", "arm", "head_size", *stats.STAT_KEYS])
        writer.writeheader()
        writer.writerows(rows)
    stats.plot_grid(rows, outdir / "attention_stats.png")
    print(table)
    print(f"wrote attention_stats.md, .csv and .png to {outdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
