"""Character-level data: a tokenizer, text loading, the train/val split, batches.

``get_batch`` is a pure function of a PRNG key, so the batch at a training
step can be a function of (seed, step) alone, which is what makes resumed
runs see exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_BYTES = 1_115_394
TINYSHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
DATA_DIR_ENV = "ATTENTION_JAX_DATA_DIR"
NAMED_DATASETS = ("tinyshakespeare",)


class CharTokenizer:
    """Maps each distinct character of a text to an integer, in sorted order."""

    def __init__(self, chars: str | list[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer needs at least one character")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer characters must be distinct")
        self.chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """str -> int32 array (len(text),). Unknown characters raise ValueError."""
        try:
            return np.fromiter((self._stoi[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in the tokenizer's vocabulary of {self.vocab_size}"
            ) from None

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        return "".join(self.chars[i] for i in ids.tolist())

    def save(self, path: str | os.PathLike) -> None:
        """Write ``{"chars": [...]}`` as JSON, atomically (a temporary file, then a rename)."""
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"chars": self.chars}, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            chars = payload["chars"]
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file not found: {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a tokenizer file ({e})") from None
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError(f"{path} is not a tokenizer file: 'chars' must be a list of characters")
        return cls(chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _read_utf8(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(
            f"data file not found: {path} (give the path of a UTF-8 text file, "
            f"or {' or '.join(repr(n) for n in NAMED_DATASETS)} to read or download a named dataset)"
        )
    if path.is_dir():
        raise IsADirectoryError(f"data path is a directory, not a text file: {path}")
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"data file is empty: {path}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file is not valid UTF-8: {path} (invalid byte at offset {e.start})") from None


def _cache_dir() -> Path:
    return Path.home() / ".cache" / "attention_jax"


def tinyshakespeare_path(download: bool = True) -> Path:
    """Where tiny shakespeare lives: $ATTENTION_JAX_DATA_DIR, else the cache, else downloaded.

    The variable names the folder that holds ``tinyshakespeare.txt``, or the file
    itself. Set to anything else, it is an error that names it (rather than a
    silent fall-back to the cache or the network).
    """
    cached = _cache_dir() / "tinyshakespeare.txt"
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        given = Path(env).expanduser()
        if given.is_file():
            return given
        if (given / "tinyshakespeare.txt").is_file():
            return given / "tinyshakespeare.txt"
        what = "a folder without tinyshakespeare.txt" if given.is_dir() else "no such file or folder"
        raise FileNotFoundError(
            f"tinyshakespeare.txt not found: {DATA_DIR_ENV}={env} is {what}; set it to the folder that holds "
            f"the file or to the file itself, or unset it to use {cached} (downloaded there when missing)"
        )
    if cached.is_file():
        return cached
    if not download:
        raise FileNotFoundError(_offline_help(cached))
    return _download_tinyshakespeare(cached)


def _offline_help(cached: Path) -> str:
    return (
        f"tinyshakespeare.txt not found and could not be downloaded. Put the file "
        f"({TINYSHAKESPEARE_BYTES} bytes, md5 {TINYSHAKESPEARE_MD5}, from {TINYSHAKESPEARE_URL}) "
        f"at {cached}, or in a folder named by ${DATA_DIR_ENV}"
    )


def _download_tinyshakespeare(dest: Path) -> Path:
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=30) as response:
            raw = response.read()
    except OSError as e:
        raise FileNotFoundError(f"{_offline_help(dest)} (download failed: {e})") from None
    md5 = hashlib.md5(raw).hexdigest()
    if len(raw) != TINYSHAKESPEARE_BYTES or md5 != TINYSHAKESPEARE_MD5:
        raise ValueError(
            f"downloaded tinyshakespeare has {len(raw)} bytes and md5 {md5}; expected "
            f"{TINYSHAKESPEARE_BYTES} bytes and md5 {TINYSHAKESPEARE_MD5}. Nothing was saved."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(raw)
    tmp.replace(dest)  # atomic: a crash never leaves a truncated cache file
    return dest


def load_text(path_or_name: str | os.PathLike) -> str:
    """Read a UTF-8 text file, or a named dataset (``"tinyshakespeare"``)."""
    if str(path_or_name) in NAMED_DATASETS:
        return _read_utf8(tinyshakespeare_path())
    return _read_utf8(Path(path_or_name).expanduser())


def split(data, train_fraction: float = 0.9):
    """First ``train_fraction`` of the tokens for training, the rest for validation."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    n = int(train_fraction * len(data))
    return data[:n], data[n:]


def get_batch(key: Array, data: Array, batch_size: int, block_size: int) -> tuple[Array, Array]:
    """Random crops of ``data`` (N,): inputs x (B, T) and next-token targets y (B, T).

    Pure and jit-able (batch_size and block_size static); the same key gives
    the same batch.
    """
    if data.shape[0] <= block_size:
        raise ValueError(f"data has {data.shape[0]} tokens; get_batch needs more than block_size={block_size}")
    starts = jax.random.randint(key, (batch_size,), 0, data.shape[0] - block_size)  # (B,)
    crop = lambda s: jax.lax.dynamic_slice_in_dim(data, s, block_size + 1)
    chunks = jax.vmap(crop)(starts)  # (B, T + 1)
    return chunks[:, :-1], chunks[:, 1:]


def prepare(text: str, train_fraction: float = 0.9):
    """Tokenizer plus int32 train and val arrays of a text."""
    tokenizer = CharTokenizer.from_text(text)
    ids = jnp.asarray(tokenizer.encode(text))
    train, val = split(ids, train_fraction)
    return tokenizer, train, val
