"""Sweeps: lists of override dicts, one workdir per point, a runner that survives failures.

A sweep lives beside the config it sweeps: the config file defines
``get_sweep(arg)`` returning a list of override dicts (dotted keys, Python
values), built with the small helpers here::

    product(sweep("model.attn_scale", ["none", "sqrt"]), sweep("model.n_head", [2, 4]))
    # -> 4 dicts; zip_(...) pairs lists element by element instead

Each point trains in ``<sweep dir>/<name>``, the name spelled from its
overrides (``attn_scale=none,n_head=2``), so it is stable when points are added
or reordered. The runner skips finished points (summary.json present), resumes
interrupted ones (``train`` restores the latest checkpoint), records a failed
point in ``<point>/sweep_point.json`` and ``<sweep dir>/status.json`` and goes
on with the next. ``--index I`` of ``experiments.sweep`` runs one point: how an
array job or one cloud TPU VM per point takes its share.

Grouping: points whose configs differ only in member values (the seed and the
optimizer's scalars, :data:`attention_jax.lab.population.MEMBER_KEYS`) and
that resume from the same step train as one population, in one compiled
program (``group_points``); each point still gets its own run directory, with
the files it would have had alone. ``group=False`` runs one program per point.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attention_jax.lab.config import ConfigError, apply_overrides, call_config_function, load_config, run_name
from attention_jax.lab.parts import Parts, member_entry, resolve, shared
from attention_jax.lab.rundir import RunDir, WorkdirBusy, lock_holder, write_json

Overrides = dict[str, Any]
STATUS_FILE = "status.json"  # in the sweep dir: every point's status
SWEEP_FILE = "sweep.json"  # in the sweep dir: the config, the sweep-wide overrides and every point
FINISHED = ("done", "diverged")  # states the runner does not retry


# ---------------------------------------------------------------------------
# Building sweeps
# ---------------------------------------------------------------------------


def sweep(key: str, values: Iterable[Any]) -> list[Overrides]:
    """One axis: ``[{key: v} for v in values]``."""
    return [{key: v} for v in values]


def product(*axes: Sequence[Overrides]) -> list[Overrides]:
    """Cartesian product of axes; each point merges one dict of every axis (later keys win)."""
    out = []
    for combo in itertools.product(*axes):
        merged: Overrides = {}
        for d in combo:
            merged.update(d)
        out.append(merged)
    return out


def zip_(*axes: Sequence[Overrides]) -> list[Overrides]:
    """Element-wise merge of equally long axes: zip_(a, b)[i] = {**a[i], **b[i]}."""
    lengths = {len(a) for a in axes}
    if len(lengths) > 1:
        raise ValueError(f"zip_ needs axes of equal length, got lengths {[len(a) for a in axes]}")
    return [dict(itertools.chain.from_iterable(d.items() for d in combo)) for combo in zip(*axes)]


def unique(points: Iterable[Overrides]) -> list[Overrides]:
    """Drop repeated points (same keys and values), keeping the first of each."""
    seen, out = set(), []
    for p in points:
        key = json.dumps(p, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _format_value(v: Any, exact: bool = False) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, float):
        return repr(v) if exact else f"{v:g}"
    return str(v)


def point_name(overrides: Overrides, exact: bool = False) -> str:
    """Workdir name of a point: ``attn_scale=none,n_head=2`` (leaf keys unless ambiguous).

    Characters other than letters, digits and ``._-=,+`` become ``_``; an empty
    dict is ``base``. Floats are spelled with 6 significant digits (``0.001``),
    or, with ``exact``, as ``repr`` spells them (``0.0010000001``).
    """
    if not overrides:
        return "base"
    leaves = [k.rsplit(".", 1)[-1] for k in overrides]
    parts = []
    for key, leaf in zip(overrides, leaves):
        label = leaf if leaves.count(leaf) == 1 else key
        parts.append(f"{label}={_format_value(overrides[key], exact)}")
    return re.sub(r"[^A-Za-z0-9._\-=,+]", "_", ",".join(parts))


def _spelled_exactly(overrides: Overrides) -> bool:
    """Whether the short name says every value: its floats read back from 6 digits, no character replaced."""
    floats_exact = all(float(f"{v:g}") == v for v in overrides.values() if isinstance(v, float) and math.isfinite(v))
    raw = ",".join(f"{k}={_format_value(v)}" for k, v in overrides.items())
    return floats_exact and not re.search(r"[^A-Za-z0-9._\-=,+]", raw)


def _point_key(overrides: Overrides) -> str:
    return json.dumps(overrides, sort_keys=True, default=str)  # what unique() compares


def _distinct_names(overrides_list: Sequence[Overrides]) -> list[str]:
    """Each point's workdir name; distinct values get distinct names.

    Points keep their short name (``point_name``) unless another point with other
    values has the same one (0.001 and 0.0010000001 are both ``0.001`` in 6 digits).
    Then the point the short name spells exactly keeps it, so the run directories of
    an existing sweep keep theirs; the others are spelled with exact floats and,
    where that is still ambiguous, get a suffix ``+h`` and 8 hex digits of a hash
    of their values.
    """
    names = [point_name(o) for o in overrides_list]
    for name in dict.fromkeys(names):
        group = [i for i, n in enumerate(names) if n == name]
        if len({_point_key(overrides_list[i]) for i in group}) < 2:
            continue  # one point, or only repeats of one (an error: expand)
        keeper = next((i for i in group if _spelled_exactly(overrides_list[i])), None)
        for i in group:
            o = overrides_list[i]
            if i == keeper or (keeper is not None and _point_key(o) == _point_key(overrides_list[keeper])):
                continue
            names[i] = point_name(o, exact=True)
    taken: dict[str, str] = {}  # name -> the point key that holds it; short names spelled exactly first
    keeps = [names[i] == point_name(o) and _spelled_exactly(o) for i, o in enumerate(overrides_list)]
    for i in sorted(range(len(names)), key=lambda i: not keeps[i]):
        o = overrides_list[i]
        holder = taken.setdefault(names[i], _point_key(o))
        if holder != _point_key(o):
            names[i] += "+h" + hashlib.sha256(_point_key(o).encode()).hexdigest()[:8]
            taken.setdefault(names[i], _point_key(o))
    return names


@dataclass(frozen=True)
class Point:
    index: int
    name: str
    overrides: Overrides


def expand(overrides_list: Sequence[Overrides]) -> list[Point]:
    """Numbered, named points (``_distinct_names``); a point repeated with the same values is an error."""
    names = _distinct_names(overrides_list)
    points = [Point(i, name, dict(o)) for i, (o, name) in enumerate(zip(overrides_list, names))]
    names = [p.name for p in points]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(
            f"sweep has points with the same workdir name: {', '.join(dup)} (the same values repeated; "
            "drop the repeats with unique())"
        )
    return points


def select(points: Sequence[Point], spec: str | None) -> list[Point]:
    """Points chosen by ``spec``: None = all, else indices and ranges: ``3``, ``0,2``, ``4-7``."""
    if spec is None:
        return list(points)
    chosen: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"--index {spec!r}: expected indices like 3, 0,2 or 4-7")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ConfigError(f"--index {spec!r}: range {part} is empty")
        chosen.extend(range(lo, hi + 1))
    bad = [i for i in chosen if not 0 <= i < len(points)]
    if bad:
        raise ConfigError(
            f"--index {bad[0]} is out of range: the sweep has {len(points)} points (0..{len(points) - 1})"
        )
    return [points[i] for i in dict.fromkeys(chosen)]


# ---------------------------------------------------------------------------
# Loading a sweep from its config file
# ---------------------------------------------------------------------------


def load_sweep(spec: str) -> list[Point]:
    """The points of ``path/to/config.py[:ARG]``'s ``get_sweep(ARG)``; a sweep of no points is refused."""
    points = expand(call_config_function(spec, "get_sweep", ": it is not a sweep"))
    if not points:
        raise ConfigError(f"{spec}: get_sweep returned no points, so there is nothing to run")
    return points


