"""The lecture's bigram baseline: each character predicts the next from itself alone.

    python -m experiments.train --config configs/bigram.py --workdir runs/bigram

A (65, 65) table of logits trained with AdamW at lr 1e-2 for 3000 steps,
batch 32, block 8 (bigram.py of the lecture), which reports val loss ~2.49.
Variant ``smoke`` runs in seconds.
"""

from attention_jax.lab.config import base_config, smoke


def get_config(arg=None):
    c = base_config()
    c.model.type = "bigram"
    c.batch_size = 32
    c.model.block_size = 8
    c.max_iters = 3000
    c.eval_interval = 300
    c.learning_rate = 1e-2
    c.min_lr = 1e-2  # constant learning rate, as in the lecture
    c.warmup_iters = 0
    c.lr_decay_iters = 3000
    c.weight_decay = 0.0
    c.beta2 = 0.999
    c.grad_clip = 0.0
    c.model.dropout = 0.0
    if arg == "smoke":
        smoke(c)
        c.min_lr = c.learning_rate
        c.model.block_size = 8
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; choose one of: (none), smoke")
    return c
