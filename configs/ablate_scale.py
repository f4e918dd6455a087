"""Ablation: how the q·kᵀ scale interacts with head size (scaled vs unscaled heads).

    python -m experiments.sweep --config configs/ablate_scale.py:cpu --workdir /tmp/sweeps/ablate_scale_cpu
    python -m experiments.report --sweep /tmp/sweeps/ablate_scale_cpu

Arms (``model.attn_scale`` x ``model.qk_norm``):
  none        q·kᵀ unscaled (the lecture's "what if we forget the 1/sqrt(d)")
  sqrt        q·kᵀ / sqrt(D) (Vaswani et al.)
  mup         q·kᵀ / D (muP, Yang et al. 2022)
  sqrt+qknorm LayerNorm on q and k, then / sqrt(D). QK-LayerNorm (Dehghani et al.
              2023; Wortsman et al. 2023) is always paired with the 1/sqrt(D) scale
              in the literature: after the norm q and k have unit variance per
              channel, so 1/sqrt(D) makes the logit variance ~1 at any D, exactly
              the lecture's premise. (qk_norm with scale "none" would saturate by
              construction at large D: experiments.attention_stats with
              --config.arms=none+qknorm shows it.)

Head sizes D in {8, 16, 32, 64, 128}, crossed with the arms, in two designs:
  (a) width fixed: n_embd stays, n_head = n_embd / D (more, smaller heads or
      fewer, bigger ones; parameters are the same for every D);
  (b) head count fixed: n_head stays and ``model.head_size = D`` independently of
      n_embd (parameters of the attention grow with D). At D = n_embd / n_head
      (32 in the cpu variant) both designs build the same model: a check.
Plus a learning-rate axis at one head size (design (a), D = 32) for every arm, to
see whether the best learning rate moves with the scaling rule. Each point trains
``num_seeds = 3`` seeds in one vmapped program.

Variants (the ``:ARG`` suffix):
  (none)  for one accelerator: 4 layers, n_embd 256, block 128, batch 32,
          2000 steps, bfloat16 compute, lr 1e-3 (axis 3e-4 ... 1e-2).
  cpu     the whole sweep (48 points x 3 seeds) in under an hour on 2 CPU cores:
          2 layers, n_embd 128, block 32, batch 8, 250 steps, lr 2e-3
          (axis 5e-4, 2e-3, 8e-3). Measured: 44 min on 2 CPU cores shared
          with other jobs; results and plots in docs/ablations.md.
  smoke   seconds per point: for tests of the sweep machinery.

The tuned question (``tuned``, ``tuned_cpu``, ``tuned_smoke``): the learning rate tuned per
arm and head size, at a horizon 4x (cpu) or 8x (accelerator) the 250 steps of ``cpu``.
Every point is (arm, D, learning rate) with 3 seeds. Points that differ only in
learning_rate, min_lr and the attention scale (a number once D is fixed) train as one
population in one compiled program (attention_jax.lab.population): one program per
(D, qk_norm), since QK-norm adds parameters. (The tuned_cpu results in docs/ablations.md
were trained one program per (arm, D), before the scale could ride the member axis;
grouping changes no number beyond float noise: tests/lab/test_sweep.py.)
  tuned       accelerator: the model of (none), 2000 steps, designs a and b,
              D in {8, ..., 128}, 6 learning rates 5e-4 ... 1.6e-2 (factor 2).
              Prepared for a GPU: benchmarks/gpu_population.py runs it.
  tuned_cpu   the cpu model, 1000 steps, design a, D in {8, 32, 128} (the grid shrunk
              from 5 head sizes to 3 to fit about 2 hours on 2 cores, the horizon
              kept), 5 learning rates 5e-4 ... 8e-3 (factor 2; 5e-4 was added after a
              first pass over 1e-3 ... 8e-3 put three optima at 1e-3, the low edge).
              Results: docs/ablations.md.
  tuned_smoke seconds per point: for tests.
"""

from attention_jax.lab.config import base_config, smoke
from attention_jax.lab.sweep import product, sweep, unique, zip_

SCALE_ARMS = [  # (attn_scale, qk_norm)
    ("none", False),
    ("sqrt", False),
    ("mup", False),
    ("sqrt", True),
]
HEAD_SIZES = [8, 16, 32, 64, 128]
LR_AXIS_HEAD_SIZE = 32
FIXED_HEADS = 4  # n_head of design (b), where head_size is set independently of n_embd
BASE_LR = {None: 1e-3, "cpu": 2e-3, "smoke": 1e-3}
LEARNING_RATES = {  # the learning-rate axis besides the base learning rate (in the main grid already)
    None: [3e-4, 3e-3, 1e-2],
    "cpu": [5e-4, 8e-3],
    "smoke": [3e-3],
}
# The tuned question: per variant, head sizes, learning rates (min_lr = lr / 10), and design b or not.
TUNED = {
    "tuned": dict(head_sizes=HEAD_SIZES, learning_rates=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], design_b=True),
    "tuned_cpu": dict(head_sizes=[8, 32, 128], learning_rates=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3], design_b=False),
    "tuned_smoke": dict(head_sizes=[4, 8], learning_rates=[1e-3, 4e-3], design_b=False),
}
VARIANTS = ("(none)", "cpu", "smoke", *TUNED)


