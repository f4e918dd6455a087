"""Char-level data: tokenizer, load_text (paths, the named dataset, its download), split, get_batch.

Nothing here reads the network: downloads are faked by patching urlopen, and
$HOME and $ATTENTION_JAX_DATA_DIR point into tmp_path so the real cache is
never read or written.
"""

from __future__ import annotations

import hashlib
import io
import json
import urllib.request
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import data
from attention_jax.data import CharTokenizer, get_batch, load_text, prepare, split

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak. — café ☃\n"


# --- CharTokenizer ------------------------------------------------------------


def test_tokenizer_vocabulary_is_the_sorted_characters():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.chars == sorted(set(TEXT))
    assert tok.vocab_size == len(set(TEXT))
    ids = tok.encode("aA\n")
    assert ids.dtype == np.int32
    assert list(ids) == [tok.chars.index("a"), tok.chars.index("A"), tok.chars.index("\n")]
    assert tok.encode("\n")[0] == 0  # "\n" sorts first in this text


def test_tokenizer_round_trips():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.decode(jnp.asarray(tok.encode("speak ☃"))) == "speak ☃"  # accepts jax arrays
    assert tok.encode("").shape == (0,) and tok.decode([]) == ""


def test_tokenizer_unknown_character_is_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")


def test_tokenizer_decode_out_of_range():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        tok.decode([0, 3])


def test_tokenizer_save_load_json(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"chars": tok.chars}  # plain, readable JSON
    loaded = CharTokenizer.load(path)
    assert loaded == tok
    np.testing.assert_array_equal(loaded.encode(TEXT), tok.encode(TEXT))


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CharTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        CharTokenizer.load(bad)
    bad.write_text(json.dumps({"chars": ["ab", "c"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="chars"):
        CharTokenizer.load(bad)


def test_tokenizer_rejects_empty_and_duplicate_vocabularies():
    with pytest.raises(ValueError):
        CharTokenizer([])
    with pytest.raises(ValueError, match="distinct"):
        CharTokenizer(["a", "a"])


# --- load_text from a path --------------------------------------------------------


def test_load_text_reads_utf8(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    assert load_text(path) == TEXT
    assert load_text(str(path)) == TEXT


def test_load_text_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt") as info:
        load_text(path)
    assert str(path) in str(info.value)


def test_load_text_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_text(path)


def test_load_text_invalid_utf8_names_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"abc\xffdef")
    with pytest.raises(ValueError, match=r"offset 3\b"):
        load_text(path)


# --- load_text("tinyshakespeare") ---------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty fake $HOME (so the real ~/.cache is never used) and no $ATTENTION_JAX_DATA_DIR."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    return home


def cache_file(home: Path) -> Path:
    return home / ".cache" / "attention_jax" / "tinyshakespeare.txt"


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fake_urlopen(payload: bytes, calls: list):
    def urlopen(url, *args, **kwargs):
        calls.append(url)
        return FakeResponse(payload)

    return urlopen


def test_named_dataset_resolves_via_env_dir(home, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "tinyshakespeare.txt").write_text("To be, or not to be", encoding="utf-8")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(data_dir))
    assert load_text("tinyshakespeare") == "To be, or not to be"  # no download (urlopen refuses)


def test_named_dataset_uses_the_cache(home):
    cache_file(home).parent.mkdir(parents=True)
    cache_file(home).write_text("cached copy", encoding="utf-8")
    assert load_text("tinyshakespeare") == "cached copy"


def test_named_dataset_offline_says_how_to_provide_the_file(home, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as info:
        load_text("tinyshakespeare")
    msg = str(info.value)
    for needed in (
        data.DATA_DIR_ENV,
        str(cache_file(home)),
        data.TINYSHAKESPEARE_URL,
        data.TINYSHAKESPEARE_MD5,
    ):
        assert needed in msg, msg
    assert not cache_file(home).parent.exists()


@pytest.mark.parametrize("payload", [b"not shakespeare", b"x" * data.TINYSHAKESPEARE_BYTES])
def test_download_with_wrong_checksum_saves_nothing(home, monkeypatch, payload):
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(payload, calls))
    with pytest.raises(ValueError, match="md5") as info:
        load_text("tinyshakespeare")
    assert calls == [data.TINYSHAKESPEARE_URL]
    assert data.TINYSHAKESPEARE_MD5 in str(info.value)
    cache = cache_file(home).parent
    assert not cache.exists() or not any(cache.iterdir())  # no file, no partial file


def test_verified_download_is_cached_and_fetched_once(home, monkeypatch):
    payload = b"ROMEO:\nBut soft!\n"
    # Pretend this payload is the canonical file, so the success path can run offline.
    monkeypatch.setattr(data, "TINYSHAKESPEARE_BYTES", len(payload))
    monkeypatch.setattr(data, "TINYSHAKESPEARE_MD5", hashlib.md5(payload).hexdigest())
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(payload, calls))
    assert load_text("tinyshakespeare") == payload.decode()
    assert cache_file(home).read_bytes() == payload
    assert load_text("tinyshakespeare") == payload.decode()
    assert len(calls) == 1  # the second load came from the cache
    assert sorted(p.name for p in cache_file(home).parent.iterdir()) == ["tinyshakespeare.txt"]


# --- split and get_batch ----------------------------------------------------------------


def test_split_is_90_10_and_contiguous():
    ids = np.arange(1000)
    train, val = split(ids)
    assert len(train) == 900 and len(val) == 100
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)
    with pytest.raises(ValueError, match="train_fraction"):
        split(ids, 1.0)


def test_prepare_builds_tokenizer_and_splits():
    tok, train, val = prepare(TEXT * 10)
    assert tok == CharTokenizer.from_text(TEXT)
    assert train.dtype == jnp.int32 and len(train) + len(val) == len(TEXT) * 10
    assert tok.decode(np.concatenate([np.asarray(train), np.asarray(val)])) == TEXT * 10


N_DATA, BS, BLK = 20, 64, 8
DATA = jnp.arange(N_DATA, dtype=jnp.int32)  # token value == its position: crops are easy to read


def test_get_batch_targets_are_inputs_shifted_by_one():
    x, y = get_batch(jax.random.key(0), DATA, BS, BLK)
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape == (BS, BLK) and x.dtype == np.int32
    starts = x[:, 0]
    np.testing.assert_array_equal(x, starts[:, None] + np.arange(BLK))  # contiguous crops of the data
    np.testing.assert_array_equal(y, x + 1)  # next-token targets


def test_get_batch_is_deterministic_for_a_key_and_jittable():
    a = get_batch(jax.random.key(3), DATA, BS, BLK)
    b = get_batch(jax.random.key(3), DATA, BS, BLK)
    c = get_batch(jax.random.key(4), DATA, BS, BLK)
    jitted = jax.jit(get_batch, static_argnums=(2, 3))(jax.random.key(3), DATA, BS, BLK)
    for u, v, w in zip(a, b, jitted):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
        np.testing.assert_array_equal(np.asarray(u), np.asarray(w))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_get_batch_crops_stay_in_bounds_and_cover_every_start():
    x, y = get_batch(jax.random.key(0), DATA, 2000, BLK)
    starts = set(np.asarray(x[:, 0]).tolist())
    # Every crop whose target fits is reachable, including the one ending on the last token; none beyond.
    assert starts == set(range(N_DATA - BLK))
    assert int(y.max()) == N_DATA - 1


def test_load_text_expands_the_home_directory(home):
    (home / "notes.txt").write_text("hello", encoding="utf-8")
    assert load_text("~/notes.txt") == "hello"
