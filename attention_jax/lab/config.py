"""Experiment configs: the schema and its defaults, loading, overrides, validation, the model they build.

A config file is a Python file whose ``get_config(arg)`` returns an
``ml_collections.ConfigDict`` built from ``base_config()``; ``path.py:ARG``
passes ARG (a variant name such as ``cpu`` or ``smoke``). Keys follow
nanoGPT's names. Overrides are dotted keys (``model.n_head``) with either
strings from the command line (parsed by the field's type) or Python values
from a sweep. Every error is a ``ConfigError`` whose message is one line that
names the key.

Names: ``config`` is always an experiment config (a ConfigDict);
``model_config`` is the frozen :class:`attention_jax.ModelConfig` built from
its ``model`` group by :func:`model_config`.
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import flax.linen as nn
import ml_collections
from ml_collections import config_dict

from attention_jax.lab.errors import ConfigError  # here since the run directory raises it too
from attention_jax.model import BigramLM, ModelConfig, TransformerLM

# ---------------------------------------------------------------------------
# The schema: every key, its default, and what it means
# ---------------------------------------------------------------------------


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 1337  # seed of params, batches, dropout and sampling; seed+i for the i-th of num_seeds
    c.num_seeds = 1  # K seeds trained at once in one program (jax.vmap over params, optimizer, keys)
    c.batch_size = 64  # sequences per optimizer step (per seed), sharded over all devices
    c.max_iters = 5000  # optimizer steps
    c.eval_interval = 250  # evaluate every this many steps (and at step 0 and at the end)
    c.eval_iters = 200  # fixed batches per split in one evaluation
    c.log_interval = 10  # write a training row to metrics.jsonl every this many steps
    c.learning_rate = 1e-3  # peak learning rate after warmup
    c.min_lr = 1e-4  # learning rate at the end of the cosine decay
    c.warmup_iters = 100  # linear warmup steps
    c.lr_decay_iters = 5000  # cosine decay ends here; flat at min_lr afterwards
    c.weight_decay = 0.1  # AdamW decoupled weight decay, on matrices only
    c.beta1 = 0.9  # AdamW beta1
    c.beta2 = 0.99  # AdamW beta2
    c.grad_clip = 1.0  # clip gradients to this global norm (0 disables)
    c.z_loss = 0.0  # weight of mean(log² Z) of the output softmax in the training loss (PaLM: 1e-4); 0: none
    c.checkpoint_every = 250  # save the latest checkpoint every this many steps (and at the end)
    c.steps_per_call = 1  # optimizer steps per compiled call (lax.scan); same result, less dispatch
    c.sample_tokens = 500  # characters sampled into sample.txt at the end (0: none)
    # One run over the devices of several processes or hosts (jax.distributed; attention_jax/lab/distributed.py).
    # Every process runs the same command. Empty values come from $JAX_COORDINATOR_ADDRESS,
    # $JAX_NUM_PROCESSES and $JAX_PROCESS_ID, else from what JAX detects (Cloud TPU VM, SLURM, ...).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False  # True: join the other processes first
    c.distributed.coordinator_address = ""  # "host:port" where process 0 serves the others
    c.distributed.num_processes = config_dict.placeholder(int)  # processes in the run
    c.distributed.process_id = config_dict.placeholder(int)  # this one's index, 0 .. num_processes - 1
    c.distributed.join_timeout_s = 300  # not every process joined by then: one error line, exit 5
    # A process silent this long counts as dead and the others stop (JAX's default, 100 s); a dead
    # process 0, or one a collective was waiting on, is noticed at once.
    c.distributed.heartbeat_timeout_s = 100
    # Sweeps on a Ray cluster (experiments.sweep --backend ray): what each Ray task, one program of
    # the sweep (a point, or the points grouped into one population), asks the cluster for.
    c.ray = ml_collections.ConfigDict()
    c.ray.num_cpus = 1.0  # CPU cores per task (Ray's bookkeeping: JAX uses every core the machine has)
    c.ray.num_gpus = 0.0  # GPUs per task
    c.ray.tpu_chips = 0  # TPU chips per task (Ray's "TPU" resource; a TPU VM host has 4 or 8)
    c.ray.hosts = 1  # hosts per program: more than 1 runs it as one task per node, joined by jax.distributed
    c.ray.max_retries = 3  # a task whose worker or node died runs again this often (resuming from its checkpoint)
    # Members trained together in one program, each with its own values: a tuple of dicts
    # ({"learning_rate": 3e-3, "seed": 0}, ...), each entry times num_seeds seeds; () = one entry,
    # the config itself. Only runtime values may differ (attention_jax.lab.population.MEMBER_KEYS).
    c.population = ()

    c.model = ml_collections.ConfigDict()
    c.model.type = "transformer"  # "transformer" or "bigram"
    c.model.block_size = 256  # context length T
    c.model.n_embd = 384  # residual width C
    c.model.n_head = 6  # heads per layer H
    c.model.n_layer = 6  # transformer blocks
    c.model.head_size = config_dict.placeholder(int)  # D; None = n_embd // n_head
    c.model.n_kv_head = config_dict.placeholder(int)  # K kv heads (grouped-query; 1 = multi-query); None = n_head
    c.model.attn_scale = "sqrt"  # "sqrt" (1/sqrt(D)), "none" (1), "mup" (1/D), or a number
    c.model.pos_encoding = "learned"  # "learned", "sinusoidal", "rope", "alibi" or "none"
    # A norm on q and k before q·kᵀ: false, true or "layer" (LayerNorm), "rms" (RMSNorm)
    c.model.qk_norm = config_dict.FieldReference(False, field_type=object)  # a bool or a name
    c.model.qk_norm_gain = True  # the q/k norms learn a gain (false: parameter-free norms)
    c.model.dropout = 0.2  # dropout on attention weights and residual branches
    c.model.dtype = "float32"  # compute dtype ("bfloat16" on accelerators); params stay float32
    c.model.bias = True  # biases in LayerNorms, projections, MLP and LM head (nanoGPT's recipes: False)
    c.model.tie_embeddings = False  # LM head shares the token embedding (nanoGPT: True)
    c.model.qkv_bias = False  # biases on the q, k, v projections (GPT-2: true)
    c.model.mlp_hidden = config_dict.placeholder(int)  # the MLP's hidden width; None = 4 * n_embd
    c.model.activation = "gelu_tanh"  # the MLP's: "gelu_tanh" (GPT-2), "gelu" (exact), "relu", "silu"
    c.model.norm_epsilon = 1e-5  # the LayerNorms' epsilon
    c.model.attn_scale_by_layer = False  # layer i's attention scale / (i + 1) (GPT-2's inverse-layer-idx option)
    c.model.scan_layers = False  # the blocks as one nn.scan: one block compiled, parameters stacked on a layers axis
    c.model.remat = config_dict.placeholder(str)  # a jax.checkpoint_policies name: rematerialize each block
    c.model.attention_impl = "dense"  # "dense", "xla", "cudnn" (GPU), "blockwise" (long T) or "splash" (TPU)
    c.model.softcap = config_dict.placeholder(float)  # None; c: logits -> c·tanh(logits/c) ("dense", "blockwise")
    # Sliding-window attention: None (all of the past), W (each query sees the last W keys), or
    # one per layer, cycled: [256, null] = every other layer global (--config.model.window='[256, null]')
    c.model.window = config_dict.FieldReference(None, field_type=object)
    c.model.sinks = False  # a learned sink logit per head (gpt-oss): weight that goes to no value
    # Scalable-Softmax: logits times logn_scale·log(n), n the keys a query sees; None: off
    c.model.logn_scale = config_dict.placeholder(float)
    c.model.logn_learned = False  # logn_scale a learned per-head parameter, starting at logn_scale

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "tinyshakespeare"  # "tinyshakespeare" or a path to any UTF-8 text file
    c.data.train_fraction = 0.9  # first 90% of the characters train, the rest validate
    # A character that ends each document of the text (e.g. "\n": every line a document): tokens attend
    # only within their document and positions restart after it (packed sequences); None: one stream
    c.data.document_end = config_dict.placeholder(str)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a config to a seconds-long CPU run (keeps its ablation settings)."""
    c.batch_size = 4
    c.max_iters = 20
    c.eval_interval = 10
    c.eval_iters = 2
    c.log_interval = 5
    c.warmup_iters = 2
    c.lr_decay_iters = 20
    c.checkpoint_every = 10
    c.sample_tokens = 40
    c.model.block_size = 16
    c.model.n_embd = 32
    c.model.n_head = 2
    c.model.n_layer = 2
    c.model.dropout = 0.0
    return c