def point_config(spec: str, point: Point, base_overrides: Overrides | None = None):
    """The locked experiment config of a point: the file's config, the sweep-wide overrides, the point's."""
    config = load_config(spec)
    apply_overrides(config, dict(base_overrides or {}))
    try:
        apply_overrides(config, point.overrides)
    except ConfigError as e:
        raise ConfigError(f"sweep point {point.index} ({point.name}): {e}") from None
    return config


def default_sweep_dir(spec: str) -> str:
    return str(Path("runs") / "sweeps" / run_name(spec))


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def train_command(
    spec: str,
    point: Point,
    sweep_dir: str | os.PathLike,
    base_overrides: Overrides | None = None,
    python: str = "python",
) -> str:
    """A self-contained shell command that trains one point with experiments.train.

    Values are written so that ``--config.KEY=VALUE`` parses back to the same
    value (``apply_overrides`` converts by the field's type).
    """
    args = [python, "-m", "experiments.train", "--config", spec]
    for key, value in {**(base_overrides or {}), **point.overrides}.items():
        text = repr(value) if isinstance(value, float) else _format_value(value)
        args.append(f"--config.{key}={text}")
    args += ["--workdir", str(Path(sweep_dir) / point.name), "--no-progress"]
    return shlex.join(args)


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def _is_writer() -> bool:
    import jax

    return jax.process_index() == 0  # a point spanning several hosts: process 0 keeps the records


