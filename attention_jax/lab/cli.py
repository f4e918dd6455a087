"""Plumbing of the command-line entry points: one clear line per error, exit codes, process set-up.

A user never sees a raw traceback: every failure prints one ``error: ...``
line and exits with its code. Set ATTENTION_JAX_DEBUG=1 to get the full
traceback (and the libraries' log lines) instead.

    0    success
    1    an internal error (a bug: please report it with ATTENTION_JAX_DEBUG=1's traceback);
         for a sweep also: a point it ran failed or diverged (DIR/status.json says which and why)
    2    bad input: a flag, config, data file, or a workdir that cannot be used as it is
         (in use by another trainer, another dataset, a damaged file or checkpoint)
    3    training diverged: every seed's loss became NaN/Inf
    4    a system fault: the OS refused to read or write (disk full, quota, read-only file
         system, permission denied, I/O error, workdir deleted while in use)
    5    a multi-process run did not form: not every process joined within
         distributed.join_timeout_s (a wrong address or num_processes, a process not started)
    6    a multi-process run lost a process (killed, crashed, preempted); start every process
         again with the same command: training resumes from the last checkpoint
    7    a sweep left points to other runners: every point it could take ended well, but some
         were being trained elsewhere (their workdir's lock was held); --dry-run shows them
    130  interrupted (Ctrl-C); training saves a checkpoint first

The same table, for readers of the docs: docs/training.md ("Errors and exit statuses").
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator

from attention_jax.lab.config import ConfigError, env_flag

EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_SYSTEM = 4
EXIT_JOIN_FAILED = 5
EXIT_PROCESS_LOST = 6
EXIT_SWEEP_LEFT_TO_OTHERS = 7
EXIT_INTERRUPTED = 130

# Where --help of the commands that take --config sends the reader for the keys (train, sweep, ...).
OVERRIDES_EPILOG = (
    "Any config key can be set on the command line: --config.KEY=VALUE or --config.KEY VALUE, dotted "
    "for groups (--config.learning_rate=3e-4 --config.model.n_head=8). The keys, their defaults and what "
    "they mean: base_config() in attention_jax/lab/config.py ({path}); a config file may add its own. "
    "--config takes a config file (configs/shakespeare_char.py:cpu) or a shipped config's name "
    "(shakespeare_char:cpu; names: {names}); :ARG picks a variant. Exit status: 0 success, 1 a bug (or a "
    "sweep point failed), 2 bad input, 3 diverged, 4 the OS refused a read or write, 5 the processes of a "
    "multi-process run did not all join, 6 one was lost, 7 sweep points left to other runners, 130 Ctrl-C "
    "(python -m pydoc attention_jax.lab.cli says more)."
)


def overrides_epilog() -> str:
    """The ``--help`` epilog about ``--config`` and its ``--config.KEY=VALUE`` overrides."""
    from attention_jax.lab import config

    return OVERRIDES_EPILOG.format(path=config.__file__, names=", ".join(config.shipped_configs()))


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input."""

    def error(self, message):  # argparse API
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def enable_compilation_cache() -> None:
    """Persist compiled XLA programs across runs (cuts start-up of repeated runs).

    The cache lives in $ATTENTION_JAX_CACHE_DIR, else ~/.cache/attention_jax/xla;
    ATTENTION_JAX_CACHE_DIR=off disables it. Programs that compile in less than
    $ATTENTION_JAX_CACHE_MIN_COMPILE_S seconds (default 0.5) are not stored.
    """
    from pathlib import Path

    import jax

    where = os.environ.get("ATTENTION_JAX_CACHE_DIR", str(Path.home() / ".cache" / "attention_jax" / "xla"))
    if where.lower() in ("off", "0", "none", ""):
        return
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _min_compile_seconds())
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _min_compile_seconds() -> float:
    value = os.environ.get("ATTENTION_JAX_CACHE_MIN_COMPILE_S", "0.5")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # nan too
        print(f"error: ATTENTION_JAX_CACHE_MIN_COMPILE_S={value!r}: expected a number of seconds >= 0", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)
    return seconds


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