# ---------------------------------------------------------------------------
# Loading config files and applying overrides
# ---------------------------------------------------------------------------


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``path/to/config.py[:ARG]`` (or a shipped ``NAME[:ARG]``) and return ``get_config(ARG)`` (locked)."""
    config = call_config_function(spec, "get_config")
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"get_config of {spec.partition(':')[0]} returned {type(config).__name__}; it must return an "
            "ml_collections.ConfigDict (start from attention_jax.lab.config.base_config())"
        )
    config.lock()
    return config


def run_name(spec: str) -> str:
    """A folder name for ``path/to/name.py[:ARG]`` or ``name[:ARG]``: ``name`` or ``name-ARG``."""
    path, _, arg = spec.partition(":")
    return Path(path).stem + (f"-{arg}" if arg else "")


def configs_dir() -> Path | None:
    """The folder of the shipped configs: ``configs/`` of a clone, ``attention_jax/lab/configs`` of an install.

    setup.py installs the clone's top-level ``configs/`` as ``attention_jax/lab/configs``;
    an editable install or a clone on the path keeps it beside the package. Found by
    path, not imported: the files are loaded one by one (``call_config_function``).
    """
    lab = Path(__file__).resolve().parent
    for candidate in (lab / "configs", lab.parent.parent / "configs"):  # installed wheel; clone or editable
        if (candidate / "shakespeare_char.py").is_file():
            return candidate
    return None


def shipped_configs() -> list[str]:
    """The names ``--config NAME[:ARG]`` accepts: the shipped config files, without ``.py``."""
    where = configs_dir()
    return sorted(f.stem for f in where.glob("*.py") if not f.name.startswith("_")) if where else []


def config_file(path: str) -> Path:
    """The file of a spec's path part: a file that exists, else a shipped config's name (``shakespeare_char``)."""
    file = Path(path).expanduser()
    if file.is_file():
        return file
    names = ", ".join(shipped_configs()) or "none found"
    if file.name != path:  # a path with folders: a file the user meant, not a name
        raise ConfigError(f"config file not found: {path} (or give a shipped config by name: {names})")
    name = path.removesuffix(".py")
    where = configs_dir()
    if where is not None and name in shipped_configs():
        return where / f"{name}.py"
    raise ConfigError(f"unknown config '{path}': no such file here, and the shipped configs are: {names}")


def call_config_function(spec: str, function: str, missing_hint: str = "") -> Any:
    """``function(ARG)`` of the config file ``path.py[:ARG]`` or shipped ``NAME[:ARG]``; failures are one line."""
    path, _, arg = spec.partition(":")
    file = config_file(path)
    module_name = "_attention_jax_config_" + file.stem
    loader = importlib.machinery.SourceFileLoader(module_name, str(file))  # any file name, not only *.py
    module_spec = importlib.util.spec_from_file_location(module_name, file, loader=loader)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a broken config file: say which and why, in one line
        raise ConfigError(f"could not load config file {path}: {type(e).__name__}: {e}") from None
    if not hasattr(module, function):
        raise ConfigError(f"config file {path} defines no {function}(arg){missing_hint}")
    try:
        return getattr(module, function)(arg or None)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    except Exception as e:  # a bug in the config file: say where, in one line
        raise ConfigError(f"{path}: {function}({arg or None!r}) failed: {type(e).__name__}: {e}") from None


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


def unknown_key_message(key: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if not close:  # try the last component alone: "n_heads" -> "model.n_head"
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.6)]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key '{key}'{hint}"


def _field_type(parent: ml_collections.ConfigDict, name: str) -> type | None:
    field = parent._fields[name]  # ConfigDict exposes no public way to read a placeholder's type
    if isinstance(field, config_dict.FieldReference):
        return field.get_type()
    return None if field is None else type(field)


def _nullable(parent: ml_collections.ConfigDict, name: str) -> bool:
    """Fields declared as ``placeholder(type)`` (default None) accept None."""
    return parent[name] is None or isinstance(parent._fields[name], config_dict.FieldReference)


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
            # float() reads "nan" and "inf"; no setting wants them. (A Python infinity, from a sweep,
            # passes here as it always did: validate() refuses it with the same words.)
            if math.isnan(out) or (isinstance(value, str) and math.isinf(out)):
                raise ConfigError(f"{key}={out!r}: must be a finite number")
            return out
        if kind is str:
            return value if isinstance(value, str) else str(value)
        if kind is object:  # a field of several types: true/false is a bool, JSON is read, other text stays
            if isinstance(value, str) and value.lower() in ("true", "yes", "false", "no"):
                return value.lower() in _TRUE
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    return value
            return tuple(value) if isinstance(value, list) else value
        if kind in (tuple, list):  # a JSON list on the command line, a list or tuple from Python
            parsed = json.loads(value) if isinstance(value, str) else value
            if not isinstance(parsed, (list, tuple)):
                raise ValueError
            return tuple(parsed)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        what = "a JSON list" if kind in (tuple, list) else kind.__name__
        raise ConfigError(f"config key '{key}' expects {what}, got {value!r}") from None
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """Set dotted keys in ``config`` (in place; also returned). Unknown keys raise ConfigError."""
    valid = flat_keys(config)
    for key, value in overrides.items():
        parent, parts = config, key.split(".")
        for part in parts[:-1]:
            child = parent.get(part) if isinstance(parent, ml_collections.ConfigDict) else None
            if not isinstance(child, ml_collections.ConfigDict):
                raise ConfigError(unknown_key_message(key, valid))
            parent = child
        name = parts[-1]
        if name not in parent or isinstance(parent[name], ml_collections.ConfigDict):
            raise ConfigError(unknown_key_message(key, valid))
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
    """A plain dict of a ConfigDict, as JSON reads it back (tuples become lists)."""
    return json.loads(json.dumps(config.to_dict()))


def from_dict(d: dict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(d)
    config.lock()
    return config


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in _TRUE


# ---------------------------------------------------------------------------
# Validation (before any compute) and the model a config describes
# ---------------------------------------------------------------------------


def get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    """The value at a dotted key (``model.n_head``)."""
    for part in dotted.split("."):
        config = config[part]
    return config


def validate(config: ml_collections.ConfigDict, device_count: int = 1) -> None:
    """Raise ConfigError naming the first field whose value cannot work."""

    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ConfigError(f"{key}={get(config, key)!r}: {what}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    positive = ("batch_size", "eval_interval", "eval_iters", "checkpoint_every", "steps_per_call", "num_seeds")
    for key in (*positive, "log_interval"):
        need(is_int(get(config, key)) and get(config, key) > 0, key, "must be a positive integer")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "seed"):
        need(is_int(get(config, key)) and get(config, key) >= 0, key, "must be a non-negative integer")
    for key in flat_keys(config):  # inf passes every comparison below, and NaN fails them silently
        value = get(config, key)
        if isinstance(value, float):
            need(math.isfinite(value), key, "must be a finite number")
    need(config.learning_rate > 0, "learning_rate", "must be positive")
    need(0 <= config.min_lr <= config.learning_rate, "min_lr", "must be in [0, learning_rate]")
    need(config.weight_decay >= 0, "weight_decay", "must be non-negative")
    need(0 <= config.beta1 < 1, "beta1", "must be in [0, 1)")
    need(0 <= config.beta2 < 1, "beta2", "must be in [0, 1)")
    need(config.grad_clip >= 0, "grad_clip", "must be non-negative (0 disables clipping)")
    need(config.z_loss >= 0, "z_loss", "must be non-negative (0: no z-loss)")
    need(0 < config.data.train_fraction < 1, "data.train_fraction", "must be in (0, 1)")
    end = config.data.get("document_end")
    need(end is None or (isinstance(end, str) and len(end) == 1), "data.document_end",
         f"must be one character (the character tokenizer's end token) or None, got {end!r}")  # fmt: skip
    need(config.batch_size % device_count == 0, "batch_size", f"must be divisible by the {device_count} devices")
    if config.model.attention_impl == "cudnn":
        import jax

        platform = jax.devices()[0].platform
        need(platform == "gpu", "model.attention_impl", f"needs an NVIDIA GPU with cuDNN, and JAX runs on {platform} "
             "here; use 'dense', 'xla' or 'blockwise'")  # fmt: skip


# ModelConfig fields that are not config keys: the vocabulary comes from the data; a causal=False
# model cannot be trained on next tokens; parameters stay float32 for the optimizer.
NOT_IN_CONFIG = ("vocab_size", "causal", "param_dtype", "end_token_id")  # end_token_id: from data.document_end


def end_token_id(document_end: str | None, tokenizer) -> int | None:
    """The token id of ``data.document_end`` in ``tokenizer``'s vocabulary, or None; errors name the key."""
    if document_end is None:
        return None
    ids = tokenizer.encode(document_end) if document_end in tokenizer.chars else []
    if len(ids) != 1:
        raise ConfigError(
            f"data.document_end={document_end!r} does not occur in the text, so no document ends; "
            "choose a character of the text, or None"
        )
    return int(ids[0])


