"""The package's metadata lives in setup.cfg; this adds what setup.cfg cannot say.

configs/ stays at the top of a clone, where the commands and docs point, and installs
as ``attention_jax/lab/configs``, so that after ``pip install`` a name such as
``--config shakespeare_char:cpu`` finds the shipped configs from any folder
(``attention_jax.lab.config.configs_dir``).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["attention_jax", "attention_jax.*"]), "attention_jax.lab.configs"],
    package_dir={"attention_jax.lab.configs": "configs"},
)
