"""Time the real training step of a config, and this machine's matmul speed.

    python -m experiments.bench --config configs/shakespeare_char.py:cpu [--steps N]

The same command is installed as ``attention-jax-bench``; its flags: ``--help``.
"""

import sys

from attention_jax.lab.commands import bench as main

if __name__ == "__main__":
    sys.exit(main())
