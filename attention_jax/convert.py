"""Pretrained checkpoints in and out: Hugging Face GPT-2 <-> ``TransformerLM``; Flax attention layers <->
our native ``MultiHeadAttention`` (``from_flax_mha``, ``to_flax_mha``).

    cfg, params = convert.from_hf_gpt2("path/to/gpt2")        # a folder: config.json + model.safetensors
    logits = TransformerLM(cfg).apply({"params": params}, tokens)
    hf_config, state_dict = convert.to_hf_gpt2(cfg, params)    # and back (numpy arrays by transformers' names)

No torch is needed: a ``model.safetensors`` file is read with the ``safetensors``
package (imported here only, when a file is read or written); a state dict
may hold torch tensors or numpy arrays. The GPT-2 layout maps onto ours
without any arithmetic: GPT-2's ``Conv1D`` weights are (in, out) matrices, so
``c_attn.weight`` (C, 3C) is our fused ``qkv_kernel`` (C, 3, H, D) and its bias
``qkv_bias`` (3, H, D) reshaped; ``c_proj.weight`` (C, C) is ``proj_kernel``
(H, D, C). A refused checkpoint or config is one ``ValueError`` line naming
the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from attention_jax.model import ModelConfig

# transformers' activation_function names -> ModelConfig.activation
GPT2_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
# Buffers some GPT-2 checkpoints carry beside the weights: the causal mask and its fill value, not parameters.
_BUFFERS = ("attn.bias", "attn.masked_bias")


def from_hf_gpt2(checkpoint: str | os.PathLike | Mapping[str, Any], config: Any = None) -> tuple[ModelConfig, dict]:
    """``(ModelConfig, params)`` of a Hugging Face GPT-2 checkpoint, for ``TransformerLM``.

    ``checkpoint``: a folder with ``config.json`` and ``model.safetensors``, a
    ``.safetensors`` file (its ``config.json`` beside it), or a state dict
    (name -> torch tensor or array: ``GPT2LMHeadModel.state_dict()``; names with
    or without the ``transformer.`` prefix). ``config``: a ``GPT2Config``, its
    ``to_dict()``, or a path to a ``config.json``; needed with a state dict, and
    it wins over the file beside a checkpoint. The model computes what
    ``GPT2LMHeadModel`` does in evaluation (dropout 0; set ``dropout`` with
    ``cfg.replace`` to fine-tune); parameters are float32.
    """
    state, found = _read_state(checkpoint)
    hf = _read_config(config if config is not None else found)
    cfg = _model_config(hf)
    C, H, D, L = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.n_layer
    prefix = "transformer." if any(name.startswith("transformer.") for name in state) else ""
    names = _gpt2_shapes(cfg, prefix)
    lm_head = "lm_head.weight"
    if cfg.tie_embeddings and lm_head in state:  # the tied head, stored twice by state_dict(): must be the embedding
        if not np.array_equal(np.asarray(_array(state[lm_head])), np.asarray(_array(state[prefix + "wte.weight"]))):
            raise ValueError("lm_head.weight differs from wte.weight, but config tie_word_embeddings is true")
        names[lm_head] = names[prefix + "wte.weight"]
    buffers = {n for n in state if n.endswith(_BUFFERS) and n not in names}
    missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names) - buffers)
    if missing or extra:
        say = lambda keys: ", ".join(keys[:4]) + (f" (and {len(keys) - 4} more)" if len(keys) > 4 else "")
        raise ValueError(
            "the state dict does not fit a GPT-2 of this config: "
            + "; ".join(
                part for part in (missing and f"missing {say(missing)}", extra and f"unexpected {say(extra)}") if part
            )  # fmt: skip
        )
    w = {}
    for name, shape in names.items():
        array = np.asarray(_array(state[name]), np.float32)
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape}, the config says {shape}")
        w[name.removeprefix(prefix)] = array
    ln = lambda name: {"scale": w[f"{name}.weight"], "bias": w[f"{name}.bias"]}
    params: dict[str, Any] = {
        "token_embedding": {"embedding": w["wte.weight"]},
        "positions": {"embedding": w["wpe.weight"]},
        "ln_final": ln("ln_f"),
    }
    for i in range(L):
        h = f"h.{i}."
        params[f"block_{i}"] = {
            "ln_attn": ln(h + "ln_1"),
            "attn": {
                "qkv_kernel": w[h + "attn.c_attn.weight"].reshape(C, 3, H, D),
                "qkv_bias": w[h + "attn.c_attn.bias"].reshape(3, H, D),
                "proj_kernel": w[h + "attn.c_proj.weight"].reshape(H, D, C),
                "proj_bias": w[h + "attn.c_proj.bias"],
            },
            "ln_mlp": ln(h + "ln_2"),
            "mlp": {
                "fc": {"kernel": w[h + "mlp.c_fc.weight"], "bias": w[h + "mlp.c_fc.bias"]},
                "proj": {"kernel": w[h + "mlp.c_proj.weight"], "bias": w[h + "mlp.c_proj.bias"]},
            },
        }
    if not cfg.tie_embeddings:  # GPT-2's untied head has no bias: ours is zero
        params["lm_head"] = {"kernel": w["lm_head.weight"].T, "bias": np.zeros(cfg.vocab_size, np.float32)}
    return cfg, params


def to_hf_gpt2(model_config: ModelConfig, params: Mapping[str, Any]) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config, state_dict)`` of ``TransformerLM`` parameters as Hugging Face GPT-2's, float32 numpy arrays.

    ``config`` is a ``config.json`` dict (``GPT2Config(**config)``); ``state_dict``
    has ``GPT2LMHeadModel``'s names (``load_state_dict`` takes it through
    ``torch.from_numpy``). What GPT-2 cannot express (another position scheme,
    grouped kv heads, a q/k norm, windows, sinks, ...) is refused in one line;
    a model without biases gets zero biases, which compute the same.
    """
    cfg = model_config
    _check_expressible(cfg)
    C, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    f32 = lambda a: np.asarray(a, np.float32)
    zeros = lambda n: np.zeros(n, np.float32)
    get = lambda tree, *path: _get(tree, path)
    ln = lambda tree: (f32(tree["scale"]), f32(tree["bias"]) if "bias" in tree else zeros(C))
    sd: dict[str, np.ndarray] = {
        "transformer.wte.weight": f32(get(params, "token_embedding", "embedding")),
        "transformer.wpe.weight": f32(get(params, "positions", "embedding")),
    }
    for i in range(L):
        b, h = params[f"block_{i}"], f"transformer.h.{i}."
        a = b["attn"]
        for name, tree in (("ln_1", b["ln_attn"]), ("ln_2", b["ln_mlp"])):
            sd[h + name + ".weight"], sd[h + name + ".bias"] = ln(tree)
        sd[h + "attn.c_attn.weight"] = f32(a["qkv_kernel"]).reshape(C, 3 * C)
        sd[h + "attn.c_attn.bias"] = f32(a["qkv_bias"]).reshape(3 * C) if "qkv_bias" in a else zeros(3 * C)
        sd[h + "attn.c_proj.weight"] = f32(a["proj_kernel"]).reshape(C, C)
        sd[h + "attn.c_proj.bias"] = f32(a["proj_bias"]) if "proj_bias" in a else zeros(C)
        for name in ("fc", "proj"):
            layer = b["mlp"][name]
            sd[h + f"mlp.c_{name}.weight"] = f32(layer["kernel"])
            sd[h + f"mlp.c_{name}.bias"] = f32(layer["bias"]) if "bias" in layer else zeros(layer["kernel"].shape[1])
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = ln(params["ln_final"])
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    else:
        head = params["lm_head"]
        if "bias" in head and np.any(np.asarray(head["bias"]) != 0):
            raise ValueError("lm_head.bias: GPT-2's LM head has no bias, and this model's is not zero")
        sd["lm_head.weight"] = f32(head["kernel"]).T
    activation = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[cfg.activation]
    config = dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=V, n_positions=cfg.block_size, n_embd=C,
        n_layer=L, n_head=cfg.n_head, n_inner=cfg.mlp_hidden, activation_function=activation,
        layer_norm_epsilon=cfg.norm_epsilon, scale_attn_weights=cfg.attn_scale == "sqrt",
        scale_attn_by_inverse_layer_idx=cfg.attn_scale_by_layer, tie_word_embeddings=cfg.tie_embeddings,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
    )  # fmt: skip
    return config, sd


