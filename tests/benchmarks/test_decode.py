"""python -m benchmarks.decode and benchmarks.attention_layers: both sides measured in one run, on tiny settings."""

from __future__ import annotations

import pytest

from attention_jax.model import ModelConfig
from benchmarks import attention_layers, decode


@pytest.mark.slow
def test_decode_benchmark_times_both_paths_and_checks_they_agree(capsys):
    rows = decode.main(
        ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "16", "--new_tokens", "8"]
        + ["--batch", "1", "2", "--repeats", "1"]
    )
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["full_tokens_per_s"] > 0 and r["cached_tokens_per_s"] > 0
        assert r["speedup"] == pytest.approx(r["cached_tokens_per_s"] / r["full_tokens_per_s"])
        assert r["cached_gflop"] < r["full_gflop"]
    out = capsys.readouterr().out
    assert "full window tok/s" in out and "cached tok/s" in out and "load average" in out


@pytest.mark.slow
def test_decode_benchmark_times_both_cache_layouts_and_checks_their_tokens(capsys):
    rows = decode.main(
        ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "16", "--new_tokens", "8"]
        + ["--batch", "1", "2", "--repeats", "1", "--layouts"]
    )
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["batch_first_tokens_per_s"] / r["flat_tokens_per_s"])
    assert "batch first tok/s" in capsys.readouterr().out


def test_decode_flops_count_what_each_path_feeds():
    cfg = ModelConfig(vocab_size=65, block_size=256, n_embd=128, n_head=4, n_layer=4)
    full = decode.forward_flops(cfg, 1, 1, 256, cached=False)
    cached = decode.forward_flops(cfg, 1, 1, 256, cached=True)
    assert full / cached == pytest.approx(256, rel=1e-9)  # the full window feeds 256 tokens per new token
    assert decode.forward_flops(cfg, 8, 1, 256, cached=True) == pytest.approx(8 * cached)


@pytest.mark.slow
def test_attention_layers_benchmark_times_every_side():
    result = attention_layers.main(
        ["--B", "2", "--T", "16", "--C", "16", "--H", "2", "--cache", "8", "--steps", "4", "--batch", "2"]
        + ["--repeats", "1"]
    )
    assert len(result["train_ms"]) == 8 and all(ms > 0 for ms in result["train_ms"].values())
    for batch in ("1", "2"):
        assert set(result["decode_us_per_step"][batch]) == {
            "attention_jax MultiHeadAttention",
            "flax.linen.MultiHeadDotProductAttention",
            "flax.nnx.MultiHeadAttention",
        }
