"""The error of bad input to the lab, in a module of its own so that any layer can raise it.

``attention_jax.lab.config`` re-exports it; the run directory's I/O layer imports
it from here, so reading and writing a run needs no model code.
"""


class ConfigError(ValueError):
    """A config file, key or value that cannot be used. Its message is one line."""