def read_point_status(sweep_dir: str | os.PathLike, point: Point) -> dict:
    """A point's recorded status; ``done`` whenever its summary.json exists."""
    run = RunDir(Path(sweep_dir) / point.name)
    record = {"index": point.index, "name": point.name, "overrides": point.overrides, "status": "pending"}
    record.update(run.read_point_record() or {})
    if run.has_summary():
        record["status"] = "done"
    elif lock_holder(run.path) is not None:
        record["status"] = "running"  # a trainer holds the point's lock (here or on another host)
    elif record["status"] in ("running", "done"):
        # "done" without summary.json: the run's outputs were removed or are partial; rerun it
        record["status"] = "interrupted"
    record["index"] = point.index  # the sweep's current numbering wins over a stale file
    return record


def write_status(sweep_dir: str | os.PathLike, points: Sequence[Point]) -> dict:
    """Rebuild ``<sweep dir>/status.json`` from the points' own files (safe with one writer per point)."""
    records = [read_point_status(sweep_dir, p) for p in points]
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    payload = {"counts": counts, "points": records}
    if _is_writer():
        write_json(Path(sweep_dir) / STATUS_FILE, payload)
    return payload


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _PointRecords:
    """A point's sweep_point.json while it runs: what it is, then how it ended."""

    def __init__(self, spec: str, point: Point, sweep_dir, base_overrides: Overrides | None, resumed: bool):
        self.run = RunDir(Path(sweep_dir) / point.name)
        self.point = point
        self.record = {
            "index": point.index,
            "name": point.name,
            "overrides": point.overrides,
            "command": train_command(spec, point, sweep_dir, base_overrides),
        }
        self.resumed = resumed
        self.t0 = time.time()

    def write(self, **status) -> dict:
        out = {**self.record, **status}
        if _is_writer():
            self.run.write_point_record(out)
        return out

    def start(self) -> None:
        self.run.create()
        self.t0 = time.time()
        # Where it runs: which machine and process to look at (or kill) while it does.
        self.write(status="running", started=self.t0, host=socket.gethostname(), pid=os.getpid())

    def finish(self, status: dict, log: Callable[[str], None]) -> dict:
        out = self.write(**status, seconds=round(time.time() - self.t0, 1))
        p = self.point
        if out["status"] != "done":
            log(f"[{p.index}] {p.name}: {out['status']}: {out.get('error', '')[:300]}")
        else:
            log(f"[{p.index}] {p.name}: done in {out['seconds']:.0f} s")
        return out


