"""Experiment configs: the schema, overrides, one-line errors that name the key, the shipped files."""

from __future__ import annotations

import os

import jax
import pytest

from attention_jax import data as data_lib
from attention_jax.lab.config import (
    ConfigError,
    apply_overrides,
    base_config,
    load_config,
    model_config,
    parse_override_args,
)
from attention_jax.lab.experiment import Experiment
from attention_jax.lab.sweep import load_sweep
from attention_jax.model import ModelConfig

SMOKE = "configs/shakespeare_char.py:smoke"


def test_unknown_key_names_closest_valid_key():
    config = load_config(SMOKE)
    with pytest.raises(ConfigError, match=r"unknown config key 'model.n_heads'.*model\.n_head"):
        apply_overrides(config, {"model.n_heads": "4"})
    with pytest.raises(ConfigError, match=r"learning_rate"):
        apply_overrides(config, {"learnig_rate": "1e-3"})
    with pytest.raises(ConfigError, match=r"model\.n_layer"):
        apply_overrides(config, {"n_layers": "2"})  # leaf name close to a nested key


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("batch_size", "twelve", r"batch_size.*expects int"),
        ("learning_rate", "fast", r"learning_rate.*expects float"),
        ("model.qk_norm_gain", "maybe", r"model\.qk_norm_gain.*expects bool"),
    ],
)
def test_wrong_type_names_field(key, value, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(load_config(SMOKE), {key: value})


def test_override_parsing_and_types():
    overrides = parse_override_args(["--config.model.n_head=4", "--config.seed", "3", "--config.model.qk_norm=true"])
    config = apply_overrides(load_config(SMOKE), overrides)
    assert (config.model.n_head, config.seed, config.model.qk_norm) == (4, 3, True)
    apply_overrides(config, {"model.head_size": "8", "model.attn_scale": 0.25})
    assert config.model.head_size == 8 and config.model.attn_scale == "0.25"
    with pytest.raises(ConfigError, match="unrecognized argument"):
        parse_override_args(["--model.n_head=4"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"learning_rate": -1.0}, r"learning_rate=-1\.0: must be positive"),
        ({"batch_size": 0}, r"batch_size=0"),
        ({"beta2": 1.0}, r"beta2"),
        ({"model.n_head": 3}, r"model\.head_size.*not divisible by n_head=3"),
        ({"model.attn_scale": "sqrtt"}, r"model\.attn_scale.*'sqrt'"),
        ({"model.pos_encoding": "xpos"}, r"model\.pos_encoding"),
        ({"model.block_size": 5000}, r"model\.block_size=5000 is too long for the validation split"),
        ({"data.dataset": "/nonexistent/file.txt"}, r"data\.dataset='/nonexistent/file\.txt': data file not found"),
        ({"weight_decay": float("inf")}, r"weight_decay=inf: must be a finite number"),
        ({"grad_clip": float("inf")}, r"grad_clip=inf: must be a finite number"),
        ({"z_loss": -1e-4}, r"z_loss=-0\.0001: must be non-negative \(0: no z-loss\)"),
        ({"min_lr": float("-inf")}, r"min_lr=-inf: must be a finite number"),
        ({"model.attention_impl": "cudnn"}, r"model\.attention_impl='cudnn': needs an NVIDIA GPU with cuDNN"),
    ],
)
def test_impossible_values_fail_before_compute(overrides, match, tiny_config, small_text):
    if overrides.get("model.attention_impl") == "cudnn" and jax.devices()[0].platform == "gpu":
        pytest.skip("cuDNN is available on this machine")
    config = tiny_config(**overrides)
    with pytest.raises((ConfigError, FileNotFoundError), match=match):
        Experiment.from_config(config, text=None if "data.dataset" in overrides else small_text())