def get_config(arg=None):
    if arg in TUNED:
        return _tuned_config(arg)
    c = base_config()
    c.num_seeds = 3  # seeds seed, seed+1, seed+2 in one vmapped program per point
    c.sample_tokens = 0  # no text sample at the end: the sweep reads metrics and checkpoints only
    c.model.dropout = 0.0  # dropout would blur the comparison of the arms
    if arg in (None, ""):
        c.model.n_layer = 4
        c.model.n_embd = 256
        c.model.n_head = 8
        c.model.block_size = 128
        c.batch_size = 32
        c.max_iters = 2000
        c.lr_decay_iters = 2000
        c.warmup_iters = 100
        c.eval_interval = 100
        c.eval_iters = 50
        c.log_interval = 50
        c.checkpoint_every = 500
        c.model.dtype = "bfloat16"
        c.steps_per_call = 50
    elif arg == "cpu":
        c.model.n_layer = 2
        c.model.n_embd = 128  # the largest head size (128) still fits one head in design (a)
        c.model.n_head = 4
        c.model.block_size = 32
        c.batch_size = 8
        c.max_iters = 250
        c.lr_decay_iters = 250
        c.warmup_iters = 20
        c.eval_interval = 25
        c.eval_iters = 8  # the same fixed eval batches for every point (they depend on the seed only)
        c.log_interval = 25
        c.checkpoint_every = 125
        c.steps_per_call = 1  # as the recorded cpu sweep ran (docs/ablations.md); 5 or 25 would split no call
    elif arg == "smoke":
        smoke(c)
        c.model.n_embd = 32
        c.max_iters = 10
        c.lr_decay_iters = 10
        c.eval_interval = 5
        c.checkpoint_every = 5
        c.sample_tokens = 0
    else:
        raise ValueError(f"unknown variant {arg!r}; choose one of: {', '.join(VARIANTS)}")
    c.learning_rate = BASE_LR[arg or None]
    c.min_lr = c.learning_rate / 10
    return c


def _tuned_config(arg):
    """The config of the tuned question: its base variant, trained longer."""
    c = get_config({"tuned": None, "tuned_cpu": "cpu", "tuned_smoke": "smoke"}[arg])
    if arg == "tuned":
        c.max_iters = c.lr_decay_iters = 2000  # the accelerator variant already trains 8x the cpu horizon
    elif arg == "tuned_cpu":
        c.max_iters = c.lr_decay_iters = 1000  # 4x the 250 steps of the cpu sweep
        c.warmup_iters = 40
        c.eval_interval = 50  # 20 points on each curve
        c.log_interval = 50
        c.checkpoint_every = 250
        c.steps_per_call = 25  # divides every interval: no call is split
    return c


def _head_sizes(arg):
    return [4, 8] if arg == "smoke" else HEAD_SIZES


def _tuned_sweep(arg):
    """Arms x head sizes (design a; design b where the variant has it) x learning rates."""
    c, t = get_config(arg), TUNED[arg]
    arms = [{"model.attn_scale": s, "model.qk_norm": q} for s, q in SCALE_ARMS]
    shapes = [{"model.n_head": c.model.n_embd // d} for d in t["head_sizes"]]
    if t["design_b"]:
        shapes += product(sweep("model.n_head", [FIXED_HEADS]), sweep("model.head_size", t["head_sizes"]))
    lrs = t["learning_rates"]
    lr_axis = zip_(sweep("learning_rate", lrs), sweep("min_lr", [lr / 10 for lr in lrs]))
    return unique(product(arms, shapes, lr_axis))


def get_sweep(arg=None):
    """The points of the sweep: a list of override dicts (see attention_jax.lab.sweep)."""
    if arg in TUNED:
        return _tuned_sweep(arg)
    c = get_config(arg)
    arms = [{"model.attn_scale": s, "model.qk_norm": q} for s, q in SCALE_ARMS]
    if arg == "smoke":
        arms = arms[:2]
    sizes = _head_sizes(arg)
    # (a) width fixed: n_head = n_embd / D.
    design_a = [{"model.n_head": c.model.n_embd // d} for d in sizes]
    # (b) head count fixed, head_size set on its own.
    design_b = product(sweep("model.n_head", [2 if arg == "smoke" else FIXED_HEADS]), sweep("model.head_size", sizes))
    lr_size = LR_AXIS_HEAD_SIZE if arg != "smoke" else sizes[0]
    lrs = LEARNING_RATES[arg or None]
    lr_axis = product(
        [{"model.n_head": c.model.n_embd // lr_size}],
        zip_(sweep("learning_rate", lrs), sweep("min_lr", [lr / 10 for lr in lrs])),  # same schedule shape
    )
    return unique(product(arms, design_a) + product(arms, design_b) + product(arms, lr_axis))
