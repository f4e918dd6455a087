"""The final GPT of the "build a GPT from scratch" lecture (gpt.py).

    python -m experiments.train --config configs/lecture_gpt.py --workdir runs/lecture

6 layers, 6 heads, n_embd 384, block 256, batch 64, constant lr 3e-4 (AdamW),
5000 steps, dropout 0.2, eval every 500 steps over 200 batches: 10,788,929
parameters (asserted in tests). The lecture reports val loss ~1.48 after
about 15 minutes on an A100. Variant ``smoke`` runs in seconds on a CPU.
"""

from attention_jax.lab.config import base_config, smoke


def get_config(arg=None):
    c = base_config()
    c.learning_rate = 3e-4
    c.min_lr = 3e-4  # the lecture keeps the learning rate constant
    c.warmup_iters = 0
    c.lr_decay_iters = 5000
    c.weight_decay = 0.01  # torch.optim.AdamW's default, which the lecture uses
    c.beta2 = 0.999  # torch.optim.AdamW's default
    c.grad_clip = 0.0  # the lecture does not clip
    c.eval_interval = 500
    c.model.pos_encoding = "learned"
    if arg == "smoke":
        smoke(c)
        c.min_lr = c.learning_rate
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; choose one of: (none), smoke")
    return c
