"""The lock: one trainer per workdir (``train.lock``), and who holds it."""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from attention_jax.lab.rundir.faults import HELD_LOCKS, SYSTEM_ERRNOS, StorageFault, WorkdirBusy, naming
from attention_jax.lab.rundir.rundir import LOCK

if TYPE_CHECKING:
    from attention_jax.lab.rundir.workdir import RunDir


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(pid, 0) succeeded


class WorkdirLock:
    """An exclusive lock on a workdir, held by the process that trains in it.

    ``train.lock`` holds the holder's pid, host and start time. The lock itself
    is ``flock`` on that file: the kernel drops it when the process dies, even
    by ``kill -9``, so a lock left by a dead process never blocks the next run
    (the file stays, with the dead holder's details, and is taken over). On NFS
    Linux maps ``flock`` to NFS byte-range locks, which hold across machines
    when the server supports locking. Where ``flock`` is refused (ENOLCK,
    ENOTSUP: some network file systems), the lock is the file itself, created
    exclusively; a stale one is taken over only when its holder's host is this
    host and its pid is gone, else the message says which file to delete.
    Re-entrant within one process (the sweep runner holds it around ``train``).
    """

    _held = HELD_LOCKS  # lock path -> depth, in this process

    def __init__(self, run: RunDir):  # run: anything with .path, .create() and / (a RunDir)
        self.run = run
        self.path = run / LOCK
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        key = str(self.path)
        if key in self._held:
            self._held[key] += 1
            return self
        try:
            self.run.create()
            self._fd = self._acquire()
        except OSError as e:
            if e.errno in SYSTEM_ERRNOS:  # a read-only, full or forbidden workdir: one line, exit 4
                raise StorageFault(e.errno, e.filename or self.path) from e
            raise
        self._held[key] = 1
        return self

    def __exit__(self, *exc) -> None:
        key = str(self.path)
        self._held[key] -= 1
        if self._held[key]:
            return
        del self._held[key]
        with contextlib.suppress(OSError):  # vanished workdir: nothing left to release
            self.path.unlink()  # before unlocking: a waiter that opened this file sees it is gone and retries
        os.close(self._fd)
        self._fd = None

    def _acquire(self) -> int:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise WorkdirBusy(self._busy_message(holder, "wait for it to finish or stop it")) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL):
                    return self._acquire_by_creation()
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    with naming(self.path):
                        _write_holder(fd)
                except OSError:  # disk full, say: leave no empty lock file behind
                    self.path.unlink(missing_ok=True)
                    os.close(fd)
                    raise
                return fd
            os.close(fd)  # released and unlinked between our open and flock: try the new file

    def _acquire_by_creation(self) -> int:
        """The lock as an exclusively created file, for file systems without flock."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                with open(self.path, "rb") as f:
                    holder = _parse_holder(f.read())
                if holder and holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid", -1)):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                if not holder:  # being written right now, or empty: look again shortly
                    time.sleep(0.2)
                    continue
                advice = f"wait for it to finish; if it no longer runs, delete {self.path}"
                raise WorkdirBusy(self._busy_message(holder, advice)) from None
            try:
                with naming(self.path):
                    _write_holder(fd)
            except OSError:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            return fd
        raise WorkdirBusy(self._busy_message({}, f"if no trainer runs there, delete {self.path}"))

    def _busy_message(self, holder: dict, advice: str) -> str:
        who = (
            f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
            if holder
            else "another process"
        )
        where = f"workdir {self.run.path} is in use by a trainer ({who}; lock {self.path})"
        return f"{where}; {advice}, or use another --workdir"


def _holder_info() -> bytes:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": " ".join(sys.argv)[:500]}
    return json.dumps(info).encode()


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_info(), 0)
    os.fsync(fd)


def _parse_holder(raw: bytes) -> dict:
    try:
        holder = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def lock_holder(workdir: str | os.PathLike) -> dict | None:
    """Which other process seems to hold ``workdir``'s lock (pid, host, started), read without locking;
    None when none does.

    A lock file left by a dead process on this host counts as none; one from
    another host cannot be checked from here and counts as held.
    """
    try:
        holder = _parse_holder((Path(workdir).absolute() / LOCK).read_bytes())
    except OSError:
        return None
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid", -1)
        if pid == os.getpid() or not _pid_alive(pid):
            return None
    return holder or None


def _read_holder(fd: int) -> dict:
    try:
        return _parse_holder(os.pread(fd, 4096, 0))
    except OSError:
        return {}