def _failure(e: BaseException) -> dict:
    return {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def run_point(
    spec: str,
    point: Point,
    sweep_dir: str | os.PathLike,
    *,
    base_overrides: Overrides | None = None,
    text: str | None = None,
    progress: bool = False,
    train_fn: Callable | None = None,
    log: Callable[[str], None] = _log,
) -> dict:
    """Train one point (or skip it when finished); never raises for a failed run: returns its record."""
    from attention_jax.lab.loop import TrainingDiverged, train

    train_fn = train_fn or train
    previous = read_point_status(sweep_dir, point)
    if previous["status"] in FINISHED:
        log(f"[{point.index}] {point.name}: {previous['status']}, skipped")
        return previous
    records = _PointRecords(spec, point, sweep_dir, base_overrides, previous["status"] in ("interrupted", "failed"))
    log(f"[{point.index}] {point.name}: {'resuming' if records.resumed else 'starting'}")
    records.start()
    try:
        config = point_config(spec, point, base_overrides)
        summary = train_fn(config, records.run.path, text=text, progress=progress)
        status = {"status": "done", "final_val_loss": summary.get("final_val_loss")}
    except TrainingDiverged as e:
        status = {"status": "diverged", "error": str(e)}
    except KeyboardInterrupt:
        records.write(status="interrupted", seconds=round(time.time() - records.t0, 1))
        raise
    except Exception as e:  # record and go on with the next point
        status = _failure(e)
    return records.finish(status, log)


# ---------------------------------------------------------------------------
# Grouping points into populations
# ---------------------------------------------------------------------------


def _group_key(parts: Parts, sweep_dir: str | os.PathLike, point: Point) -> str | None:
    """What points of one program share: their parts without member values, and the step they resume from."""
    if parts.population.is_population:  # already a population of its own
        return None
    step = RunDir(Path(sweep_dir) / point.name).latest_checkpoint_step()
    return repr((shared(parts), step))


def group_points(
    spec: str, points: Sequence[Point], sweep_dir: str | os.PathLike, base_overrides: Overrides | None = None
) -> list[list[Point]]:
    """The points as groups that can train in one program (in sweep order; a bad config stays alone)."""
    groups: dict[str, list[Point]] = {}
    order: list[list[Point]] = []
    for point in points:
        try:
            # Not validated here (a bad point fails alone, with its message, when it runs); no JAX call either:
            # the Ray driver groups before it starts JAX.
            key = _group_key(resolve(point_config(spec, point, base_overrides), validate=False), sweep_dir, point)
        except ConfigError:
            key = None
        if key is None:
            order.append([point])
        elif key in groups:
            groups[key].append(point)
        else:
            groups[key] = [point]
            order.append(groups[key])
    return order


def group_config(configs: list) -> Any:
    """The config of one program for the points of ``configs``: the first, with a population entry per point."""
    entries = tuple(member_entry(resolve(c, validate=False)) for c in configs)
    config = configs[0].copy_and_resolve_references()
    config.lock()
    return apply_overrides(config, {"population": entries})


def run_group(
    spec: str,
    points: Sequence[Point],
    sweep_dir: str | os.PathLike,
    *,
    base_overrides: Overrides | None = None,
    text: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = _log,
) -> list[dict]:
    """Train ``points`` as one population, each into its own run directory; returns their records."""
    from attention_jax.lab.loop import Output, TrainingDiverged, train_parts

    todo = [p for p in points if read_point_status(sweep_dir, p)["status"] not in FINISHED]
    if len(todo) < 2:
        return [run_point(spec, p, sweep_dir, base_overrides=base_overrides, text=text, progress=progress, log=log)
                for p in points]  # fmt: skip
    names = ", ".join(str(p.index) for p in todo)
    log(f"[{names}] {len(todo)} points in one program")
    records = []
    for p in todo:
        status = read_point_status(sweep_dir, p)["status"]
        records.append(_PointRecords(spec, p, sweep_dir, base_overrides, status in ("interrupted", "failed")))
        records[-1].start()
    try:
        import jax

        configs = [point_config(spec, p, base_overrides) for p in todo]
        parts = resolve(group_config(configs), device_count=jax.device_count())  # once, for the whole program
        k = parts.run.num_seeds
        outputs = [Output(r.run, c, list(range(j * k, (j + 1) * k))) for j, (r, c) in enumerate(zip(records, configs))]
        results = train_parts(parts, outputs, text=text, progress=progress)  # the points have no population
        statuses = [
            {"status": "diverged", "error": r["diverged"]} if "diverged" in r
            else {"status": "done", "final_val_loss": r.get("final_val_loss")}
            for r in results
        ]  # fmt: skip
    except TrainingDiverged as e:
        statuses = [{"status": "diverged", "error": str(e)}] * len(todo)
    except KeyboardInterrupt:
        for r in records:
            r.write(status="interrupted", seconds=round(time.time() - r.t0, 1))
        raise
    except Exception as e:  # record and go on with the next group
        statuses = [_failure(e)] * len(todo)
    return [r.finish(status, log) for r, status in zip(records, statuses)]


def write_sweep_file(spec: str, all_points: Sequence[Point], sweep_dir: Path, base_overrides: Overrides | None) -> None:
    """``<sweep dir>/sweep.json``: the config, the sweep-wide overrides and every point (creates the sweep dir)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if _is_writer():
        payload = {"config": spec, "base_overrides": base_overrides or {}, "points": [p.__dict__ for p in all_points]}
        write_json(sweep_dir / SWEEP_FILE, payload)


def record_failure(spec: str, point: Point, sweep_dir, base_overrides: Overrides | None, error: str) -> dict:
    """Record ``point`` as failed from outside its run (a backend whose worker died), as ``run_point`` would."""
    records = _PointRecords(spec, point, sweep_dir, base_overrides, resumed=False)
    records.t0 = (records.run.read_point_record() or {}).get("started", records.t0)  # when its run started
    return records.finish({"status": "failed", "error": error}, _log)


def run_sweep(
    spec: str,
    points: Sequence[Point],
    sweep_dir: str | os.PathLike,
    *,
    all_points: Sequence[Point] | None = None,
    base_overrides: Overrides | None = None,
    text: str | None = None,
    progress: bool = False,
    train_fn: Callable | None = None,
    group: bool = True,
) -> dict:
    """Run ``points``; returns status.json's payload (over ``all_points``).

    With ``group`` (and no ``train_fn``), points that differ only in member
    values train together (``group_points``); else one after another. A point
    that fails is recorded and the others still run.
    """
    sweep_dir = Path(sweep_dir)
    all_points = list(all_points or points)
    write_sweep_file(spec, all_points, sweep_dir, base_overrides)
    t0 = time.time()
    kw = dict(base_overrides=base_overrides, text=text, progress=progress)
    programs = (
        group_points(spec, points, sweep_dir, base_overrides) if group and train_fn is None else [[p] for p in points]
    )
    for points_of_one_program in programs:
        with contextlib.ExitStack() as locks:
            mine = []
            for point in points_of_one_program:
                try:  # the point's lock, around its records too: a point trained elsewhere is left alone
                    locks.enter_context(RunDir(sweep_dir / point.name).lock(enabled=_is_writer()))
                    mine.append(point)
                except WorkdirBusy as e:
                    print(f"[{point.index}] {point.name}: skipped: {e}", file=sys.stderr, flush=True)
            if len(mine) > 1:
                run_group(spec, mine, sweep_dir, **kw)
            elif mine:
                run_point(spec, mine[0], sweep_dir, train_fn=train_fn, **kw)
        write_status(sweep_dir, all_points)
    status = write_status(sweep_dir, all_points)
    status["seconds"] = round(time.time() - t0, 1)
    return status


def describe(points: Sequence[Point], sweep_dir: str | os.PathLike | None = None) -> str:
    """A table of the points (index, status when a sweep dir is given, name)."""
    lines = []
    width = len(str(max(len(points) - 1, 0)))
    for p in points:
        state = f"{read_point_status(sweep_dir, p)['status']:<12}" if sweep_dir is not None else ""
        lines.append(f"{p.index:>{width}}  {state}{p.name}")
    return "\n".join(lines)
