"""Train a model from a config file.

    python -m experiments.train --config configs/shakespeare_char.py:cpu \
        [--config.KEY=VALUE ...] [--workdir DIR]

Running the same command on the same workdir resumes from its latest
checkpoint. The workdir defaults to runs/<config name>[-<variant>].
"""

from __future__ import annotations

import sys
from pathlib import Path

from attention_jax import cli
from attention_jax.config_utils import apply_overrides, load_config, parse_override_args, run_name


def default_workdir(spec: str) -> str:
    return str(Path("runs") / run_name(spec))


@cli.main_wrapper
def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m experiments.train", description=__doc__.split("\n")[1])
    parser.add_argument("--config", required=True, help="config file, optionally with :VARIANT")
    parser.add_argument("--workdir", help="where checkpoints and metrics go (default runs/<config>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = parser.parse_known_args(argv)
    config = load_config(args.config)
    apply_overrides(config, parse_override_args(rest))
    if config.get("distributed", False):  # pragma: no cover - multi-host only
        import jax

        jax.distributed.initialize()
    from attention_jax.train import train

    train(config, args.workdir or default_workdir(args.config), progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
