"""Attention at initialization: logit variance, softmax peakedness and q/k gradients vs head size.

    python -m experiments.attention_stats --config configs/attention_stats.py [--outdir DIR]

No training. For every arm (scale none / sqrt / mup, and sqrt with QK-LayerNorm)
and head size D from 4 to 256, in two settings:
  gaussian  q, k, v ~ N(0, 1), shape (B, H, T, D), causal: the lecture's setting.
            Expected: logit variance D unscaled, 1 with 1/sqrt(D), 1/D with muP.
  model     a freshly initialized TransformerLM (GPT-2 init, N(0, 0.02)) on a
            batch of tiny shakespeare; n_head fixed, head_size = D.
Writes attention_stats.md, attention_stats.csv and attention_stats.png into
--outdir (default: ``outdir`` below). Variant ``smoke`` runs in seconds.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    # Comma-separated strings, so that --config.arms=none,sqrt works on the command line.
    c.arms = "none,sqrt,mup,sqrt+qknorm"  # SCALE or SCALE+qknorm (QK-LayerNorm, then the scale)
    c.head_sizes = "4,8,16,32,64,128,256"  # D
    c.seeds = 3  # random draws (gaussian) and fresh inits (model) averaged per cell
    c.outdir = "runs/attention_stats"  # where the table, CSV and plot go

    c.gaussian = ml_collections.ConfigDict()
    c.gaussian.batch_size = 8  # B
    c.gaussian.n_head = 4  # H
    c.gaussian.seq_len = 64  # T: rows have 1..T visible keys

    c.model = ml_collections.ConfigDict()
    c.model.enabled = True  # False: gaussian setting only
    c.model.dataset = "tinyshakespeare"  # the text batch (its validation split); a path works too
    c.model.batch_size = 8  # sequences in the batch
    c.model.block_size = 64  # T
    c.model.n_embd = 128  # C
    c.model.n_head = 4  # H (fixed; head_size = D independently of n_embd)
    c.model.n_layer = 2  # statistics are averaged over layers
    c.model.pos_encoding = "learned"
    if arg == "smoke":
        c.head_sizes = "4,16"
        c.seeds = 1
        c.gaussian.batch_size = 2
        c.gaussian.seq_len = 16
        c.model.batch_size = 2
        c.model.block_size = 16
        c.model.n_embd = 32
        c.model.n_layer = 1
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; choose one of: (none), smoke")
    return c