def save_hf_gpt2(folder: str | os.PathLike, model_config: ModelConfig, params: Mapping[str, Any]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (``to_hf_gpt2``) into ``folder``: what
    ``GPT2LMHeadModel.from_pretrained(folder)`` and ``from_hf_gpt2(folder)`` read."""
    save_file = _safetensors().save_file
    config, sd = to_hf_gpt2(model_config, params)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {name: array for name, array in sd.items() if name != "lm_head.weight" or not model_config.tie_embeddings}
    save_file({name: np.ascontiguousarray(a) for name, a in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def from_flax_mha(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The parameters of a ``flax.linen.MultiHeadDotProductAttention`` (or ``flax.nnx.MultiHeadAttention``, or
    ours of that name) as our native ``MultiHeadAttention``'s.

    ``query``/``key``/``value``/``out`` (kernels (C, H, D), (C_kv, K, D), (H, D, C'); biases) become
    the fused ``qkv_kernel`` (C, 3, H, D) when K = H and C_kv = C, else ``query_kernel`` and
    ``kv_kernel``; biases ``qkv_bias`` (or ``query_bias``, ``kv_bias``) and ``proj_bias``. Build the
    native layer with ``num_kv_heads=K``, ``use_qkv_bias`` and ``use_bias`` as the layer had biases,
    and ``causal=False`` (Flax's layer has no causal mask of its own). Refused in one line: the
    parameters of ``normalize_qk`` (Flax's LayerNorm there, epsilon 1e-6 without a bias, has no twin
    in the native layer).
    """
    params = params.get("params", params) if set(params) == {"params"} else params
    missing = sorted({"query", "key", "value", "out"} - set(params))
    if missing:
        raise ValueError(f"from_flax_mha: params lack {', '.join(missing)}: not a Flax attention layer's")
    if {"query_ln", "key_ln"} & set(params):
        raise ValueError("from_flax_mha: normalize_qk's query_ln/key_ln have no twin in the native layer")
    get = lambda name, leaf: None if leaf not in params[name] else np.asarray(params[name][leaf])
    q, k, v, out = (get(name, "kernel") for name in ("query", "key", "value", "out"))
    if q.ndim != 3 or k.shape != v.shape or k.ndim != 3 or k.shape[-1] != q.shape[-1] or q.shape[1] % k.shape[1]:
        shapes = {"query": q.shape, "key": k.shape, "value": v.shape}
        raise ValueError(f"from_flax_mha: kernels of shapes {shapes} are not (C, H, D), (C_kv, K, D) twice")
    H, K = q.shape[1], k.shape[1]
    biases = [get(name, "bias") for name in ("query", "key", "value")]
    native: dict[str, np.ndarray] = {"proj_kernel": out}
    if get("out", "bias") is not None:
        native["proj_bias"] = get("out", "bias")
    if K == H and k.shape[0] == q.shape[0]:
        native["qkv_kernel"] = np.stack([q, k, v], axis=1)
        if biases[0] is not None:
            native["qkv_bias"] = np.stack(biases)
    else:
        native["query_kernel"], native["kv_kernel"] = q, np.stack([k, v], axis=1)
        if biases[0] is not None:
            native["query_bias"], native["kv_bias"] = biases[0], np.stack(biases[1:])
    return native


def to_flax_mha(params: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Our native ``MultiHeadAttention``'s parameters as Flax's ``MultiHeadDotProductAttention`` tree (the inverse
    of ``from_flax_mha``). A layer without q/k/v biases but with an output bias has no Flax twin (Flax's
    ``use_bias`` is all four or none): refused in one line, as are the parameters of options Flax lacks."""
    params = params.get("params", params) if set(params) == {"params"} else params
    extra = sorted(set(params) - {"qkv_kernel", "qkv_bias", "query_kernel", "kv_kernel", "query_bias", "kv_bias",
                                  "proj_kernel", "proj_bias"})  # fmt: skip
    if extra:
        raise ValueError(f"to_flax_mha: {', '.join(extra)} have no twin in Flax's layer")
    arr = lambda name: None if name not in params else np.asarray(params[name])
    if "qkv_kernel" in params:
        w, b = arr("qkv_kernel"), arr("qkv_bias")
        kernels, biases = [w[:, i] for i in range(3)], None if b is None else [b[i] for i in range(3)]
    else:
        kv, b_kv = arr("kv_kernel"), arr("kv_bias")
        kernels = [arr("query_kernel"), kv[:, 0], kv[:, 1]]
        biases = None if b_kv is None else [arr("query_bias"), b_kv[0], b_kv[1]]
    if (biases is None) != ("proj_bias" not in params):
        raise ValueError("to_flax_mha: Flax's use_bias covers q, k, v and the output together; this layer has "
                         "biases on only some of them")  # fmt: skip
    tree = {name: {"kernel": w} for name, w in zip(("query", "key", "value"), kernels)}
    tree["out"] = {"kernel": arr("proj_kernel")}
    if biases is not None:
        for name, b in zip(("query", "key", "value"), biases):
            tree[name]["bias"] = b
        tree["out"]["bias"] = arr("proj_bias")
    return tree


# ---------------------------------------------------------------------------


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError(
            "reading or writing model.safetensors needs the safetensors package: pip install safetensors"
        ) from None
    return safetensors.numpy


def _read_state(checkpoint) -> tuple[Mapping[str, Any], Path | None]:
    """The state dict of ``checkpoint``, and the config.json found beside it (or None)."""
    if isinstance(checkpoint, Mapping):
        return checkpoint, None
    path = Path(checkpoint)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no GPT-2 checkpoint at {path}: expected a folder with model.safetensors, or the file")
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: only .safetensors files are read (for a torch .bin, pass torch.load(...)'s dict)")
    beside = file.parent / "config.json"
    return _safetensors().load_file(str(file)), beside if beside.is_file() else None


def _read_config(config) -> dict:
    if config is None:
        raise ValueError("config: a state dict needs its GPT-2 config (a GPT2Config, its dict or a config.json path)")
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif isinstance(config, (str, os.PathLike)):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"config {config}: cannot be read as JSON ({e})") from None
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a GPT2Config, a dict or a config.json path, got {type(config).__name__}")
    return dict(config)


def _model_config(hf: dict) -> ModelConfig:
    """The ModelConfig of a GPT-2 config.json dict; what it cannot express is one line naming the key."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config model_type={hf['model_type']!r}: from_hf_gpt2 reads GPT-2 checkpoints only")
    if hf.get("add_cross_attention"):
        raise ValueError("config add_cross_attention=true: a GPT-2 with cross-attention is not a language model here")
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise ValueError(f"config activation_function={act!r}: valid choices are {tuple(GPT2_ACTIVATIONS)}")
    missing = [key for key in ("vocab_size", "n_embd", "n_layer", "n_head") if key not in hf]
    if missing:
        raise ValueError(f"config lacks {', '.join(missing)}: not a GPT-2 config.json")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024), n_embd=hf["n_embd"],
            n_layer=hf["n_layer"], n_head=hf["n_head"], mlp_hidden=hf.get("n_inner"),
            activation=GPT2_ACTIVATIONS[act], norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            attn_scale="sqrt" if hf.get("scale_attn_weights", True) else "none",
            attn_scale_by_layer=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)), qkv_bias=True, bias=True, dropout=0.0,
            pos_encoding="learned",
        )  # fmt: skip
    except ValueError as e:
        raise ValueError(f"config: {e}") from None


