"""Multi-process runs: one run over the devices of several processes (hosts), with ``jax.distributed``.

Every process runs the same command with ``--config.distributed.enabled=true``.
Where the processes find each other comes from the config's ``distributed``
group, else from the environment variables ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, else from what JAX detects by
itself (Cloud TPU VMs, SLURM, Open MPI, Kubernetes). On the CPU platform the
processes exchange data with gloo (TCP) collectives, switched on here.

What can go wrong, and what the user sees (one ``error:`` line and a non-zero
exit, never a hang and never a stack dump):

* Not every process joins within ``distributed.join_timeout_s`` (a wrong
  address, a process that never started, a wrong ``num_processes``): a timer
  here stops the process with a line that says which.
* A process dies mid-run (killed, preempted, crashed). JAX notices it: at
  once when process 0 (the coordinator) is gone, after
  ``distributed.heartbeat_timeout_s`` otherwise, and then aborts every other
  process with a C++ fatal error and its stack dump. That abort cannot be
  caught inside the process, so the command runs its work in a child process
  (``supervise``) and the parent, which imports JAX but never starts it,
  turns the dump into one line and exit status 6. Running every process again
  with the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from attention_jax.lab.cli import EXIT_JOIN_FAILED, EXIT_PROCESS_LOST
from attention_jax.lab.config import ConfigError, env_flag
from attention_jax.lab.parts import DISTRIBUTED_ENV, Distributed, resolve_distributed

ENV = DISTRIBUTED_ENV
SUPERVISED = "ATTENTION_JAX_SUPERVISED"  # set in the child of ``supervise``: it does the work itself
EXIT_LOST = EXIT_PROCESS_LOST  # a process of the run was lost (6); one that never joined: EXIT_JOIN_FAILED (5)


# How this process joins a run (``distributed.*`` with the environment filled in); None fields are
# left to JAX to detect. Resolved with the rest of the config (``parts.resolve_distributed``).
Settings = Distributed


def settings(part: Distributed) -> Settings | None:
    """The distributed part of resolved parts when it is enabled, else None (a single process).

    Deprecated: given an experiment config (ConfigDict), resolves its ``distributed`` group first.
    """
    if not isinstance(part, Distributed):
        part = resolve_distributed(part)
    return part if part.enabled else None


def launch(part: Distributed, command: str, argv: list[str] | None) -> int | None:
    """Make this process part of the run ``part`` describes, before any other JAX call.

    Returns None when the caller should go on and do the work here (a single
    process, or the child of ``supervise``), else the exit status of the
    supervised child that did it.
    """
    s = settings(part)
    if s is None:
        return None
    if os.environ.get(SUPERVISED) != "1":
        return supervise(command, sys.argv[1:] if argv is None else list(argv), s)
    initialize(s)
    return None


# ---------------------------------------------------------------------------
# Joining (in the process that does the work)
# ---------------------------------------------------------------------------


def initialize(s: Settings) -> None:
    """``jax.distributed.initialize`` with gloo on CPU, bounded by ``s.join_timeout_s`` (then one line, exit 5)."""
    import jax

    if jax.config.jax_cpu_collectives_implementation != "mpi":  # MPI only when asked for
        # Without cross-process collectives (older JAX's default) a CPU program over
        # several processes cannot run; gloo needs nothing but TCP between the hosts.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timer = threading.Timer(s.join_timeout_s, _join_failed, args=(s,))
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(
            coordinator_address=s.coordinator_address,
            num_processes=s.num_processes,
            process_id=s.process_id,
            coordinator_bind_address=loopback_bind_address(s.coordinator_address),
            # JAX's own deadline only after ours: its failure is a fatal abort, ours one line.
            initialization_timeout=s.join_timeout_s + 60,
            heartbeat_timeout_seconds=s.heartbeat_timeout_s,
        )
        devices = jax.devices()  # the backend forms over every process: still part of joining
    except ValueError as e:  # nothing to detect: JAX names the missing value
        timer.cancel()
        raise ConfigError(
            f"distributed: {e} JAX detected no cluster to take it from (Cloud TPU VM, SLURM, Open MPI, "
            "Kubernetes): set distributed.coordinator_address, num_processes and process_id "
            f"(or {', '.join(ENV.values())})"
        ) from None
    timer.cancel()
    print(
        f"distributed: process {jax.process_index()} of {jax.process_count()}, {len(devices)} devices in all "
        f"({jax.local_device_count()} here)",
        file=sys.stderr,
        flush=True,
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (127.x.y.z, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_bind_address(coordinator_address: str | None) -> str | None:
    """Where process 0's coordinator listens: only on loopback when the address given is a loopback one.

    JAX's coordinator otherwise listens on every interface (``[::]:port``);
    a run whose processes meet at 127.0.0.1 has no reason to be reachable
    from elsewhere. ``JAX_COORDINATOR_BIND_ADDRESS``, when set, decides instead.
    """
    if coordinator_address is None or os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
        return None
    host, _, port = coordinator_address.rpartition(":")
    return coordinator_address if is_loopback(host) and port.isdigit() else None


def _join_failed(s: Settings) -> None:
    """The join timer ran out: say why as well as can be told, and stop (the join itself cannot be interrupted)."""
    where = s.coordinator_address
    if where is None:
        why = "the coordinator JAX detected did not gather every process"
    elif s.process_id != 0 and not answers(where):
        why = f"nothing answers at the coordinator address {where} (is process 0 running there?)"
    else:
        n = s.num_processes if s.num_processes is not None else "all"
        why = f"not all {n} processes reached the coordinator at {where} (is every process started, with its own id?)"
    print(f"error: distributed: {s.who()} could not join the run within {s.join_timeout_s} s: {why}",
          file=sys.stderr, flush=True)  # fmt: skip
    os._exit(EXIT_JOIN_FAILED)


def answers(address: str) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (within 2 s)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Supervising (the parent: turns JAX's fatal abort into one line)
# ---------------------------------------------------------------------------

# A record of absl's C++ log ("E1126 18:55:59.166129   29781 file.cc:1549] ...").
_ABSL_RECORD = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ [^\]\s]+\] ")
_RECORD_START = re.compile(rb"[IWEF](\d{0,4}$|\d{4} )")  # what may be the start of a record not yet complete
_HOLD_S = 1.0  # C++ log records are held this long: a fatal one follows its preludes within milliseconds


def supervise(command: str, argv: list[str], s: Settings) -> int:
    """Run ``attention_jax.lab.commands.<command>(argv)`` in a child process; relay its output; its exit status.

    The child's stdout is this process's; its stderr is copied through, but
    for JAX's C++ log records, held back a moment and dropped when a fatal one
    follows (the abort of a process whose peer died), and the child's own
    ``error:`` lines, kept to the end. Then exactly one ``error:`` line is
    shown: the child's, or, when the run lost a process (JAX's abort, or a
    collective whose connection closed), one that says so, with exit status 6.
    SIGINT, SIGTERM and SIGHUP are passed on; on Linux the child is killed
    with this process, so killing either ends both.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(command=command), *argv],
        env=dict(os.environ, **{SUPERVISED: "1"}),
        stderr=subprocess.PIPE,
        preexec_fn=_child_setup(os.getpid()),
    )
    passed_on = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    before = {sig: signal.signal(sig, lambda signum, frame: child.send_signal(signum)) for sig in passed_on
              if main_thread}  # fmt: skip
    try:
        fatal, errors = _relay(child.stderr.fileno(), sys.stderr.buffer)
        rc = child.wait()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if fatal is not None and env_flag("ATTENTION_JAX_DEBUG"):  # the record and JAX's stack dump, as they came
        sys.stderr.buffer.write(fatal)
    own = [e for e in errors if not _LOST_CONNECTION.search(e)]
    if own:  # the child's own failure (bad input, a diverged run, ...): its line and its status
        sys.stderr.write("".join(own))
        return rc if rc > 0 else EXIT_LOST
    if fatal is not None:
        message = explain_fatal(fatal.decode("utf-8", "replace"), s)
    elif errors:
        message = "another process of the run stopped (killed, crashed or preempted)"
    elif rc < 0:
        message = f"the process doing the work ended by signal {signal.Signals(-rc).name}"
    else:
        return rc
    print(f"error: distributed: {message}; {s.who()} stopped. Start every process again with the same command: "
          "training resumes from the last checkpoint", file=sys.stderr, flush=True)  # fmt: skip
    return EXIT_LOST


