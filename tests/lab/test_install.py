"""A regular (non-editable) install: the core's requirements, and the console scripts from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package built as a wheel from this checkout and installed into a folder of its own."""
    pytest.importorskip("setuptools")  # the wheel is built here, without the network (no build isolation)
    tmp = tmp_path_factory.mktemp("install")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp / "wheel")],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (tmp / "wheel").glob("attention_jax-*.whl")
    target = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    # The installed copy comes first; the toolkit's dependencies come from this environment.
    env = dict(os.environ, PYTHONPATH=str(target))
    return wheel, target, env


def test_the_core_requires_jax_flax_and_numpy_only(installed):
    wheel, _, _ = installed
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        names = z.namelist()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    core = sorted(r.split(">")[0].split("=")[0] for r in requires if "extra ==" not in r)
    assert core == ["flax", "jax", "numpy"]
    extras = {r.split("extra ==")[1].strip().strip('"') for r in requires if "extra ==" in r}
    assert extras == {"experiments", "torch", "dev", "ray", "hf"}
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "experiments/", "configs/"))]
    # typed (PEP 561: type checkers read the package's hints), and the NNX twins ship beside the core
    assert {"attention_jax/py.typed", "attention_jax/nnx.py"} <= set(names)


@pytest.mark.slow
def test_console_scripts_train_and_sample_from_another_folder(installed, tmp_path, text_file):
    _, target, env = installed
    where = subprocess.run([sys.executable, "-c", "import attention_jax; print(attention_jax.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)  # fmt: skip
    assert where.stdout.startswith(str(target))  # the installed copy, not the checkout
    bin_dir = target / "bin"
    config = f"{ROOT / 'configs' / 'shakespeare_char.py'}:smoke"
    train = subprocess.run(
        [str(bin_dir / "attention-jax-train"), "--config", config, "--workdir", "run", "--no-progress",
         f"--config.data.dataset={text_file}", "--config.max_iters=4", "--config.eval_interval=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert (tmp_path / "run" / "summary.json").is_file()  # relative to the folder it ran in
    sample = subprocess.run([str(bin_dir / "attention-jax-sample"), "--workdir", "run", "--prompt", "the",
                             "--max_new_tokens", "5"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert sample.returncode == 0 and sample.stdout.startswith("the") and len(sample.stdout.rstrip("\n")) == 8
    sweep = subprocess.run([str(bin_dir / "attention-jax-sweep"), "--config",
                            f"{ROOT / 'configs' / 'ablate_scale.py'}:smoke", "--dry-run", "--workdir", "sw"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert sweep.returncode == 0 and "pending" in sweep.stdout
    for name in ("report", "bench", "attention-stats"):
        helped = subprocess.run([str(bin_dir / f"attention-jax-{name}"), "--help"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert helped.returncode == 0 and f"attention-jax-{name}" in helped.stdout
