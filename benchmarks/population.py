"""A population of K models in one program against K separate runs, end to end and per step, side by side.

    python -m benchmarks.population --config configs/ablate_scale.py:cpu --members 4 16 64 --steps 100
    python -m benchmarks.population --config configs/ablate_scale.py --members 4 16 64 --synthetic   # accelerator

The K models differ as the points of a tuning sweep do: K learning rates
spread log-uniformly over a decade around the config's, each with its own
seed. Side "population": one Experiment whose config lists the K members
(``population``), compiled once, trained ``--steps`` optimizer steps. Side
"separate": K Experiments of one member each (``population.member_config``),
each compiled and trained ``--steps`` steps one after another, as a sweep of K
points runs without grouping. Both sides use the real jitted training
program (``experiment.train_program``, ``steps_per_call`` steps per call);
every call is blocked on before the clock stops.

Printed per K, both sides from this one run: the end-to-end seconds (building
the experiment, compiling, training), the compile seconds, the steady-state
milliseconds per optimizer step of all K models (median over the timed calls
after one warm-up call), and models per hour = K / end-to-end seconds x 3600.
``ratio`` is separate / population: how many times more models per hour the
population trains. The last line is JSON with every figure. Compilation is
not cached across the separate runs (each traces and compiles, as separate
processes without a shared cache would); ``--cache`` turns JAX's persistent
compilation cache on for both sides, as the command-line tools do.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import numpy as np

from attention_jax.lab import cli, population
from attention_jax.lab import experiment as ex
from attention_jax.lab.config import apply_overrides, load_config, parse_override_args


def members_config(config, k: int):
    """``config`` with a population of ``k`` members: learning rates log-spaced over a decade, one seed each."""
    lrs = config.learning_rate * np.logspace(-0.5, 0.5, k)
    entries = tuple(
        {"learning_rate": float(lr), "min_lr": float(lr) / 10, "seed": config.seed + i} for i, lr in enumerate(lrs)
    )
    c = config.copy_and_resolve_references()
    c.lock()
    return apply_overrides(c, {"population": entries, "num_seeds": 1})


def timed_run(config, text: str | None, steps: int) -> dict:
    """Build, compile and train ``config`` for ``steps`` steps; seconds of each part, and ms per step."""
    ex.clear_programs()  # this process's programs: each run builds its own, as a separate process would
    t0 = time.perf_counter()
    exp = ex.Experiment.from_config(config, text=text)
    state = ex.init_state(exp)
    program = ex.train_steps(exp, config.steps_per_call, state)
    jax.block_until_ready(state)
    t_compiled = time.perf_counter()
    calls = max(steps // config.steps_per_call, 2)
    per_call = []
    for _ in range(calls):
        t = time.perf_counter()
        state, out = program(state)
        jax.block_until_ready(out)
        per_call.append(time.perf_counter() - t)
    end = time.perf_counter()
    return {
        "end_to_end_s": end - t0,
        "compile_s": t_compiled - t0,
        "ms_per_step": 1000 * statistics.median(per_call[1:]) / config.steps_per_call,
        "steps": calls * config.steps_per_call,
        "finite": bool(np.isfinite(np.asarray(out["loss"])).all()),
    }


def compare(config, k: int, text: str | None, steps: int, separate_runs: int | None = None) -> dict:
    """Both sides for K = ``k``. ``separate_runs`` < k times only that many of the K separate runs (the
    first ones) and scales their sum by k / separate_runs: each separate run is the same work, so their
    rate does not depend on K; the row says how many were timed."""
    pop_config = members_config(config, k)
    pop = timed_run(pop_config, text, steps)
    timed = population.members(pop_config)[: separate_runs or k]
    separate = [timed_run(population.member_config(pop_config, m), text, steps) for m in timed]
    scale = k / len(separate)
    sep = {
        "end_to_end_s": scale * sum(r["end_to_end_s"] for r in separate),
        "compile_s": scale * sum(r["compile_s"] for r in separate),
        "ms_per_step": scale * sum(r["ms_per_step"] for r in separate),  # one step of each of the K models
        "steps": separate[0]["steps"],
        "finite": all(r["finite"] for r in separate),
        "runs_timed": len(separate),
    }
    row = {"members": k}
    for name, side in (("population", pop), ("separate", sep)):
        row[name] = {key: round(v, 3) if isinstance(v, float) else v for key, v in side.items()}
        row[name]["models_per_hour"] = round(3600 * k / side["end_to_end_s"], 1)
    row["ratio_end_to_end"] = round(sep["end_to_end_s"] / pop["end_to_end_s"], 2)
    row["ratio_per_step"] = round(sep["ms_per_step"] / pop["ms_per_step"], 2)
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'K':>4}  {'side':<10} {'end-to-end s':>12} {'build+compile s':>15} {'ms/step (K models)':>19} "
          f"{'models/hour':>12}")  # fmt: skip
    for r in rows:
        for name in ("population", "separate"):
            s = r[name]
            print(f"{r['members']:>4}  {name:<10} {s['end_to_end_s']:>12.1f} {s['compile_s']:>15.1f} "
                  f"{s['ms_per_step']:>19.2f} {s['models_per_hour']:>12,.0f}")  # fmt: skip
        timed = r["separate"]["runs_timed"]
        note = f" (separate: {timed} of {r['members']} runs timed, scaled)" if timed < r["members"] else ""
        print(f"{'':>4}  population: {r['ratio_end_to_end']}x the models per hour, {r['ratio_per_step']}x per step"
              + note)  # fmt: skip


@cli.main_wrapper
def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m benchmarks.population", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/ablate_scale.py:cpu")
    parser.add_argument("--members", type=int, nargs="+", default=[4, 16, 64], help="population sizes K")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per model and side")
    parser.add_argument("--synthetic", action="store_true", help="random characters instead of the config's dataset")
    parser.add_argument("--cache", action="store_true", help="JAX's persistent compilation cache on, both sides")
    parser.add_argument(
        "--separate-runs", type=int, help="time only this many of the K separate runs and scale (default: all K)"
    )
    parser.add_argument("--json", help="also write the result here")
    args, rest = parser.parse_known_args(argv)
    if min(args.members) < 1 or args.steps < 1 or (args.separate_runs is not None and args.separate_runs < 1):
        raise ValueError("--members, --steps and --separate-runs must be positive")
    config = load_config(args.config)
    apply_overrides(config, {**parse_override_args(rest), "num_seeds": 1})
    if not args.cache:
        jax.config.update("jax_compilation_cache_dir", None)  # main_wrapper turned it on; each run compiles
    text = None
    if args.synthetic:
        rng = np.random.default_rng(0)
        text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz .,\n"), size=200_000))
    rows = []
    for k in args.members:
        rows.append(compare(config, k, text, args.steps, args.separate_runs))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {
        "config": args.config,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "cache": args.cache,
        "rows": rows,
    }
    print_table(rows)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
