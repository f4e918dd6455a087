"""System faults: the one-line errors of a run directory, and the OS's refusals turned into them.

A disk that is full, read-only or forbidden, a workdir deleted while in use:
``StorageFault`` says the path, the cause, what to do, and where training can
resume from. ``RunDirError`` and its kinds are a run directory that cannot be
used as it is (in use, damaged, made from other data).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from attention_jax.lab.errors import ConfigError


class RunDirError(ValueError):
    """A run directory that cannot be used as it is: in use, damaged, or made from other data."""


class WorkdirBusy(RunDirError):
    """Another trainer holds the workdir's lock."""


class DamagedFile(RunDirError):
    """A file of a run that cannot be read back (not JSON, cut short, checksum mismatch)."""


# The lock files this process holds (path -> depth: the lock is re-entrant). ``WorkdirLock``
# keeps it; a fault inside a held workdir whose lock file is gone means the workdir was replaced.
HELD_LOCKS: dict[str, int] = {}


# What the OS said, in words, and what to do about it.
_CAUSES = {
    errno.ENOSPC: ("no space left on device", "free some space, then rerun the same command"),
    errno.EDQUOT: ("disk quota exceeded", "free some space, then rerun the same command"),
    errno.EROFS: ("read-only file system", "remount it read-write or use another --workdir"),
    errno.EACCES: ("permission denied", "check its permissions for this user, or use another --workdir"),
    errno.EPERM: ("operation not permitted", "check its permissions for this user, or use another --workdir"),
    errno.EIO: ("input/output error", "the storage reported an error: check the disk, then rerun the same command"),
    errno.ENOENT: ("no such file or directory", "it was deleted, moved or unmounted while in use"),
}
SYSTEM_ERRNOS = frozenset(code for code in _CAUSES if code != errno.ENOENT)


class StorageFault(OSError):
    """The OS refused to read or write a run directory: disk full, read-only, permission denied, vanished.

    ``str()`` is one line: the path, the cause, what to do, and (``last_good``)
    where training can resume from.
    """

    def __init__(self, code: int, path: str | os.PathLike, last_good: str = ""):
        cause, self.advice = _CAUSES.get(code, (os.strerror(code).lower(), "rerun the same command"))
        super().__init__(code, cause, str(path))
        self.last_good = last_good

    def __str__(self) -> str:
        # After a vanished workdir there is no checkpoint left to point at.
        tail = (
            f" {self.last_good[0].upper()}{self.last_good[1:]}."
            if self.last_good and self.errno != errno.ENOENT
            else ""
        )
        return f"{self.filename}: {self.strerror}; {self.advice}.{tail}"


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError with a known errno behind ``exc``: itself, its causes, or (tensorstore) its text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _CAUSES:
            return exc
        text = str(exc)
        for code in SYSTEM_ERRNOS:
            if os.strerror(code) in text:  # "No space left on device" inside an orbax/tensorstore message
                return OSError(code, os.strerror(code))
        exc = exc.__cause__ if exc.__cause__ is not None else None if exc.__suppress_context__ else exc.__context__
    return None


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Give an OSError raised by a write (which names no file) the file it was writing."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


@contextlib.contextmanager
def storage_faults(workdir: Path, last_good: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Turn the OS's refusals while working in ``workdir`` into one-line ``StorageFault`` errors."""
    try:
        yield
    except StorageFault as e:
        if not e.last_good:
            e.last_good = last_good()
        raise
    except (ConfigError, RunDirError):
        raise  # already one line about the input
    except Exception as e:
        err = os_error_in(e)
        if err is None:
            raise
        if err.errno == errno.ENOENT:
            if not _vanished(workdir):
                raise  # a missing file, not a vanished workdir: let it speak for itself
            raise StorageFault(errno.ENOENT, f"the workdir {workdir}") from e
        raise StorageFault(err.errno, err.filename or workdir, last_good()) from e


def _vanished(workdir: Path) -> bool:
    """Whether ``workdir`` is gone, or (orbax recreates folders as it saves) is no longer the folder
    whose lock this process holds (so call this inside the lock's ``with`` block)."""
    if not workdir.exists():
        return True
    held = [Path(lock) for lock in HELD_LOCKS if Path(lock).parent == workdir]
    return any(not lock.exists() for lock in held)


def raise_if_system_fault(e: BaseException, path: Path) -> None:
    """A read the OS refused (permission, I/O error) is a storage fault, not a damaged checkpoint."""
    err = os_error_in(e)
    if err is not None and err.errno in SYSTEM_ERRNOS:
        raise StorageFault(err.errno, path) from e