@pytest.mark.parametrize("key", ["learning_rate", "data.train_fraction", "model.n_head"])
def test_none_is_refused_where_the_default_is_not_none(key):
    with pytest.raises(ConfigError, match=rf"'{key}' expects \w+, got None"):
        apply_overrides(load_config(SMOKE), {key: "none"})
    config = apply_overrides(load_config(SMOKE), {"model.head_size": "8"})
    assert apply_overrides(config, {"model.head_size": "none"}).model.head_size is None


SHIPPED = [
    "configs/shakespeare_char.py",
    "configs/shakespeare_char.py:cpu",
    "configs/shakespeare_char.py:gpu",
    "configs/lecture_gpt.py",
    "configs/bigram.py",
]


@pytest.mark.parametrize("spec", SHIPPED)
def test_shipped_configs_validate_against_tiny_shakespeare(spec):
    """Reads $ATTENTION_JAX_DATA_DIR (CI points it at the real file); skips without it."""
    folder = os.environ.get("ATTENTION_JAX_DATA_DIR")
    if not folder or not os.path.isfile(os.path.join(folder, "tinyshakespeare.txt")):
        pytest.skip("tinyshakespeare.txt not in $ATTENTION_JAX_DATA_DIR")
    raw = open(os.path.join(folder, "tinyshakespeare.txt"), "rb").read()
    assert len(raw) == data_lib.TINYSHAKESPEARE_BYTES
    exp = Experiment.from_config(load_config(spec))  # validation and data only: no compile
    assert exp.tokenizer.vocab_size == 65
    assert exp.train_data.shape[0] == int(0.9 * len(raw.decode("utf-8")))


@pytest.mark.parametrize(
    "body, variant, match",
    [
        (
            "def get_config(arg):\n    return undefined_name\nx = 1/0\n",
            "",
            r"could not load config file .*: ZeroDivisionError",
        ),
        ("X = 1\n", "", r"defines no get_config\(arg\)"),
        (
            "def get_config(arg):\n    return {'seed': 1}\n",
            "",
            r"get_config of .*\.py returned dict; it must return an ml_coll",
        ),
        ("def get_config(arg):\n    return {}[arg]\n", ":cpu", r"\.py: get_config\('cpu'\) failed: KeyError: 'cpu'"),
    ],
)
def test_config_file_problems_are_one_line_errors(tmp_path, body, variant, match):
    path = tmp_path / "config_file.py"
    path.write_text(body)
    with pytest.raises(ConfigError, match=match):
        load_config(f"{path}{variant}")


def test_not_a_sweep_and_unknown_variant_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"defines no get_sweep\(arg\): it is not a sweep"):
        load_sweep(SMOKE)
    with pytest.raises(ConfigError, match=r"unknown variant 'tpu'"):
        load_config("configs/shakespeare_char.py:tpu")


def test_every_model_config_field_is_a_config_key_and_maps_through():
    """config.model holds each ModelConfig field by the same name (plus "type"): one schema, mapped by name.

    Except the library-only fields (NOT_IN_CONFIG: the vocabulary, causal, param_dtype), which keep
    their defaults in a training run.
    """
    from attention_jax.lab.config import NOT_IN_CONFIG

    fields = set(ModelConfig.keywords()) - set(NOT_IN_CONFIG)  # the attention options by their flat names
    assert set(base_config().model.keys()) == fields | {"type"}
    config = apply_overrides(load_config(SMOKE), {"model.head_size": "8", "model.attn_scale": "0.5"})
    mc = model_config(config, vocab_size=7)
    assert (mc.vocab_size, mc.head_size, mc.head_dim, mc.attn_scale) == (7, 8, 8, 0.5)  # "0.5" read as a number
    assert (mc.causal, mc.param_dtype) == (True, "float32")
    with pytest.raises(ConfigError, match=r"^model\.pos_encoding"):  # the field named by its config key
        model_config(apply_overrides(load_config(SMOKE), {"model.pos_encoding": "xpos"}), vocab_size=7)
