"""Train a model from a config file; rerunning the same command resumes it.

    python -m experiments.train --config configs/shakespeare_char.py:cpu [--config.KEY=VALUE ...] [--workdir DIR]

The same command is installed as ``attention-jax-train``; its flags: ``--help``. ``--config`` also
takes a shipped config by name (``--config shakespeare_char:cpu``): the files of ``configs/``,
installed with the package, so it works from any folder.
"""

import sys

from attention_jax.lab.commands import train as main

if __name__ == "__main__":
    sys.exit(main())
