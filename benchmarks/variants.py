"""What each attention variant costs on a recipe's training step, and what it does to its val loss.

    python -m benchmarks.variants --cost                       # step time of every variant, side by side
    python -m benchmarks.variants --quality --seeds 3          # whole-split val loss, paired with plain
    python -m benchmarks.variants --cost --variants plain sinks window16

Cost: each variant's real compiled train step (``steps_per_call`` steps per
call, the recipe's batch) is built first; then the calls run in rounds, one
call of every variant per round, the order rotated each round, so that load
from other processes hits all alike. Printed: the median ms per step and its
ratio to "plain" (the recipe unchanged).

Quality: each variant trains ``--seeds`` seeds (seed..seed+K-1, vmapped in one
program; the same seeds for every variant, so initial batches match) for the
recipe's ``max_iters`` steps, and reports every seed's loss over the whole
validation split (``full_split_loss``), the mean, and the paired difference
from "plain" seed by seed (mean ± standard error). With K = 3 an se is a
rough figure: a difference within 2 se of 0 is "not distinguishable here".

The last line is one JSON object with every figure; ``--json`` writes it too.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

import jax

from attention_jax.lab import cli
from attention_jax.lab import experiment as ex
from attention_jax.lab.config import apply_overrides, load_config

# name -> config overrides on top of the recipe. Values are those of the sources the library cites
# where they carry over to a 64-token, D = 32 char model; otherwise stated choices.
VARIANTS: dict[str, dict] = {
    "plain": {},
    "softcap20": {"model.softcap": 20.0},  # Gemma 2 caps attention at 50; 20 binds more at this size
    "qkrms": {"model.qk_norm": "rms"},
    "qkrms0.12-nogain": {"model.qk_norm": "rms", "model.qk_norm_gain": False, "model.attn_scale": 0.12},
    "window16": {"model.window": 16},  # each query sees the last 16 of 64
    "window16/global": {"model.window": (16, None)},  # every other layer global
    "sinks": {"model.sinks": True},
    "logn0.3": {"model.logn_scale": 0.3, "model.logn_learned": True},  # 0.3·log n ~ 1 at n ~ 28
    "alibi": {"model.pos_encoding": "alibi"},  # in place of the learned table
    "z_loss1e-4": {"z_loss": 1e-4},  # PaLM's weight
}


def experiment(config_path: str, variant: str, extra: dict) -> ex.Experiment:
    config = load_config(config_path)
    apply_overrides(config, {**VARIANTS[variant], **extra})
    return ex.Experiment.from_config(config)


def measure_cost(config_path: str, variants: list[str], rounds: int, warmup: int) -> dict:
    """ms per step of every variant's compiled step, timed in rotating rounds."""
    steps, states, per_call = {}, {}, {}
    data = None
    for name in variants:
        exp = experiment(config_path, name, {})
        if data is None:
            data = exp.parts.data
        states[name] = ex.init_state(exp)
        per_call[name] = exp.parts.run.steps_per_call
        t0 = time.perf_counter()
        steps[name] = ex.train_steps(exp, per_call[name], states[name])
        print(f"  compiled {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    times = {name: [] for name in variants}

    def call(name):
        t = time.perf_counter()
        states[name], out = steps[name](states[name])
        jax.block_until_ready(out)
        return (time.perf_counter() - t) / per_call[name]

    for _ in range(warmup):
        for name in variants:
            call(name)
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for name in order:
            times[name].append(call(name))
    plain = statistics.median(times[variants[0]])
    rows = {
        name: {
            "ms_per_step": round(1e3 * statistics.median(t), 2),
            "ms_per_step_min": round(1e3 * min(t), 2),
            "ratio": round(statistics.median(t) / plain, 3),
        }
        for name, t in times.items()
    }
    return {"baseline": variants[0], "rounds": rounds, "steps_per_call": per_call[variants[0]], "rows": rows}


def measure_quality(config_path: str, variants: list[str], seeds: int, seed: int) -> dict:
    """Whole-split val loss per seed of every variant, and its paired difference from the first."""
    from benchmarks.recipe_quality import run_jax

    rows = {}
    for name in variants:
        exp = experiment(config_path, name, {"num_seeds": seeds, "seed": seed})
        losses, seconds = run_jax(exp)
        rows[name] = {"full_val_loss": [round(x, 6) for x in losses], "mean": round(statistics.fmean(losses), 4)}
        rows[name]["seconds"] = round(seconds, 1)
        print(f"  {name}: {' '.join(f'{x:.4f}' for x in losses)} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    base = rows[variants[0]]["full_val_loss"]
    for name in variants[1:]:
        d = [a - b for a, b in zip(rows[name]["full_val_loss"], base)]
        se = statistics.stdev(d) / math.sqrt(len(d))
        rows[name].update(paired_diff=round(statistics.fmean(d), 4), paired_se=round(se, 4))
    return {"baseline": variants[0], "seeds": list(range(seed, seed + seeds)), "rows": rows}


def print_tables(result: dict) -> None:
    if "cost" in result:
        c = result["cost"]
        print(f"| variant | ms per step (median of {c['rounds']} rounds) | min | vs {c['baseline']} |")
        print("|---|---:|---:|---:|")
        for name, r in c["rows"].items():
            print(f"| {name} | {r['ms_per_step']:.2f} | {r['ms_per_step_min']:.2f} | {r['ratio']:.3f}x |")
    if "quality" in result:
        q = result["quality"]
        print(f"\n| variant | whole-split val loss, seeds {q['seeds']} | mean | paired diff vs {q['baseline']} |")
        print("|---|---|---:|---:|")
        for name, r in q["rows"].items():
            diff = f"{r['paired_diff']:+.4f} ± {r['paired_se']:.4f}" if "paired_diff" in r else "-"
            print(f"| {name} | {' '.join(f'{x:.4f}' for x in r['full_val_loss'])} | {r['mean']:.4f} | {diff} |")


@cli.main_wrapper
def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m benchmarks.variants", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/shakespeare_char.py:cpu")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    parser.add_argument("--cost", action="store_true", help="time every variant's train step side by side")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (one call of every variant each)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quality", action="store_true", help="train every variant's seeds; whole-split val loss")
    parser.add_argument("--seeds", type=int, default=3, help="K seeds per variant (--quality)")
    parser.add_argument("--seed", type=int, default=2000, help="first seed (--quality)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if not (args.cost or args.quality):
        parser.error("say what to measure: --cost, --quality or both")
    if args.quality and args.seeds < 2:
        parser.error("--seeds must be at least 2 (a paired standard error needs two)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    variants = args.variants if args.variants[0] == "plain" else ["plain", *[v for v in args.variants if v != "plain"]]
    result = {"config": args.config, "variants": variants, "jax": jax.__version__, "backend": jax.default_backend()}
    if args.cost:
        result["cost"] = measure_cost(args.config, variants, args.rounds, args.warmup)
    if args.quality:
        result["quality"] = measure_quality(args.config, variants, args.seeds, args.seed)
    print_tables(result)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