def model_config(config: ml_collections.ConfigDict, vocab_size: int, end_token_id: int | None = None) -> ModelConfig:
    """The frozen ModelConfig described by ``config.model``; errors name the key.

    The one place where config keys meet the model: ``model.KEY`` is the
    ModelConfig keyword KEY (``ModelConfig.keywords()``): one of its own
    fields, or an attention option by its flat name (``model.attn_scale`` is
    ``AttentionOptions.scale``, ``model.qk_norm`` is ``AttentionOptions.qk_norm``,
    ...). A key that an older run's config.json lacks keeps its default, so
    runs trained before an option existed still sample and resume.
    """
    m = config.model
    kwargs = {key: m[key] for key in ModelConfig.keywords() if key not in NOT_IN_CONFIG and key in m}
    if isinstance(kwargs.get("attn_scale"), str):  # "0.5" from the command line is the number 0.5
        try:
            kwargs["attn_scale"] = float(kwargs["attn_scale"])
        except ValueError:
            pass
    try:
        return ModelConfig(vocab_size=vocab_size, end_token_id=end_token_id, **kwargs)
    except ValueError as e:
        raise ConfigError(str(e).replace("ModelConfig.", "model.")) from None


def build_model(config: ml_collections.ConfigDict, model_config: ModelConfig) -> nn.Module:
    """The Flax module of ``config.model.type``."""
    kind = config.model.type
    if kind == "transformer":
        return TransformerLM(model_config)
    if kind == "bigram":
        return BigramLM(model_config.vocab_size)
    raise ConfigError(f"model.type must be 'transformer' or 'bigram', got {kind!r}")
