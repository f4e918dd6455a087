"""Causal attention at long context: forward+backward time and peak memory per path.

    python -m benchmarks.long_context --T 256 1024 4096 16384 --repeats 3 --json long_context.json
    python -m benchmarks.long_context --T 4096 --window 0 256 --paths jax_xla blockwise   # full against W=256

Paths (batch 1, 4 heads, head size 64, float32, causal):
  dense      attention_jax.attention.dot_product_attention with causal_mask (hand-written)
  jax_xla    jax.nn.dot_product_attention(is_causal=True, implementation="xla")
  flax       flax.linen.dot_product_attention with a causal mask
  blockwise  attention_jax.blockwise.blockwise_causal_attention

With --window W (sliding-window attention, each query sees the last W keys;
0 = full causal) every path takes the window its own way: dense and flax in
the mask, jax_xla as local_window_size=(W-1, 0), blockwise by skipping the
tiles outside it.

The timed function is one jitted call returning the loss <out, ct> and its
gradients w.r.t. q, k, v. Each (path, T) runs in a fresh subprocess, so its
memory is its own:
  fwd+bwd ms   median of --repeats calls after one compile-and-warm-up call
  peak MB      the process's peak RSS (getrusage ru_maxrss) minus its RSS after
               imports and input creation, before compiling; so it includes
               compilation and the runtime's buffers for this one computation
  XLA temp MB  temp_size_in_bytes of the compiled executable's memory analysis:
               XLA's own count of scratch buffers, without inputs and outputs
  process peak RSS MB   the whole process's peak, JAX runtime included
A (path, T) whose XLA temp size exceeds --max-gb is compiled but not run
("skipped: would need N GB"); one that runs past --timeout seconds is killed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PATHS = ("dense", "jax_xla", "flax", "blockwise")
B, H, D = 1, 4, 64


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _attention_fn(path: str, T: int, block_q: int, block_k: int, window: int | None = None):
    """The attention call of one path and its input layout: (B, H, T, D) or (B, T, H, D)."""
    import flax.linen as nn
    import jax

    from attention_jax import attention, blockwise

    scale = D**-0.5
    mask = attention.causal_mask(T, T, window)
    if path == "dense":
        fn = lambda q, k, v: attention.dot_product_attention(q, k, v, scale=scale, mask=mask)
        return fn, (B, H, T, D)
    if path == "jax_xla":
        local = None if window is None else (window - 1, 0)
        fn = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, local_window_size=local, implementation="xla"
        )
        return fn, (B, T, H, D)
    if path == "flax":  # scales by 1/sqrt(D) itself; mask (1, 1, T, T) broadcasts over batch and heads
        fn = lambda q, k, v: nn.dot_product_attention(q, k, v, mask=mask[None, None], deterministic=True)
        return fn, (B, T, H, D)
    if path == "blockwise":
        fn = lambda q, k, v: blockwise.blockwise_causal_attention(
            q, k, v, scale=scale, block_q=block_q, block_k=block_k, window=window
        )
        return fn, (B, H, T, D)
    raise ValueError(f"unknown path {path!r}: choose from {PATHS}")


def worker(path: str, T: int, repeats: int, max_gb: float, block_q: int, block_k: int, window: int = 0) -> dict:
    """Measure one (path, T) in this process; returns one result row."""
    import jax
    import jax.numpy as jnp

    attn, shape = _attention_fn(path, T, block_q, block_k, window or None)
    q, k, v, ct = (jax.random.normal(key, shape, jnp.float32) for key in jax.random.split(jax.random.key(0), 4))
    loss = lambda q, k, v: jnp.vdot(attn(q, k, v), ct)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready((q, k, v, ct))
    baseline = _current_rss_bytes()

    compiled = step.lower(q, k, v).compile()
    analysis = compiled.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
    row = {"path": path, "T": T, "window": window, "xla_temp_mb": None if temp is None else temp / 2**20}
    if temp is not None and temp > max_gb * 2**30:
        return row | {"skipped": f"would need {temp / 2**30:.1f} GB"}

    jax.block_until_ready(compiled(q, k, v))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return row | {
        "ms": 1e3 * statistics.median(times),
        "peak_mb": (peak - baseline) / 2**20,
        "peak_rss_mb": peak / 2**20,
        "baseline_rss_mb": baseline / 2**20,
    }


def run_one(path: str, T: int, window: int, args) -> dict:
    """Run ``worker`` in a fresh interpreter with a wall-clock limit."""
    cmd = [sys.executable, "-m", "benchmarks.long_context", "--worker", path, str(T), "--repeats", str(args.repeats)]
    cmd += ["--max-gb", str(args.max_gb), "--block-q", str(args.block_q), "--block-k", str(args.block_k)]
    cmd += ["--worker-window", str(window)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, where -m finds benchmarks
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=root)
    except subprocess.TimeoutExpired:
        return {"path": path, "T": T, "window": window, "skipped": f"timeout after {args.timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"path": path, "T": T, "window": window, "skipped": f"failed (exit {proc.returncode}): {tail[0][:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict]) -> str:
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    lines = [
        "| path | T | window | fwd+bwd ms | peak MB | XLA temp MB | process peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        temp = fmt(r.get("xla_temp_mb"), ".0f")
        head = f"| {r['path']} | {r['T']} | {r.get('window') or 'full'} |"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']} | | {temp} | |")
        else:
            lines.append(f"{head} {r['ms']:.1f} | {r['peak_mb']:.0f} | {temp} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096, 16384], help="sequence lengths")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per (path, T) after warm-up")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per (path, T) subprocess")
    # XLA's temp size undercounts the process: at T = 4096 the dense paths' RSS rose ~1.6x their temp
    # size, so 8 GB of temp already means ~13 GB of RAM.
    p.add_argument("--max-gb", type=float, default=8.0, help="skip runs whose XLA temp size exceeds this")
    p.add_argument("--block-q", type=int, default=None, help="blockwise query tile (default: the library's)")
    p.add_argument("--block-k", type=int, default=None, help="blockwise key tile (default: the library's)")
    p.add_argument("--window", type=int, nargs="+", default=[0], help="sliding windows W to run (0: full causal)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    p.add_argument("--worker", nargs=2, metavar=("PATH", "T"), help=argparse.SUPPRESS)
    p.add_argument("--worker-window", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if any(w < 0 for w in args.window):
        p.error(f"--window: each must be 0 (full causal) or a positive number of keys, got {args.window}")

    if args.block_q is None or args.block_k is None:
        from attention_jax.blockwise import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q

        args.block_q = args.block_q or DEFAULT_BLOCK_Q
        args.block_k = args.block_k or DEFAULT_BLOCK_K
    if args.worker:
        path, T = args.worker
        row = worker(path, int(T), args.repeats, args.max_gb, args.block_q, args.block_k, args.worker_window)
        print(json.dumps(row))
        return

    import jax

    print(
        f"# jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs; "
        f"B={B}, H={H}, D={D}, float32; blockwise tiles {args.block_q}x{args.block_k}",
        flush=True,
    )
    rows = []
    for T in args.T:
        for window in args.window:
            for path in args.paths:
                rows.append(run_one(path, T, window, args))
            print(f"  {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "cpus": os.cpu_count(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
