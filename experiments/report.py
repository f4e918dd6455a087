"""Tables and plots of an ablate-scale sweep.

    python -m experiments.report --sweep DIR [--outdir DIR] [--target LOSS] [--no-entropy]

The same command is installed as ``attention-jax-report``; its flags: ``--help``.
"""

import sys

from attention_jax.lab.commands import report as main

if __name__ == "__main__":
    sys.exit(main())
