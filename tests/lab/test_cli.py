"""CLI plumbing: every failure is one line with its exit status; argparse errors too."""

from __future__ import annotations

import errno

import pytest

from attention_jax.lab import cli
from attention_jax.lab.config import ConfigError
from attention_jax.lab.loop import TrainingDiverged
from attention_jax.lab.rundir import DamagedFile, StorageFault, WorkdirBusy


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
        (KeyboardInterrupt(), 130, "interrupted"),
        # System faults: exit 4, the file and the cause; from orbax/tensorstore too, which only quote the OS.
        (
            StorageFault(errno.ENOSPC, "/w/checkpoints/10", "the last good checkpoint is step 5"),
            cli.EXIT_SYSTEM,
            "error: /w/checkpoints/10: no space left on device; free some space, then rerun the same command. The last "
            "good checkpoint is step 5.",
        ),
        (OSError(errno.EROFS, "Read-only file system", "/w/x"), cli.EXIT_SYSTEM, "error: /w/x: read-only file system"),
        (PermissionError(errno.EACCES, "Permission denied", "/w/y"), cli.EXIT_SYSTEM, "error: /w/y: permission denied"),
        (
            ValueError("DATA_LOSS: writing /w/ck: No space left on device [OS error]"),
            cli.EXIT_SYSTEM,
            "error: no space left on device (ValueError)",
        ),
        (RuntimeError("tensorstore: Input/output error"), cli.EXIT_SYSTEM, "error: input/output error (RuntimeError)"),
        # Not system faults: a missing input file is bad input; a damaged run or a busy workdir too.
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/in/Data.txt"),
            cli.EXIT_BAD_INPUT,
            "error: /in/Data.txt: no such file or directory",
        ),
        (DamagedFile("/w/config.json is damaged: not valid JSON"), cli.EXIT_BAD_INPUT, "error: /w/config.json is dam"),
        (WorkdirBusy("workdir /w is in use by a trainer (pid 1"), cli.EXIT_BAD_INPUT, "error: workdir /w is in use"),
    ],
)
def test_failures_are_one_line_with_their_exit_status(exc, code, text, capsys, monkeypatch):
    monkeypatch.setenv("ATTENTION_JAX_CACHE_DIR", "off")
    monkeypatch.delenv("ATTENTION_JAX_DEBUG", raising=False)
    assert command(exc)([]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(text)


def test_ctrl_c_in_a_resumable_command_says_how_to_resume(capsys, monkeypatch):
    """Train and sweep resume from a checkpoint; the others (sampling, a report) only stop, and say only that."""
    monkeypatch.setenv("ATTENTION_JAX_CACHE_DIR", "off")
    monkeypatch.delenv("ATTENTION_JAX_DEBUG", raising=False)

    @cli.main_wrapper(interrupted=cli.INTERRUPTED_RESUMABLE)
    def main(argv=None):
        raise KeyboardInterrupt

    assert main([]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().splitlines() == [cli.INTERRUPTED_RESUMABLE]


def test_ctrl_c_caught_inside_c_code_is_still_an_interrupt(capsys, monkeypatch):
    """A KeyboardInterrupt that lands inside a C extension can surface as a SystemError with it as context."""
    monkeypatch.setenv("ATTENTION_JAX_CACHE_DIR", "off")
    monkeypatch.delenv("ATTENTION_JAX_DEBUG", raising=False)

    @cli.main_wrapper
    def main(argv=None):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemError("<built-in function> returned a result with an exception set") from None

    assert main([]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted"]


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


def test_the_cache_threshold_comes_from_the_environment(monkeypatch, tmp_path, capsys):
    import jax

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    monkeypatch.setenv("ATTENTION_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ATTENTION_JAX_DEBUG", raising=False)
    try:
        for value, seconds in (("2.5", 2.5), ("0", 0.0)):
            monkeypatch.setenv("ATTENTION_JAX_CACHE_MIN_COMPILE_S", value)
            cli.enable_compilation_cache()
            assert jax.config.jax_persistent_cache_min_compile_time_secs == seconds
        monkeypatch.delenv("ATTENTION_JAX_CACHE_MIN_COMPILE_S")
        cli.enable_compilation_cache()
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.5  # the default
        for bad in ("soon", "-1", "nan"):
            monkeypatch.setenv("ATTENTION_JAX_CACHE_MIN_COMPILE_S", bad)
            with pytest.raises(SystemExit) as exit_:
                command(RuntimeError("never reached"))([])
            assert exit_.value.code == cli.EXIT_BAD_INPUT
            assert capsys.readouterr().err.strip().splitlines() == [
                f"error: ATTENTION_JAX_CACHE_MIN_COMPILE_S={bad!r}: expected a number of seconds >= 0"
            ]
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
