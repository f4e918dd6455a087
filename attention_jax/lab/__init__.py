"""The experiment toolkit of attention_jax: configs, training, run directories, sweeps, reports.

Installed with the ``experiments`` extra (``pip install "attention_jax[experiments]"``);
the core (``import attention_jax``) never imports it. Data flows one way:

    config (config.py) -> Experiment: data, model, optimizer, mesh (experiment.py)
    -> pure steps (steps.py) jitted by the loop (loop.py)
    -> run directory: config.json, metrics.jsonl, TensorBoard events, checkpoints (rundir.py)
    -> samples (sampling.py), sweeps (sweep.py), reports (ablate_scale/)

Command-line plumbing is in cli.py; the commands themselves (also the
console scripts ``attention-jax-*``) in commands.py.
"""

try:  # a clear message instead of a ModuleNotFoundError deep inside a command
    import ml_collections  # noqa: F401
    import optax  # noqa: F401
    import orbax.checkpoint  # noqa: F401
except ModuleNotFoundError as e:  # pragma: no cover - depends on the installation
    raise ModuleNotFoundError(
        f'attention_jax.lab needs the experiments extra ({e.name} is missing): pip install "attention_jax[experiments]"'
    ) from None
