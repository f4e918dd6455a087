"""Sweeps on a Ray cluster: ``experiments.sweep --backend ray [--address ADDR]``.

One Ray task per program: the points that train as one population
(``sweep.group_points``), or one point with ``--no-group``. The task runs
``sweep.run_group``, the function the local backend runs, in the driver's
working directory, so each point's run directory and ``sweep_point.json``
are the same file for file; the driver rebuilds ``status.json`` whenever a
task ends. Every node must see the sweep dir (a shared file system; on one
machine, any folder) and the config file at the same path, and have
attention_jax installed.

Resources come from the config's ``ray`` group (per program: CPUs, GPUs, TPU
chips, hosts). A task whose worker process or node dies is run again up to
``ray.max_retries`` times, and resumes from its checkpoint as a rerun of the
local backend does. A point that fails (bad config, diverged) is recorded by
the task, which ends normally: the other points go on.

A program with ``ray.hosts = N > 1`` (a point spanning a multi-host TPU
slice) runs as N tasks, one per node (a STRICT_SPREAD placement group), all
given the address of a free port on the first one's node and their process
ids, as ``distributed.*`` overrides: each joins with jax.distributed, process
0 writes the records. When one of them dies the driver stops the others and
runs all N again (that is a retry).

Output: what the tasks print reaches the driver through Ray, uncoloured
(``RAY_COLOR_PREFIX=0``) and every line of it (``RAY_DEDUP_LOGS=0``: Ray's
deduplication holds back lines that differ only in numbers, such as two
points' ``done`` lines, and may drop them at shutdown). How each point ended
is printed by the driver from the records its task returns, so that last
line is never lost with a worker's log. A local instance gets token
authentication with a token of its own (``RAY_AUTH_MODE=token``; nothing
written to ~/.ray), so Ray has nothing to warn about. Each setting is a
default: one set in the environment wins.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attention_jax.lab import distributed
from attention_jax.lab import sweep as sweep_lib
from attention_jax.lab.config import ConfigError

FORWARDED_ENV = ("XLA_FLAGS",)  # besides every ATTENTION_JAX_* variable: what tasks see of the driver's environment


# Ray's own switch for a single-machine Ray: with it off, Ray keeps a loopback address (127.0.0.1)
# instead of replacing it by the machine's network address, so its servers listen on loopback only.
# (Its name says Windows or macOS, where it is off by default.)
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# Ray's switches for what the driver prints: no colour codes around the "(task pid=...)" prefix
# of worker lines, and no deduplication of worker lines (it dropped the last point's "done" line).
RAY_OUTPUT_ENV = {"RAY_COLOR_PREFIX": "0", "RAY_DEDUP_LOGS": "0"}


def ray_environment(address: str | None, environ: dict | None = None, home: Path | None = None) -> dict[str, str]:
    """The variables to set (those not set already in ``environ``) before Ray is imported and started.

    Output switches always. For a local instance (no ``address``), token
    authentication set explicitly, and a fresh token when there is none in the
    environment or in ~/.ray/auth_token: Ray would otherwise write one there
    and warn that it turned authentication on. For a cluster, token mode where
    a token is at hand (what Ray does by itself, minus its warning).
    """
    environ = os.environ if environ is None else environ
    home = Path.home() if home is None else home
    out = {k: v for k, v in RAY_OUTPUT_ENV.items() if k not in environ}
    if "RAY_AUTH_MODE" in environ:
        return out
    has_token = (
        "RAY_AUTH_TOKEN" in environ or "RAY_AUTH_TOKEN_PATH" in environ or (home / ".ray" / "auth_token").is_file()
    )
    if address is None:
        out["RAY_AUTH_MODE"] = "token"
        if not has_token:
            out["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this instance's alone; its processes inherit it
    elif has_token:
        out["RAY_AUTH_MODE"] = "token"
    return out


def import_ray(address: str | None = None):
    """Ray, set to stay on loopback when the cluster is a local instance or given at a loopback address.

    A local instance (no ``address``) then serves on 127.0.0.1 only, and a
    driver given 127.0.0.1:PORT connects there (Ray would otherwise swap in
    the machine's address, where a loopback-only cluster does not answer).
    Also sets Ray's output and authentication switches (``ray_environment``).
    Must run before Ray is first imported in this process.
    """
    host = (address or "").rpartition(":")[0]
    if address is None or distributed.is_loopback(host):
        os.environ.setdefault(RAY_LOOPBACK_ENV, "0")
    os.environ.update(ray_environment(address))
    try:
        import ray
    except ModuleNotFoundError:
        raise ConfigError('--backend ray needs Ray: pip install "attention_jax[ray]"') from None
    return ray


# ---------------------------------------------------------------------------
# In the worker
# ---------------------------------------------------------------------------


FINAL_STATES = ("done in ", "failed: ", "diverged: ", "interrupted: ")  # how sweep's records.finish words an end


def is_final_line(message: str, points: Sequence[sweep_lib.Point]) -> bool:
    """Whether ``message`` is the line that says how one of ``points`` ended ("[3] name: done in 12 s")."""
    for p in points:
        prefix = f"[{p.index}] {p.name}: "
        if message.startswith(prefix) and message[len(prefix) :].startswith(FINAL_STATES):
            return True
    return False


def run_program(cwd: str, spec: str, points: list, sweep_dir: str, base_overrides: dict, host: dict | None) -> dict:
    """One program of the sweep in a Ray worker (a fresh process: ``max_calls=1``).

    Returns {"records": its points' records, "lines": the lines saying how each
    ended}: those the driver prints (through Ray's log stream they could be
    lost); every other line is printed here as it happens. ``host``
    ({"coordinator_address", "num_processes", "process_id"}) makes this task
    one process of a multi-host program.
    """
    final: list[str] = []

    def log(message: str) -> None:
        if is_final_line(message, points):
            final.append(message)
        else:
            print(message, file=sys.stderr, flush=True)

    if not os.path.isdir(cwd):
        raise ConfigError(f"the sweep's working directory {cwd} does not exist on this node; run the sweep from a "
                          "folder every node has (a shared file system, or the same clone everywhere)")  # fmt: skip
    os.chdir(cwd)  # relative paths (the config file, the sweep dir) mean what they mean to the driver
    if host is not None:
        base_overrides = {**base_overrides, "distributed.enabled": True,
                          **{f"distributed.{key}": value for key, value in host.items()}}  # fmt: skip
        distributed.initialize(distributed.settings(sweep_lib.point_config(spec, points[0], base_overrides)))
    records = sweep_lib.run_group(spec, points, sweep_dir, base_overrides=base_overrides, log=log)
    return {"records": records, "lines": final}


def free_port() -> tuple[str, int]:
    """This node's address and a TCP port free on it now: where process 0 of a multi-host program serves."""
    import socket

    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((ip, 0))
        return ip, s.getsockname()[1]


# ---------------------------------------------------------------------------
# In the driver
# ---------------------------------------------------------------------------


@dataclass
class Program:
    """A program of the sweep and its Ray tasks (one, or one per host)."""

    points: list[sweep_lib.Point]
    resources: dict[str, Any]
    hosts: int
    max_retries: int
    attempts: int = 0
    refs: list = field(default_factory=list)
    placement: Any = None  # the placement group of a multi-host program
    printed: bool = False  # whether the driver printed how its points ended


def resources_of(config) -> dict[str, Any]:
    """Ray task options of a config's ``ray`` group."""
    r = config.ray
    for key in ("num_cpus", "num_gpus", "tpu_chips", "max_retries"):
        if r[key] < 0:
            raise ConfigError(f"ray.{key}={r[key]}: must be non-negative")
    if r.hosts < 1:
        raise ConfigError(f"ray.hosts={r.hosts}: must be at least 1")
    return {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "resources": {"TPU": r.tpu_chips} if r.tpu_chips else {}}


def run_sweep(
    spec: str,
    points: Sequence[sweep_lib.Point],
    sweep_dir: str | os.PathLike,
    *,
    all_points: Sequence[sweep_lib.Point] | None = None,
    base_overrides: dict | None = None,
    group: bool = True,
    address: str | None = None,
    log: Callable[[str], None] = sweep_lib._log,
) -> dict:
    """``sweep.run_sweep`` on Ray: every program a task; status.json's payload (over ``all_points``).

    Without ``address`` a local Ray instance is started, and stopped at the end.
    """
    ray = import_ray(address)
    if address and re.fullmatch(r"[^:/]+:\d+", address) and not distributed.answers(address):
        # Ray would retry a dead address for minutes, printing warnings.
        raise ConfigError(f"--address {address}: no Ray cluster answers there (start one with ray start --head)")
    base_overrides = dict(base_overrides or {})
    all_points = list(all_points or points)
    programs = []
    for members in sweep_lib.group_points(spec, points, sweep_dir, base_overrides) if group else [[p] for p in points]:
        config = sweep_lib.point_config(spec, members[0], base_overrides)
        programs.append(Program(members, resources_of(config), config.ray.hosts, config.ray.max_retries))
    env = {k: v for k, v in os.environ.items() if k.startswith("ATTENTION_JAX_") or k in FORWARDED_ENV}
    # Before this process starts JAX (the records below ask it for the process index): a local
    # Ray instance is started by forking, which a process running JAX's threads should not do.
    ray.init(address=address, runtime_env={"env_vars": env}, include_dashboard=False)
    task = ray.remote(max_calls=1)(run_program)  # a fresh process per task: JAX starts once per process
    args = (os.getcwd(), spec, str(sweep_dir), base_overrides)
    try:
        sweep_lib.write_sweep_file(spec, all_points, Path(sweep_dir), base_overrides)
        t0 = time.time()
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        for program in programs:
            if program.hosts > nodes:
                _fail(program, f"ray.hosts={program.hosts} needs as many nodes; the cluster has {nodes}", args)
            else:
                _submit(ray, task, program, args, log)
        running = [p for p in programs if p.refs]
        while running:
            ready, _ = ray.wait([ref for p in running for ref in p.refs], num_returns=1)
            program = next(p for p in running if ready[0] in p.refs)
            if _settle(ray, task, program, ready[0], args, log):
                running.remove(program)
                sweep_lib.write_status(sweep_dir, all_points)
    except BaseException:  # Ctrl-C, or the driver's own failure: stop the tasks, leave every point resumable
        for program in programs:
            for ref in program.refs:
                ray.cancel(ref, force=True)
        raise
    finally:
        for program in programs:
            _release(ray, program)
        ray.shutdown()
    status = sweep_lib.write_status(sweep_dir, all_points)
    status["seconds"] = round(time.time() - t0, 1)
    return status


def _submit(ray, task, program: Program, args: tuple, log) -> None:
    """Start (or start again) the program's task, or its task on every host."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    program.attempts += 1
    program.printed = False
    cwd, spec, sweep_dir, base = args
    names = ", ".join(str(p.index) for p in program.points)
    if program.hosts == 1:  # Ray itself runs it again when its worker dies
        options = dict(program.resources, max_retries=program.max_retries, retry_exceptions=False)
        program.refs = [task.options(**options).remote(cwd, spec, program.points, sweep_dir, base, None)]
        log(f"[{names}] submitted to Ray")
        return
    bundle = {"CPU": program.resources["num_cpus"], "GPU": program.resources["num_gpus"],
              **program.resources["resources"]}  # fmt: skip
    program.placement = placement_group([{k: v for k, v in bundle.items() if v}] * program.hosts,
                                        strategy="STRICT_SPREAD")  # fmt: skip
    ray.get(program.placement.ready())

    def on(host: int) -> dict:
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(program.placement, host)}

    ip, port = ray.get(ray.remote(free_port).options(num_cpus=0, **on(0)).remote())
    hosts = [{"coordinator_address": f"{ip}:{port}", "num_processes": program.hosts, "process_id": i}
             for i in range(program.hosts)]  # fmt: skip
    options = dict(program.resources, max_retries=0, retry_exceptions=False)  # the driver retries all hosts at once
    program.refs = [task.options(**options, **on(i)).remote(cwd, spec, program.points, sweep_dir, base, hosts[i])
                    for i in range(program.hosts)]  # fmt: skip
    log(f"[{names}] submitted to Ray on {program.hosts} hosts, coordinator {ip}:{port} (attempt {program.attempts})")


def _settle(ray, task, program: Program, ref, args: tuple, log) -> bool:
    """Take the result of one of the program's tasks; True when the program is over (done, failed or given up)."""
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None) or e  # a RayTaskError wraps what the task raised
        error = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
        if program.hosts == 1:  # Ray has retried it max_retries times already
            _fail(program, f"{error} (Ray ran it {program.max_retries + 1} times)", args)
            return True
        for other in program.refs:  # one host is gone: the others cannot go on without it
            ray.cancel(other, force=True)
        _release(ray, program)
        if program.attempts > program.max_retries:
            _fail(program, f"{error} (on one of its {program.hosts} hosts; ran {program.attempts} times)", args)
            return True
        log(f"[{', '.join(str(p.index) for p in program.points)}] a host failed ({error}); running it again")
        _submit(ray, task, program, args, log)
        return False
    if not program.printed:  # every host of a program returns the same lines: print them once
        for line in result["lines"]:
            log(line)
        program.printed = True
    program.refs.remove(ref)
    if program.refs:  # the other hosts of the program end with it
        return False
    _release(ray, program)
    return True


def _fail(program: Program, error: str, args: tuple) -> None:
    cwd, spec, sweep_dir, base = args
    for point in program.points:
        if sweep_lib.read_point_status(sweep_dir, point)["status"] not in sweep_lib.FINISHED:
            sweep_lib.record_failure(spec, point, sweep_dir, base, error)
    program.refs = []


def _release(ray, program: Program) -> None:
    if program.placement is not None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(program.placement)
        program.placement = None
