"""The same GPT in plain eager PyTorch: the baseline the JAX train step is timed against.

An independent implementation of :class:`attention_jax.model.TransformerLM`
(learned positions, pre-LN blocks, bias-free fused QKV, output projections
with bias, tanh-GELU MLP of width 4C, final LayerNorm, LM head with bias), its
initialization (N(0, 0.02), residual outputs / sqrt(2 n_layer)), and of the
optimizer of :func:`attention_jax.lab.steps.make_optimizer` (global-norm clipping,
AdamW with weight decay on matrices only, warmup + cosine schedule). It is
written the way nanoGPT is: ``F.scaled_dot_product_attention`` with
``is_causal=True`` and torch's default AdamW, nothing compiled.

torch is optional (``pip install "attention_jax[torch]"``): only the
comparisons in ``benchmarks/`` and their tests import this module.
"""

from __future__ import annotations

import dataclasses
import math
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, head_size: int, n_layer: int):
        super().__init__()
        self.n_head, self.head_size = n_head, head_size
        self.qkv = nn.Linear(n_embd, 3 * n_head * head_size, bias=False)  # rows: (3, H, D) flattened
        self.proj = nn.Linear(n_head * head_size, n_embd)
        nn.init.normal_(self.qkv.weight, std=0.02)
        nn.init.normal_(self.proj.weight, std=0.02 / math.sqrt(2 * max(n_layer, 1)))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):  # (B, T, C)
        B, T, _ = x.shape
        H, D = self.n_head, self.head_size
        q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D**-0.5)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, n_embd: int, n_layer: int):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)
        nn.init.normal_(self.fc.weight, std=0.02)
        nn.init.normal_(self.proj.weight, std=0.02 / math.sqrt(2 * max(n_layer, 1)))
        nn.init.zeros_(self.fc.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # flax nn.gelu is the tanh form


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, head_size: int, n_layer: int):
        super().__init__()
        self.ln_attn = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(n_embd, n_head, head_size, n_layer)
        self.ln_mlp = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = MLP(n_embd, n_layer)

    def forward(self, x):
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    """tokens (B, T) int64 -> logits (B, T, V)."""

    def __init__(self, vocab_size: int, block_size: int, n_embd: int, n_head: int, n_layer: int, head_size: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, n_embd)
        self.positions = nn.Parameter(torch.empty(block_size, n_embd))
        self.blocks = nn.ModuleList([Block(n_embd, n_head, head_size, n_layer) for _ in range(n_layer)])
        self.ln_final = nn.LayerNorm(n_embd, eps=1e-5)
        self.lm_head = nn.Linear(n_embd, vocab_size)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positions, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    @classmethod
    def from_config(cls, model_config) -> "GPT":
        """The model of an ``attention_jax.model.ModelConfig`` (learned positions, sqrt scale, no dropout)."""
        unsupported = {
            "pos_encoding": (model_config.pos_encoding, "learned"),
            "attn_scale": (model_config.attn_scale, "sqrt"),
            "qk_norm": (model_config.qk_norm, False),
            "dropout": (model_config.dropout, 0.0),
            "dtype": (model_config.dtype, "float32"),
            "bias": (model_config.bias, True),
            "tie_embeddings": (model_config.tie_embeddings, False),
            "softcap": (model_config.softcap, None),
        }
        for name, (got, want) in unsupported.items():
            if got != want:
                raise ValueError(f"the PyTorch reference supports model.{name}={want!r} only, got {got!r}")
        m = model_config
        return cls(m.vocab_size, m.block_size, m.n_embd, m.n_head, m.n_layer, m.head_dim)

    def forward(self, tokens):
        T = tokens.shape[-1]
        x = self.token_embedding(tokens) + self.positions[:T]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_final(x))

    @torch.no_grad()
    def load_flax_params(self, params) -> "GPT":
        """Copy the weights of a TransformerLM parameter tree (one seed) into this model."""

        def put(dst, src, transform=lambda a: a):
            dst.copy_(torch.from_numpy(np.array(transform(np.asarray(src, np.float32)), order="C")))

        def put_ln(ln, p):
            put(ln.weight, p["scale"])
            put(ln.bias, p["bias"])

        def put_dense(lin, p):
            put(lin.weight, p["kernel"], np.transpose)
            put(lin.bias, p["bias"])

        put(self.token_embedding.weight, params["token_embedding"]["embedding"])
        put(self.positions, params["positions"]["embedding"])
        for i, block in enumerate(self.blocks):
            p = params[f"block_{i}"]
            put_ln(block.ln_attn, p["ln_attn"])
            put_ln(block.ln_mlp, p["ln_mlp"])
            a = p["attn"]
            put(block.attn.qkv.weight, a["qkv_kernel"], lambda w: w.reshape(w.shape[0], -1).T)  # (C,3,H,D)->(3HD,C)
            put(block.attn.proj.weight, a["proj_kernel"], lambda w: w.reshape(-1, w.shape[-1]).T)  # (H,D,C)->(C,HD)
            put(block.attn.proj.bias, a["proj_bias"])
            put_dense(block.mlp.fc, p["mlp"]["fc"])
            put_dense(block.mlp.proj, p["mlp"]["proj"])
        put_ln(self.ln_final, params["ln_final"])
        put_dense(self.lm_head, params["lm_head"])
        return self


