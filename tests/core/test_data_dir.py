"""$ATTENTION_JAX_DATA_DIR: the folder of tinyshakespeare.txt or the file itself; anything else is named."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from attention_jax import data
from attention_jax.data import load_text, tinyshakespeare_path


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty fake $HOME, a cached copy that must not be used, and no network."""
    home = tmp_path / "home"
    cached = home / ".cache" / "attention_jax" / "tinyshakespeare.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("the cached copy", encoding="utf-8")
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))

    def no_download(*args, **kwargs):
        raise AssertionError("no download when $ATTENTION_JAX_DATA_DIR is set")

    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    return home


def test_the_variable_may_name_the_file_itself(home, tmp_path, monkeypatch):
    file = tmp_path / "input.txt"  # the name the file has at its URL
    file.write_text("First Citizen:", encoding="utf-8")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(file))
    assert tinyshakespeare_path() == file
    assert load_text("tinyshakespeare") == "First Citizen:"


def test_the_variable_may_name_its_folder(home, tmp_path, monkeypatch):
    (tmp_path / "tinyshakespeare.txt").write_text("To be", encoding="utf-8")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert load_text("tinyshakespeare") == "To be"


@pytest.mark.parametrize("where, what", [("empty", "a folder without tinyshakespeare.txt"),
                                         ("missing", "no such file or folder")])  # fmt: skip
def test_a_variable_that_finds_nothing_is_an_error_that_names_it(where, what, home, tmp_path, monkeypatch):
    given = tmp_path / where
    if where == "empty":
        given.mkdir()
        (given / "input.txt").write_text("other name", encoding="utf-8")  # in a folder: only its own name counts
    monkeypatch.setenv(data.DATA_DIR_ENV, str(given))
    with pytest.raises(FileNotFoundError) as info:
        load_text("tinyshakespeare")
    msg = str(info.value)
    assert "\n" not in msg and f"{data.DATA_DIR_ENV}={given} is {what}" in msg
    assert str(home / ".cache" / "attention_jax" / "tinyshakespeare.txt") in msg  # what unsetting it would use


def test_unset_or_empty_the_cache_is_used(home, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert load_text("tinyshakespeare") == "the cached copy"
    monkeypatch.setenv(data.DATA_DIR_ENV, "")
    assert load_text("tinyshakespeare") == "the cached copy"
