"""The real JAX training step next to the same step in eager PyTorch, timed in alternating rounds.

    python -m benchmarks.train_step --config configs/shakespeare_char.py:cpu [--steps N] [--no-torch]

Everything ``attention-jax-bench`` prints (step time, tokens/s, MFU against the
matmul speed measured in the same run), plus, on the CPU backend with torch
installed (``pip install "attention_jax[torch]"``), the eager PyTorch twin of
the model, batch and optimizer (``benchmarks/torch_reference.py``) with
``--torch_threads`` threads (default: the cores XLA uses): its step time and
``jax_over_reference`` (< 1: JAX is faster). The last line is one JSON object.
See benchmarks/train_step.md for the measured history.
"""

from __future__ import annotations

import json
import sys

from attention_jax.lab import cli
from attention_jax.lab.bench import NoReference, benchmark_training, format_table
from attention_jax.lab.commands import add_bench_arguments, bench_kwargs, check_bench_arguments, config_from_args
from attention_jax.lab.hardware import cpu_cores


def torch_reference(threads: int | None):
    """A factory of the eager PyTorch twin of an experiment, for ``benchmark_training(reference=...)``."""

    def make(exp):
        import jax

        if jax.default_backend() != "cpu":
            raise NoReference(f"PyTorch comparison is CPU only (backend {jax.default_backend()})")
        try:
            import torch

            from benchmarks.torch_reference import TorchTrainer
        except ImportError:
            raise NoReference("torch is not installed (pip install torch): PyTorch comparison skipped") from None
        if exp.parts.model.type != "transformer":
            raise NoReference(f"no PyTorch reference for model.type={exp.parts.model.type!r}: comparison skipped")
        if exp.num_members != 1:  # the reference trains one model; a K-model step is not comparable
            raise NoReference(
                f"{exp.num_members} models (num_seeds or a population): the PyTorch reference trains one, "
                "comparison skipped"
            )
        torch.set_num_threads(threads or cpu_cores())
        try:
            return TorchTrainer(exp.parts, exp.model_config, jax.device_get(exp.train_data))
        except ValueError as e:
            raise NoReference(f"{e}: PyTorch comparison skipped") from None

    return make


@cli.main_wrapper
def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    add_bench_arguments(parser)
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip the eager PyTorch comparison")
    parser.add_argument("--torch_threads", type=int, default=None, help="PyTorch threads (default: the cores XLA uses)")
    args, rest = parser.parse_known_args(argv)
    check_bench_arguments(args)
    if args.torch_threads is not None and args.torch_threads < 1:
        raise ValueError("--torch_threads must be >= 1")
    config = config_from_args(args.config, rest)
    reference = torch_reference(args.torch_threads) if args.torch else None
    result = benchmark_training(config, reference=reference, **bench_kwargs(args))
    if not args.torch:
        result["reference_skipped"] = "PyTorch comparison off (--no-torch)"
    print(format_table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