@torch.no_grad()
def full_split_loss(model: GPT, data, block_size: int, chunk: int = 256) -> float:
    """Mean loss over a whole split (N,) in non-overlapping windows of block_size.

    The PyTorch twin of :func:`attention_jax.lab.steps.full_split_loss`.
    """
    data = np.asarray(data, np.int64)
    n = (len(data) - 1) // block_size
    x = torch.from_numpy(data[: n * block_size].reshape(n, block_size))  # (N, T)
    y = torch.from_numpy(data[1 : n * block_size + 1].reshape(n, block_size))
    total = 0.0
    for i in range(0, n, chunk):
        logits = model(x[i : i + chunk])
        total += F.cross_entropy(logits.flatten(0, 1), y[i : i + chunk].flatten(), reduction="sum").item()
    return total / (n * block_size)


def learning_rate(config, step: int) -> float:
    """nanoGPT's schedule, as :func:`attention_jax.lab.steps.learning_rate_schedule`."""
    lr, min_lr, warmup, decay = config.learning_rate, config.min_lr, config.warmup_iters, config.lr_decay_iters
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step > decay:
        return min_lr
    ratio = min(max((step - warmup) / max(decay - warmup, 1), 0.0), 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def make_optimizer(model: nn.Module, config) -> torch.optim.AdamW:
    """AdamW with decay on matrices (ndim >= 2) only, as :func:`attention_jax.lab.steps.decay_mask`."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), eps=1e-8)


def hyperparameters(config):
    """What the reference reads of a run (optimizer values, batch_size, grad_clip), by the config's key names.

    ``config`` is the experiment's ConfigDict, or its typed parts (``attention_jax.lab.parts.Parts``).
    """
    from attention_jax.lab.parts import Parts

    if not isinstance(config, Parts):
        return config
    optimizer = config.optimizer
    values = {f.name: getattr(optimizer, f.name) for f in dataclasses.fields(optimizer)}
    return types.SimpleNamespace(**values, batch_size=config.data.batch_size)


class TorchTrainer:
    """One seed of ``config`` trained in eager PyTorch: random crops, forward, backward, clip, AdamW.

    Also the ``Reference`` that ``attention_jax.lab.bench`` times side by side with the JAX step.
    """

    label = "PyTorch"

    def __init__(self, config, model_config, train_data, seed: int = 0):
        torch.manual_seed(seed)
        self.config = config = hyperparameters(config)
        self.model = GPT.from_config(model_config)
        self.opt = make_optimizer(self.model, config)
        self.data = torch.from_numpy(np.array(train_data, np.int64))
        self.step_count = 0
        self.tokens_per_step = config.batch_size * model_config.block_size

    @property
    def info(self) -> str:
        return f"eager torch {torch.__version__}, {torch.get_num_threads()} threads"

    def batch(self):
        B, T = self.config.batch_size, self.model.positions.shape[0]
        starts = torch.randint(0, len(self.data) - T, (B,))
        chunks = torch.stack([self.data[s : s + T + 1] for s in starts.tolist()])  # (B, T + 1)
        return chunks[:, :-1], chunks[:, 1:]

    def step(self, x=None, y=None) -> float:
        """One optimizer step on (x, y) (a fresh random batch when not given); returns the loss."""
        if x is None:
            x, y = self.batch()
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(self.config, self.step_count)
        logits = self.model(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.opt.step()
        self.step_count += 1
        return loss.item()
