"""The experiment config schema: every key, its default, and what it means.

Config files in ``configs/`` start from ``base_config()`` and change values;
keys follow nanoGPT's names. ``smoke()`` shrinks any config to a run of a few
seconds on a CPU.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 1337  # seed of params, batches, dropout and sampling; seed+i for the i-th of num_seeds
    c.num_seeds = 1  # K seeds trained at once in one program (jax.vmap over params, optimizer, keys)
    c.batch_size = 64  # sequences per optimizer step (per seed), sharded over all devices
    c.max_iters = 5000  # optimizer steps
    c.eval_interval = 250  # evaluate every this many steps (and at step 0 and at the end)
    c.eval_iters = 200  # fixed batches per split in one evaluation
    c.log_interval = 10  # write a training row to metrics.jsonl every this many steps
    c.learning_rate = 1e-3  # peak learning rate after warmup
    c.min_lr = 1e-4  # learning rate at the end of the cosine decay
    c.warmup_iters = 100  # linear warmup steps
    c.lr_decay_iters = 5000  # cosine decay ends here; flat at min_lr afterwards
    c.weight_decay = 0.1  # AdamW decoupled weight decay, on matrices only
    c.beta1 = 0.9  # AdamW beta1
    c.beta2 = 0.99  # AdamW beta2
    c.grad_clip = 1.0  # clip gradients to this global norm (0 disables)
    c.checkpoint_every = 250  # save the latest checkpoint every this many steps (and at the end)
    c.steps_per_call = 1  # optimizer steps per compiled call (lax.scan); same result, less dispatch
    c.sample_tokens = 500  # characters sampled into sample.txt at the end (0: none)
    c.distributed = False  # True: jax.distributed.initialize() first (one run spanning several hosts)

    c.model = ml_collections.ConfigDict()
    c.model.type = "transformer"  # "transformer" or "bigram"
    c.model.block_size = 256  # context length T
    c.model.n_embd = 384  # residual width C
    c.model.n_head = 6  # heads per layer H
    c.model.n_layer = 6  # transformer blocks
    c.model.head_size = config_dict.placeholder(int)  # D; None = n_embd // n_head
    c.model.attn_scale = "sqrt"  # "sqrt" (1/sqrt(D)), "none" (1), "mup" (1/D), or a number
    c.model.pos_encoding = "learned"  # "learned", "sinusoidal", "rope" or "none"
    c.model.qk_norm = False  # LayerNorm on q and k before q·kᵀ
    c.model.dropout = 0.2  # dropout on attention weights and residual branches
    c.model.dtype = "float32"  # compute dtype ("bfloat16" on accelerators); params stay float32
    c.model.bias = True  # biases in LayerNorms, projections, MLP and LM head (nanoGPT's recipes: False)
    c.model.tie_embeddings = False  # LM head shares the token embedding (nanoGPT: True)
    c.model.attention_impl = "dense"  # "dense", "xla", "cudnn" (GPU) or "blockwise" (long T)

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "tinyshakespeare"  # "tinyshakespeare" or a path to any UTF-8 text file
    c.data.train_fraction = 0.9  # first 90% of the characters train, the rest validate
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a config to a seconds-long CPU run (keeps its ablation settings)."""
    c.batch_size = 4
    c.max_iters = 20
    c.eval_interval = 10
    c.eval_iters = 2
    c.log_interval = 5
    c.warmup_iters = 2
    c.lr_decay_iters = 20
    c.checkpoint_every = 10
    c.sample_tokens = 40
    c.model.block_size = 16
    c.model.n_embd = 32
    c.model.n_head = 2
    c.model.n_layer = 2
    c.model.dropout = 0.0
    return c