# The child: the command, and after a failure no goodbye to the other processes (at exit JAX would
# wait for them, which can take the whole heartbeat timeout): they notice it is gone and stop too.
_CHILD = """import os, sys
from attention_jax.lab.commands import {command} as main
status = main(sys.argv[1:])
if status:
    sys.stdout.flush(); sys.stderr.flush(); os._exit(status)
sys.exit(status)
"""
# What a collective says when the process at the other end is gone (gloo on CPU).
_LOST_CONNECTION = re.compile(r"Gloo .*failed|Connection closed by peer|Connection reset by peer|Socket closed")


def _child_setup(parent: int):
    """What the child runs first: a process group of its own (signals come via the parent), death with the parent."""

    def setup():
        os.setpgid(0, 0)  # Ctrl-C reaches the parent only, which passes it on once
        if sys.platform.startswith("linux"):
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(EXIT_LOST)

    return setup


def _relay(fd: int, out) -> tuple[bytes | None, list[str]]:
    """Copy ``fd`` to ``out`` until EOF but C++ log records and ``error:`` lines.

    Returns the fatal record with what follows it (None without one), and the
    ``error:`` lines.
    """
    pending, held, held_since, fatal, errors = b"", [], None, None, []
    while True:
        timeout = None if held_since is None else max(0.0, held_since + _HOLD_S - time.monotonic())
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:  # no fatal record followed: the held records were ordinary logs
            out.write(b"".join(held))
            out.flush()
            held, held_since = [], None
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        if fatal is not None:  # the process is aborting: keep the status, drop the stack dump
            fatal = (fatal + chunk)[:20000]
            continue
        *pieces, pending = re.split(rb"(?<=[\n\r])", pending + chunk)
        if pending and not _RECORD_START.match(pending) and not b"error:".startswith(pending[:6]):
            pieces, pending = [*pieces, pending], b""  # a partial line (a progress bar): show it now
        for i, piece in enumerate(pieces):
            if _ABSL_RECORD.match(piece) and piece.startswith(b"F"):
                fatal = b"".join(pieces[i:]) + pending
                break
            if piece.startswith(b"error:"):
                errors.append(piece.decode("utf-8", "replace"))
            elif _ABSL_RECORD.match(piece) or held_since is not None:  # a record, or a line continuing one
                held.append(piece)
                held_since = held_since or time.monotonic()
            else:
                out.write(piece)
        out.flush()
    if fatal is None:
        out.write(b"".join(held) + pending)
        out.flush()
    return fatal, errors


def explain_fatal(text: str, s: Settings | None = None) -> str:
    """What JAX's fatal record ``text`` says happened, in words (``s``: this process's settings)."""
    dead = re.search(r"stopped sending heartbeats\):\s*([\d,\s]+)", text)
    ids = re.findall(r"\d+", dead.group(1)) if dead else sorted(set(re.findall(r"task:(\d+)", text)))
    if ids:
        return f"process {', '.join(ids)} of the run stopped responding (killed, crashed or preempted)"
    if s is not None and s.process_id == 0:  # process 0 serves the coordinator: what it can lose is a peer
        return "another process of the run stopped (killed, crashed or preempted)"
    if re.search(r"PollForError|Socket closed|Connection refused|UNAVAILABLE", text):
        return "the coordinator (process 0) is gone (killed, crashed or preempted)"
    status = re.search(r"absl::Status: ([^\n]*)", text)
    return f"JAX's distributed runtime stopped: {(status.group(1) if status else text.splitlines()[0])[:300]}"
