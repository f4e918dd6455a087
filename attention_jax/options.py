"""``AttentionOptions``: the one schema of an attention layer's options.

Every option an attention layer has is one field here, with its default, its
comment and its check; nothing else names, defaults or validates them. The
consumers take the object whole: ``ModelConfig.attention``, the Linen and NNX
``Head`` and ``MultiHeadAttention`` (``options=``), and the pure functions
through :meth:`AttentionOptions.attention_kwargs`. Adding an option is: one
field with its comment, its check in ``__post_init__`` (or
:meth:`AttentionOptions.check` when it needs the head size D), its use in
:mod:`attention_jax.attention`, its test.

A refused value is one ``OptionError`` (a ``ValueError``) whose one line
names the field: ``AttentionOptions.pos_encoding: unknown 'xpos', valid
choices are ...``; an owner renames it to its own field (``ModelConfig.attn_scale``).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import numpy as np

from attention_jax import attention
from attention_jax.attention import ATTENTION_IMPLS, SCALES, ScaleLike
from attention_jax.positions import POS_ENCODINGS, alibi_slopes

QK_NORMS = ("layer", "rms")  # qk_norm's names; True is "layer" (its meaning before "rms" existed)

_PLAIN = (str, int, float, bool, type(None))  # values hashed and compared by value; arrays by identity


class OptionError(ValueError):
    """A refused attention option: ``owner.field`` followed by why, on one line."""

    def __init__(self, field: str, why: str, owner: str = "AttentionOptions"):
        self.field, self.why, self.owner = field, why, owner
        super().__init__(f"{owner}.{field}{why}")

    def named(self, owner: str, fields: dict[str, str] | None = None) -> OptionError:
        """The same error as ``owner`` says it, with its own field names (``{"scale": "attn_scale"}``)."""
        return OptionError((fields or {}).get(self.field, self.field), self.why, owner)


def _is_array(value: object) -> bool:
    return isinstance(value, (np.ndarray, jax.Array))  # jax.Array includes tracers


def _positive_number(name: str, value: object) -> float:
    """``value`` as a float if it is a positive finite real number (not a bool), else the field's one-line error."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
        raise OptionError(name, f" must be a positive finite number or None, got {value!r}")
    return float(value)


def _quoted(choices) -> str:
    return " | ".join(f'"{c}"' for c in choices)