def _gpt2_shapes(cfg: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """Every weight of a GPT-2 of ``cfg`` (name -> shape), the LM head's only when untied."""
    C, V, F = cfg.n_embd, cfg.vocab_size, cfg.mlp_width
    shapes = {"wte.weight": (V, C), "wpe.weight": (cfg.block_size, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(cfg.n_layer):
        h = f"h.{i}."
        shapes |= {h + f"{ln}.{p}": (C,) for ln in ("ln_1", "ln_2") for p in ("weight", "bias")}
        shapes |= {h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,)}
        shapes |= {h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,)}
        shapes |= {h + "mlp.c_fc.weight": (C, F), h + "mlp.c_fc.bias": (F,)}
        shapes |= {h + "mlp.c_proj.weight": (F, C), h + "mlp.c_proj.bias": (C,)}
    named = {prefix + name: shape for name, shape in shapes.items()}
    if not cfg.tie_embeddings:
        named["lm_head.weight"] = (V, C)
    return named


def _check_expressible(cfg: ModelConfig) -> None:
    """Refuse, in one line naming the field, a model GPT-2 cannot hold."""
    plain = {"n_kv_head": None, "end_token_id": None, "qk_norm": False, "window": None, "sinks": False,
             "softcap": None, "logn_scale": None, "pos_encoding": "learned", "causal": True}  # fmt: skip
    for name, value in plain.items():
        if getattr(cfg, name) != value and not (name == "n_kv_head" and cfg.n_kv_head == cfg.n_head):
            raise ValueError(f"to_hf_gpt2: GPT-2 has no {name}={getattr(cfg, name)!r} (it needs {name}={value!r})")
    if not isinstance(cfg.attn_scale, str) or cfg.attn_scale not in ("sqrt", "none"):
        raise ValueError(f"to_hf_gpt2: GPT-2 scales attention by 1/sqrt(D) or 1, not attn_scale={cfg.attn_scale!r}")
    if cfg.n_head * cfg.head_dim != cfg.n_embd:
        split = cfg.n_head * cfg.head_dim
        raise ValueError(f"to_hf_gpt2: GPT-2's heads split n_embd={cfg.n_embd}, but n_head x head_size = {split}")


def _get(tree, path):
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            raise ValueError(f"params lack {'/'.join(path)}: not a TransformerLM with learned positions")
        tree = tree[key]
    return tree


def _array(x: Any) -> np.ndarray:
    """A torch tensor (without importing torch) or an array, as numpy."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)
