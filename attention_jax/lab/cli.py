"""Plumbing of the command-line entry points: one clear line per error, exit codes, process set-up.

A user never sees a raw traceback for bad input: configuration and data
errors print ``error: ...`` and exit 2; a diverged run exits 3; anything
unexpected prints one line too and exits 1. Set ATTENTION_JAX_DEBUG=1 to get
the full traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from attention_jax.lab.config import ConfigError, env_flag

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def enable_compilation_cache() -> None:
    """Persist compiled XLA programs across runs (cuts start-up of repeated runs).

    The cache lives in $ATTENTION_JAX_CACHE_DIR, else ~/.cache/attention_jax/xla;
    ATTENTION_JAX_CACHE_DIR=off disables it.
    """
    import os
    from pathlib import Path

    import jax

    where = os.environ.get("ATTENTION_JAX_CACHE_DIR", str(Path.home() / ".cache" / "attention_jax" / "xla"))
    if where.lower() in ("off", "0", "none", ""):
        return
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def keep_freed_host_memory() -> None:
    """Stop glibc from handing large freed blocks back to the OS (CPU speed; costs RSS).

    XLA:CPU allocates each call's scratch buffer afresh (about 52 MB for the
    ``shakespeare_char:cpu`` train step). glibc serves blocks over 32 MB with
    mmap and unmaps them on free, so every call page-faults its whole scratch
    in again: measured 52.9 -> 40.7 ms per step at steps_per_call=1 on 2 cores
    (benchmarks/train_step.md). Keeping freed memory in the heap removes that;
    the process keeps its peak memory instead. ATTENTION_JAX_MALLOC=default
    leaves glibc alone; a no-op where the C library is not glibc.
    """
    import ctypes
    import ctypes.util
    import os

    if os.environ.get("ATTENTION_JAX_MALLOC", "").lower() == "default":
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
    mallopt(M_MMAP_MAX, 0)  # never mmap: large blocks come from the heap and are reused
    mallopt(M_TRIM_THRESHOLD, 2**30)  # and are not trimmed back to the OS below 1 GiB of free top


def main_wrapper(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        from attention_jax.lab.loop import TrainingDiverged

        enable_compilation_cache()
        keep_freed_host_memory()
        if env_flag("ATTENTION_JAX_DEBUG"):
            return main(argv) or 0
        try:
            return main(argv) or 0
        except (ConfigError, OSError, ValueError) as e:  # bad input: missing, unreadable or clashing paths
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except TrainingDiverged as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_DIVERGED
        except KeyboardInterrupt:
            print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - last resort: one line, not a traceback
            print(f"error: {type(e).__name__}: {e} (set ATTENTION_JAX_DEBUG=1 for the traceback)", file=sys.stderr)
            return 1

    return wrapped