def quiet_libraries() -> None:
    """Keep the libraries' log lines (orbax's through absl, tensorboardX's) off the terminal.

    Orbax logs an error with a full traceback from its background threads for
    a failed write, before the same error reaches us; the command then reports
    it in one line. ATTENTION_JAX_DEBUG=1 leaves logging alone.
    """
    import logging

    from attention_jax.lab.rundir import without_closed_loop_noise

    for name in ("absl", "tensorboardX", "asyncio"):  # asyncio: orbax's failed reads of a damaged checkpoint
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.unraisablehook = without_closed_loop_noise(sys.unraisablehook)


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: its path and cause (``StorageFault`` says what to do as well)."""
    from attention_jax.lab.rundir import StorageFault

    if isinstance(e, StorageFault):
        return str(e)
    if not e.strerror:
        return str(e)  # a message of ours ("data file not found: ...")
    cause = e.strerror[0].lower() + e.strerror[1:]
    return f"{e.filename}: {cause}" if e.filename else cause


def system_fault(e: BaseException) -> OSError | None:
    """The OS refusal behind ``e`` (disk full, read-only, permission, I/O error), or None."""
    from attention_jax.lab.rundir import SYSTEM_ERRNOS, RunDirError, StorageFault, os_error_in

    if isinstance(e, StorageFault):
        return e
    if isinstance(e, (ConfigError, RunDirError)):
        return None  # about the input, whatever its text quotes
    err = os_error_in(e)  # also a library's error (orbax, tensorstore) that only quotes the OS in its text
    return err if err is not None and err.errno in SYSTEM_ERRNOS else None


def exit_code(e: BaseException) -> int:
    """The documented exit status of a failure (module docstring)."""
    from attention_jax.lab.loop import TrainingDiverged

    if isinstance(e, TrainingDiverged):
        return EXIT_DIVERGED
    if system_fault(e) is not None:
        return EXIT_SYSTEM
    if isinstance(e, (ConfigError, OSError, ValueError)):
        return EXIT_BAD_INPUT
    return EXIT_INTERNAL


def error_line(e: BaseException) -> str:
    """``error: ...``: one line naming the file and the cause where there is one."""
    err = system_fault(e)
    if err is not None:
        return f"error: {describe_os_error(err)}" + ("" if err is e else f" ({type(e).__name__})")
    if isinstance(e, OSError):
        return f"error: {describe_os_error(e)}"
    if exit_code(e) != EXIT_INTERNAL:
        return f"error: {e}"
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"error: {type(e).__name__}: {first} (set ATTENTION_JAX_DEBUG=1 for the traceback)"


INTERRUPTED = "interrupted"
INTERRUPTED_RESUMABLE = "interrupted; rerun the same command to resume from the last checkpoint"


def main_wrapper(main: Callable[[list[str] | None], int | None] | None = None, *, interrupted: str = INTERRUPTED):
    """Decorate a command: every failure becomes one line and its exit status (module docstring).

    ``interrupted`` is the line printed on Ctrl-C; commands that resume (train,
    sweep) say so, the others only that they stopped. Use bare or with the keyword.
    """
    if main is None:
        return functools.partial(main_wrapper, interrupted=interrupted)

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        enable_compilation_cache()
        keep_freed_host_memory()
        if env_flag("ATTENTION_JAX_DEBUG"):
            return main(argv) or 0
        quiet_libraries()
        try:
            return main(argv) or 0
        except KeyboardInterrupt:
            print(interrupted, file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as e:  # every failure: one line and its documented code
            if any(isinstance(x, KeyboardInterrupt) for x in (e.__cause__, e.__context__)):  # Ctrl-C inside C code
                print(interrupted, file=sys.stderr)
                return EXIT_INTERRUPTED
            print(error_line(e), file=sys.stderr)
            return exit_code(e)

    return wrapped


@contextlib.contextmanager
def exit_on_interrupt(message: str = "interrupted") -> Iterator[None]:
    """Ctrl-C ends the process at once, even inside a long compiled call, with one line and exit 130.

    For commands that write nothing (sampling): there is nothing to save, and
    Python's own KeyboardInterrupt would wait for the running XLA computation
    to finish. The signal's C handler writes to a socket that a watcher thread
    reads; XLA releases the GIL while it computes, so the thread runs.
    Main thread only; elsewhere it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    stop = threading.Event()

    def watch():
        receiver.recv(1)
        if not stop.is_set():
            print(message, file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)

    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: None)
    previous_fd = signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, previous_handler)
        sender.send(b"\0")  # release the watcher
        watcher.join(timeout=1)
        receiver.close()
        sender.close()
