"""Time the real training step of a config, and this machine's matmul speed.

    python -m experiments.bench --config configs/shakespeare_char.py:cpu [--steps N]

Prints a table, then as its last line one JSON object with ms_per_step,
tokens_per_s, model_flops_per_s, mfu (model FLOP/s over the matmul FLOP/s
measured in this same run), mfu_hardware (over the CPU's estimated peak, or
--peak_gflops), compile_s, peak_rss_mb, backend and devices. On CPU, with
torch installed, the same model, batch and optimizer in eager PyTorch is
timed in alternating rounds with the JAX step: torch_ms_per_step and
jax_over_torch (< 1: JAX is faster); --no-torch skips it.
"""

from __future__ import annotations

import json
import sys

from attention_jax import cli
from attention_jax.config_utils import apply_overrides, load_config, parse_override_args


@cli.main_wrapper
def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m experiments.bench", description="Benchmark the training step.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=30, help="measured optimizer steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="calls run before timing")
    parser.add_argument("--matmul_n", type=int, default=2048, help="size of the reference square matmul")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip the eager PyTorch comparison")
    parser.add_argument("--torch_threads", type=int, default=None, help="PyTorch threads (default: the cores XLA uses)")
    parser.add_argument(
        "--peak_gflops", type=float, default=None, help="hardware peak for the MFU (default: estimated from cpuinfo)"
    )
    args, rest = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    if args.torch_threads is not None and args.torch_threads < 1:
        raise ValueError("--torch_threads must be >= 1")
    if args.peak_gflops is not None and args.peak_gflops <= 0:
        raise ValueError("--peak_gflops must be positive")
    config = load_config(args.config)
    apply_overrides(config, parse_override_args(rest))

    from attention_jax.benchmark import benchmark_training, format_table

    result = benchmark_training(
        config,
        steps=args.steps,
        warmup=args.warmup,
        matmul_n=args.matmul_n,
        torch_compare=args.torch,
        torch_threads=args.torch_threads,
        peak_flops=args.peak_gflops * 1e9 if args.peak_gflops else None,
    )
    print(format_table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
