"""Attention statistics at initialization across scales and head sizes (no training).

    python -m experiments.attention_stats --config configs/attention_stats.py [--outdir DIR]

The same command is installed as ``attention-jax-attention-stats``; its flags: ``--help``.
"""

import sys

from attention_jax.lab.commands import attention_stats as main

if __name__ == "__main__":
    sys.exit(main())