def choices_doc() -> str:
    """The choices of the string-valued options, one line each, as the docstrings list them."""
    return (
        f"    ``scale``: {_quoted(SCALES)} | a positive number | a JAX or numpy array (a scalar,\n"
        "      or broadcastable to the (..., H, T, S) logits; a traced one passes unchecked)\n"
        f'    ``qk_norm``: False | True (= "layer") | {_quoted(QK_NORMS)}\n'
        f"    ``pos_encoding``: {_quoted(POS_ENCODINGS)}\n"
        f"    ``attention_impl``: {_quoted(ATTENTION_IMPLS)}\n"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionOptions:
    """What one attention layer computes, apart from its shapes. Frozen; derive variants with ``.replace``.

    Checked at construction (one ``ValueError`` naming the field); the checks
    that need the head size D (rope needs an even D, a rule scale resolves
    with D) are :meth:`check`, which every shell calls with its D. Hashed and
    compared by value, except an array scale: by identity (the options are
    part of static jit arguments, and an array, possibly traced, has no hash).
    Attention-weight dropout is not an option here: it is training noise,
    set on the layer (``dropout_rate``) from ``ModelConfig.dropout``.

    Choices:
    {choices}"""

    # What multiplies q·kᵀ: a rule of D ("sqrt" 1/sqrt(D), Vaswani et al.; "none" 1; "mup"
    # 1/D, Yang et al.), a positive number, or an array (a learnable temperature, one scale
    # per vmapped model); see attention.resolve_scale.
    scale: ScaleLike = "sqrt"
    # Combine the lower-triangular mask, aligned so the last query sees the last key
    # (False: an encoder, or cross-attention).
    causal: bool = True
    # A norm on q and k (over D) before q·kᵀ: bounds the logits whatever the projections grow
    # to. "layer" (or True): LayerNorm (Dehghani et al. 2023; Wortsman et al. 2023); "rms":
    # RMSNorm, no centring (modded-nanogpt, with a fixed scale 0.12); False: none. Stored as
    # False, "layer" or "rms". Adds the query_norm and key_norm modules.
    qk_norm: bool | str = False
    # Whether those norms learn a per-channel gain (and LayerNorm its offset); False: a
    # parameter-free norm (modded-nanogpt's rms_norm). Only read when qk_norm is on.
    qk_norm_gain: bool = True
    # Positions: "rope" (rotating q and k) and "alibi" (a per-head bias -m·(t - s) on the
    # logits, Press et al. 2022, the paper's slopes: positions.alibi_slopes) act inside
    # attention; "learned" and "sinusoidal" are tables added to the embeddings by the model
    # (AddPositions).
    pos_encoding: str = "none"
    # The backend (attention.attend): "dense" (hand-written; the only one that records the
    # weights and drops them out), "xla" / "cudnn" (jax.nn.dot_product_attention; cudnn on
    # GPU), "blockwise" (flash-style in pure JAX, causal self-attention, O(T) memory), "splash"
    # (the TPU's Pallas kernel, self-attention; interpreted off TPU, for tests).
    attention_impl: str = "dense"
    # Soft-capping (Gemma 2; modded-nanogpt): the scaled logits become softcap·tanh(logits/softcap),
    # bounded by ±softcap, before the mask and bias; None: no cap. "dense", "blockwise", "splash":
    # jax.nn.dot_product_attention ("xla", "cudnn") exposes no logits to cap.
    softcap: float | None = None
    # Sliding-window (local) attention (Longformer; Mistral; Gemma 2): each query sees at most
    # the last `window` keys, itself included; None: all of the past. Needs causal. A tuple is
    # one window per layer, cycled over a model's layers ((256, None): every other layer
    # global), for a ModelConfig only; a layer takes one number. A decoding layer keeps at
    # most `window` keys (attention.ring_attend).
    window: int | tuple[int | None, ...] | None = None
    # Attention sinks (gpt-oss; Xiao et al. 2024's sink token, learned): one logit per head, a
    # parameter "sinks" (H,) initialized at 0, that takes its share of each row's softmax and
    # gives nothing to the values, so a head can attend "nowhere". Every backend.
    sinks: bool = False
    # Scalable-Softmax (Nakanishi 2025, arXiv 2501.19399): the logits of a query that may see n
    # keys times logn_scale·log(n), so the softmax does not flatten as n grows; None: off. With
    # logn_learned the number is a per-head parameter "logn_scale" (H,) that starts there.
    # Acts on q: every backend.
    logn_scale: float | None = None
    logn_learned: bool = False

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # (frozen)
        try:
            attention.resolve_scale(self.scale, 1)  # whether a scale is valid does not depend on D
        except ValueError as e:
            raise OptionError("scale", f": {e}") from None
        if isinstance(self.scale, numbers.Real) and not isinstance(self.scale, (bool, np.bool_)):
            set_("scale", float(self.scale))  # numpy scalars too: hashed by value
        for name in ("causal", "qk_norm_gain", "sinks", "logn_learned"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise OptionError(name, f" must be True or False, got {getattr(self, name)!r}")
            set_(name, bool(getattr(self, name)))
        if isinstance(self.qk_norm, (bool, np.bool_)):
            set_("qk_norm", "layer" if self.qk_norm else False)
        elif not isinstance(self.qk_norm, str) or self.qk_norm not in QK_NORMS:
            raise OptionError("qk_norm", f": unknown {self.qk_norm!r}, valid choices are False, True, {QK_NORMS}")
        for name, choices in (("pos_encoding", POS_ENCODINGS), ("attention_impl", ATTENTION_IMPLS)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise OptionError(name, f": unknown {value!r}, valid choices are {choices}")
        if self.attention_impl == "splash" and self.pos_encoding == "alibi":
            raise OptionError(
                "pos_encoding", ": 'alibi' is a bias, and attention_impl 'splash' takes none; use 'dense', 'xla' "
                "or 'blockwise'"
            )  # fmt: skip
        if self.softcap is not None:
            set_("softcap", _positive_number("softcap", self.softcap))
            if self.attention_impl in ("xla", "cudnn"):
                raise OptionError(
                    "softcap",
                    f": attention_impl {self.attention_impl!r} cannot soft-cap (jax.nn.dot_product_attention "
                    "exposes no logits); use 'dense' or 'blockwise'",
                )

        if self.window is not None:
            windows = tuple(self.window) if isinstance(self.window, (tuple, list)) else (self.window,)
            try:
                windows = tuple(None if w is None else attention.as_int("window", w) for w in windows)
            except ValueError:
                raise OptionError(
                    "window", f" must be a positive integer, None, or a tuple of them (one per layer), "
                    f"got {self.window!r}"
                ) from None  # fmt: skip
            if not windows:
                raise OptionError("window", " must not be an empty tuple (None: no window)")
            set_("window", windows if isinstance(self.window, (tuple, list)) else windows[0])
            if not self.causal:
                raise OptionError("window", ": a sliding window needs causal=True")
        if self.logn_scale is not None:
            set_("logn_scale", _positive_number("logn_scale", self.logn_scale))
        elif self.logn_learned:
            raise OptionError("logn_learned", ": a learned log-n scale needs logn_scale, its starting value")

    def layer(self, index: int) -> AttentionOptions:
        """The options of layer ``index`` of a model: a per-layer ``window`` tuple resolved (cycled)."""
        if isinstance(self.window, tuple):
            return self.replace(window=self.window[index % len(self.window)])
        return self

    def check(self, head_size: int) -> None:
        """The checks that need the head size D: a positive integer, even for rope."""
        try:
            attention.as_int("head_size", head_size)
        except ValueError as e:
            raise OptionError("head_size", str(e).removeprefix("head_size")) from None
        if self.pos_encoding == "rope" and head_size % 2:
            raise OptionError("head_size", f" must be even for rope, got {head_size}")
        if isinstance(self.window, tuple):
            raise OptionError(
                "window", f"={self.window!r}: one window per layer is for a ModelConfig; a layer takes one number "
                "or None (AttentionOptions.layer(i) picks layer i's)"
            )  # fmt: skip

    def attention_kwargs(
        self, head_size: int, num_heads: int | None = None, params: dict | None = None
    ) -> dict[str, Any]:
        """What ``attention.attention_heads`` takes from these options, the scale resolved for D.

        ``num_heads`` sizes ALiBi's slopes, (H,) for q (..., H, T, D); None: a single head
        (``Head``, q (..., T, D)), whose slope is a scalar (the first of one head's). ``params``
        holds the layer's learned ``sinks`` and ``logn_scale`` (``option_params``), where these
        options have them.
        """
        params = params or {}
        slopes = None
        if self.pos_encoding == "alibi":
            slopes = alibi_slopes(num_heads) if num_heads else alibi_slopes(1)[0]
        return dict(
            scale=attention.resolve_scale(self.scale, head_size),
            causal=self.causal,
            impl=self.attention_impl,
            rope=self.pos_encoding == "rope",
            softcap=self.softcap,
            window=self.window,
            alibi=slopes,
            sinks=params.get("sinks"),
            logn=params.get("logn_scale", self.logn_scale),
        )

    def option_params(self, num_heads: int | None) -> dict[str, tuple[tuple[int, ...], float]]:
        """The parameters these options add to a layer of ``num_heads`` heads: name -> (shape, initial value).

        One per head, (H,); a single ``Head`` (``num_heads=None``) has scalars.
        """
        shape = () if num_heads is None else (num_heads,)
        params = {}
        if self.sinks:
            params["sinks"] = (shape, 0.0)
        if self.logn_learned:
            params["logn_scale"] = (shape, self.logn_scale)
        return params

    def replace(self, **changes: Any) -> AttentionOptions:
        """A checked copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The options' names, in field order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def _key(self) -> tuple:
        values = (getattr(self, name) for name in self.names())  # not astuple: it copies arrays
        plain = lambda v: isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v))
        return tuple(v if plain(v) else ("id", id(v)) for v in values)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


if AttentionOptions.__doc__:  # None under python -OO
    AttentionOptions.__doc__ = AttentionOptions.__doc__.format(choices=choices_doc().lstrip())

# The options that the Linen and NNX shells also take as keyword arguments (``scale=...``),
# as they did before AttentionOptions; a newer option is given through ``options=`` only.
KEYWORDS = ("scale", "causal", "qk_norm", "pos_encoding", "attention_impl")


def from_keywords(where: str, options: AttentionOptions | None, head_size: int, **keywords: Any) -> AttentionOptions:
    """The options of a shell named ``where``: ``options`` (default ``AttentionOptions()``) and ``keywords``.

    ``keywords`` are the ``KEYWORDS`` a shell was given (None: not given). With
    ``options`` given too they must agree with it. Checked with the head size;
    errors name ``where`` (``MultiHeadAttention.pos_encoding: ...``).
    """
    given = {name: value for name, value in keywords.items() if value is not None}
    try:
        if options is None:
            options = AttentionOptions(**given)
        elif not isinstance(options, AttentionOptions):
            raise OptionError("options", f" must be an AttentionOptions, got {type(options).__name__}")
        for name, value in given.items():
            ours, stored = getattr(options, name), getattr(options.replace(**{name: value}), name)  # True: "layer"
            if not (stored is ours or (not _is_array(stored) and not _is_array(ours) and stored == ours)):
                raise OptionError(name, f"={value!r} contradicts options.{name}={ours!r}; give one of them")
        options.check(head_size)
    except OptionError as e:
        raise e.named(where) from None
    return options
