"""CLI plumbing: every failure is one line with its exit status; argparse errors too."""

from __future__ import annotations

import pytest

from attention_jax.lab import cli
from attention_jax.lab.config import ConfigError
from attention_jax.lab.loop import TrainingDiverged


def command(exc):
    @cli.main_wrapper
    def main(argv=None):
        """A command that fails."""
        raise exc

    return main


@pytest.mark.parametrize(
    "exc, code, text",
    [
        (ConfigError("model.n_head=3: bad"), cli.EXIT_BAD_INPUT, "error: model.n_head=3: bad"),
        (FileNotFoundError("data file not found: x"), cli.EXIT_BAD_INPUT, "error: data file not found: x"),
        (ValueError("--steps must be >= 1"), cli.EXIT_BAD_INPUT, "error: --steps must be >= 1"),
        (TrainingDiverged("loss became NaN/Inf at step 3"), cli.EXIT_DIVERGED, "error: loss became NaN/Inf at step 3"),
        (RuntimeError("boom"), 1, "error: RuntimeError: boom (set ATTENTION_JAX_DEBUG=1 for the traceback)"),
        (KeyboardInterrupt(), 130, "interrupted; rerun the same command to resume"),
    ],
)
def test_failures_are_one_line_with_their_exit_status(exc, code, text, capsys, monkeypatch):
    monkeypatch.setenv("ATTENTION_JAX_CACHE_DIR", "off")
    monkeypatch.delenv("ATTENTION_JAX_DEBUG", raising=False)
    assert command(exc)([]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(text)


def test_debug_shows_the_traceback_instead(monkeypatch):
    monkeypatch.setenv("ATTENTION_JAX_CACHE_DIR", "off")
    monkeypatch.setenv("ATTENTION_JAX_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        command(RuntimeError("boom"))([])


def test_usage_errors_are_one_line_exit_2(capsys):
    parser = cli.ArgumentParser(prog="attention-jax-x")
    parser.add_argument("--steps", type=int)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--steps", "many"])
    assert info.value.code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid int value: 'many'" in err[0] and "attention-jax-x --help" in err[0]


def test_wrapped_commands_keep_their_name_and_help():
    from attention_jax.lab import commands

    assert commands.train.__name__ == "train" and "Train a model" in commands.train.__doc__
