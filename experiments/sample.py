"""Sample text from a trained run.

    python -m experiments.sample --workdir DIR [--prompt TEXT] [--max_new_tokens N] [--temperature T] [--top_k K]

The same command is installed as ``attention-jax-sample``; its flags: ``--help``.
"""

import sys

from attention_jax.lab.commands import sample as main

if __name__ == "__main__":
    sys.exit(main())
