"""Loading config files and applying overrides, with errors a person can act on.

A config file is a Python file whose ``get_config(arg)`` returns a locked
``ml_collections.ConfigDict``; ``path.py:ARG`` passes ARG (a variant name such
as ``cpu`` or ``smoke``). Overrides are dotted keys (``model.n_head``) with
either strings from the command line (parsed by the field's type) or Python
values from a sweep.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
    """A config file, key or value that cannot be used. Its message is one line."""


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``path/to/config.py[:ARG]`` and return ``get_config(ARG)`` (locked)."""
    config = call_config_function(spec, "get_config")
    config.lock()
    return config


def run_name(spec: str) -> str:
    """A folder name for ``path/to/name.py[:ARG]``: ``name`` or ``name-ARG``."""
    path, _, arg = spec.partition(":")
    return Path(path).stem + (f"-{arg}" if arg else "")


def call_config_function(spec: str, function: str, missing_hint: str = "") -> Any:
    """``function(ARG)`` of the config file ``path.py[:ARG]``; every failure is one ConfigError line."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location("_attention_jax_config_" + file.stem, file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a broken config file: say which and why, in one line
        raise ConfigError(f"could not load config file {path}: {type(e).__name__}: {e}") from None
    if not hasattr(module, function):
        raise ConfigError(f"config file {path} defines no {function}(arg){missing_hint}")
    try:
        return getattr(module, function)(arg or None)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a ConfigDict, e.g. ``model.n_head``."""
    keys = []
    for name, value in config.items():
        full = prefix + name
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, full + "."))
        else:
            keys.append(full)
    return keys


def _unknown_key_message(key: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if not close:  # try the last component alone: "n_heads" -> "model.n_head"
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.6)]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key '{key}'{hint}"


def _field_type(parent: ml_collections.ConfigDict, name: str) -> type | None:
    field = parent._fields[name]  # noqa: SLF001 - ConfigDict exposes no public way to read a placeholder's type
    if isinstance(field, config_dict.FieldReference):
        return field.get_type()
    return None if field is None else type(field)


def _nullable(parent: ml_collections.ConfigDict, name: str) -> bool:
    """Fields declared as ``placeholder(type)`` (default None) accept None."""
    return parent[name] is None or isinstance(parent._fields[name], config_dict.FieldReference)  # noqa: SLF001


_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _convert(key: str, value: Any, kind: type | None, nullable: bool = False) -> Any:
    """Parse a command-line string, or check a Python value, against a field's type.

    ``None`` (or the text none/null) is accepted only by fields whose default is None.
    """
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and kind is not str):
        if nullable:
            return None
        raise ConfigError(f"config key '{key}' expects {getattr(kind, '__name__', 'a value')}, got None")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, str):
                return int(value)
            if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                return int(value)
            raise ValueError
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if math.isnan(out):
                raise ValueError
            return out
        if kind is str:
            return value if isinstance(value, str) else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}' expects {kind.__name__}, got {value!r}") from None
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """Set dotted keys in ``config`` (in place; also returned). Unknown keys raise ConfigError."""
    valid = flat_keys(config)
    for key, value in overrides.items():
        parent, parts = config, key.split(".")
        for part in parts[:-1]:
            child = parent.get(part) if isinstance(parent, ml_collections.ConfigDict) else None
            if not isinstance(child, ml_collections.ConfigDict):
                raise ConfigError(_unknown_key_message(key, valid))
            parent = child
        name = parts[-1]
        if name not in parent or isinstance(parent[name], ml_collections.ConfigDict):
            raise ConfigError(_unknown_key_message(key, valid))
        with parent.unlocked():
            parent[name] = _convert(key, value, _field_type(parent, name), nullable=_nullable(parent, name))
    return config


def parse_override_args(args: list[str]) -> dict[str, str]:
    """``["--config.model.n_head=8", "--config.seed", "3"]`` -> {"model.n_head": "8", "seed": "3"}."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unrecognized argument '{arg}' (overrides look like --config.KEY=VALUE)")
        body = arg[len("--config.") :]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override '{arg}' has no value (use --config.KEY=VALUE)")
        overrides[key] = value
        i += 1
    return overrides


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """A plain, JSON-ready dict of a ConfigDict."""
    return config.to_dict()


def from_dict(d: dict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(d)
    config.lock()
    return config


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in _TRUE
