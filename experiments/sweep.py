"""Run the points of a sweep defined by a config file's get_sweep(arg).

    python -m experiments.sweep --config configs/ablate_scale.py:cpu [--dry-run] [--index I]
        [--print-commands] [--workdir DIR] [--config.KEY=VALUE ...]

The same command is installed as ``attention-jax-sweep``; its flags: ``--help``. ``--config``
also takes a shipped config by name (``--config ablate_scale:cpu``).
"""

import sys

from attention_jax.lab.commands import sweep as main

if __name__ == "__main__":
    sys.exit(main())
