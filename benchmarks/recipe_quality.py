"""Final val loss of a training recipe over several seeds: JAX next to an independent PyTorch implementation.

    python -m benchmarks.recipe_quality --config configs/shakespeare_char.py:cpu --seeds 8 --seed 2000
    python -m benchmarks.recipe_quality --seeds 3 --side jax           # JAX only (no torch needed)

A single run's val loss moves by about 0.008 (sd) from seed to seed on the cpu
recipe, and the ``eval_iters`` random-crop estimate adds sampling noise on
top, so one number cannot say whether a recipe reaches a target such as
nanoGPT's 1.88. This
script trains K seeds and reports each seed's loss over the *whole*
validation split (every token predicted once, in windows of block_size, as
:func:`attention_jax.lab.steps.full_split_loss`), their mean, standard
deviation and standard error, and how many seeds are at or below --target.

Side "jax": one :class:`attention_jax.lab.experiment.Experiment` with num_seeds=K (the
real train step, vmapped over seeds seed..seed+K-1). Side "torch": K runs of
:class:`benchmarks.torch_reference.TorchTrainer` (eager PyTorch, written
apart from the JAX code; torch's own RNG for init and batches). With both
sides, Welch's t of the difference of means is printed too: |t| below about 2
means the two implementations are not distinguishable at this K. The last
line is one JSON object with every figure (losses to 6 decimals); --json
writes it before --plot draws it. --from_json trains nothing: it reads one or
more saved results of the same recipe, merges their seeds, and prints (and
--json / --plot) the merged result.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

import jax
import numpy as np

from attention_jax.lab import cli
from attention_jax.lab import experiment as ex
from attention_jax.lab.config import apply_overrides, load_config, parse_override_args


def _summary(losses: list[float], target: float) -> dict:
    losses = [round(float(x), 6) for x in losses]  # the stored values; counts and stats use exactly these
    sd = statistics.stdev(losses) if len(losses) > 1 else float("nan")
    return {
        "full_val_loss": losses,
        "mean": round(statistics.fmean(losses), 4),
        "sd": round(sd, 4),
        "se": round(sd / math.sqrt(len(losses)), 4),
        "at_or_below_target": sum(x <= target for x in losses),
    }


def run_jax(exp: ex.Experiment) -> tuple[list[float], float]:
    """Train ``exp``'s seeds (vmapped) for max_iters steps -> whole-split val loss per seed, seconds."""
    c = exp.parts.run
    t0 = time.perf_counter()
    state = ex.init_state(exp)
    per_call = c.steps_per_call if c.max_iters % c.steps_per_call == 0 else 1
    step = ex.train_steps(exp, per_call)
    for _ in range(c.max_iters // per_call):
        state, _ = step(state)
    losses = jax.device_get(ex.full_split_loss(exp, state.params, exp.val_data))
    return [float(x) for x in losses], time.perf_counter() - t0


def run_torch(exp: ex.Experiment) -> tuple[list[float], float]:
    """The same seeds, model, data and optimizer in eager PyTorch, one seed after another."""
    from benchmarks import torch_reference

    train, val = jax.device_get(exp.train_data), jax.device_get(exp.val_data)
    losses, t0 = [], time.perf_counter()
    for seed in exp.seeds:
        ref = torch_reference.TorchTrainer(exp.parts, exp.model_config, train, seed=seed)
        for _ in range(exp.parts.run.max_iters):
            ref.step()
        losses.append(torch_reference.full_split_loss(ref.model, val, exp.model_config.block_size))
        print(f"torch seed {seed}: whole val split {losses[-1]:.4f}", flush=True)
    return losses, time.perf_counter() - t0


def compare(result: dict) -> None:
    """Add the JAX - torch difference of means and Welch's t to ``result`` (when it has both sides)."""
    if "jax" in result and "torch" in result:
        a, b = result["jax"]["full_val_loss"], result["torch"]["full_val_loss"]
        diff = statistics.fmean(a) - statistics.fmean(b)
        se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
        result["jax_minus_torch"] = round(diff, 4)
        result["welch_t"] = round(diff / se, 2) if se > 0 else None


def print_table(result: dict) -> None:
    target = result["target"]
    print(f"{'side':<6} {'mean':>7} {'sd':>7} {'se':>7} {'<= ' + str(target):>8}  per seed (whole val split)")
    for side in ("jax", "torch"):
        if side in result:
            r = result[side]
            per_seed = " ".join(f"{x:.4f}" for x in r["full_val_loss"])
            below = f"{r['at_or_below_target']}/{len(r['full_val_loss'])}"
            print(f"{side:<6} {r['mean']:>7.4f} {r['sd']:>7.4f} {r['se']:>7.4f} {below:>8}  {per_seed}")
    if "welch_t" in result:
        print(f"jax - torch = {result['jax_minus_torch']:+.4f} (Welch t = {result['welch_t']})")


def plot(result: dict, path: str) -> None:
    """One dot per seed and side, the mean with a +-2 se bar, and the target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [s for s in ("jax", "torch") if s in result]
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for i, side in enumerate(sides):
        r = result[side]
        losses = r["full_val_loss"]
        jitter = np.random.default_rng(i).uniform(-0.12, 0.12, len(losses))  # spread the dots, fixed per side
        ax.scatter(i + jitter, losses, s=18, color=f"C{i}", alpha=0.8, label=f"{side}: {len(losses)} seeds")
        ax.errorbar(i + 0.3, r["mean"], yerr=2 * r["se"], fmt="o", color="black", capsize=3)
    ax.axhline(result["target"], ls="--", color="grey", lw=1, label=f"target {result['target']}")
    ax.set_xticks(range(len(sides)), sides)
    ax.set_xlim(-0.5, len(sides) - 0.3)
    ax.set_ylabel("final val loss (whole split)")
    ax.set_title(f"{result['config']}, {result['steps']} steps; black: mean ± 2 se", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(results: list[dict]) -> dict:
    """One result from several runs of the same recipe and target: seeds and per-seed losses concatenated."""
    first = results[0]
    for r in results[1:]:
        for key in ("config", "steps", "target"):
            if r.get(key) != first.get(key):
                raise ValueError(f"cannot merge results with different {key}: {first.get(key)!r} and {r.get(key)!r}")
    seeds = [s for r in results for s in r["seeds"]]
    shared = sorted(s for s in set(seeds) if seeds.count(s) > 1)
    if shared:
        raise ValueError(f"cannot merge results that share seeds: {shared}")
    merged = {key: first[key] for key in ("config", "steps", "target")} | {"seeds": seeds}
    for side in ("jax", "torch"):
        if all(side in r for r in results):
            merged[side] = _summary([x for r in results for x in r[side]["full_val_loss"]], first["target"])
    if len(results) > 1:
        merged["merged_from"] = [r.get("source", r["seeds"]) for r in results]
    compare(merged)
    return merged


@cli.main_wrapper
def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m benchmarks.recipe_quality", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/shakespeare_char.py:cpu")
    parser.add_argument("--seeds", type=int, default=8, help="K")
    parser.add_argument("--seed", type=int, default=2000, help="first seed")
    parser.add_argument("--side", choices=("both", "jax", "torch"), default="both")
    parser.add_argument("--target", type=float, default=1.88)
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--plot", help="also draw the per-seed losses into this image (.png)")
    parser.add_argument("--from_json", nargs="+", help="train nothing: merge and print results written by --json")
    args, rest = parser.parse_known_args(argv)
    if args.from_json:
        if rest:
            raise ValueError(f"--from_json trains nothing; drop {' '.join(rest)}")
        results = []
        for path in args.from_json:
            with open(path) as f:
                results.append(json.load(f))
        result = merge(results) if len(results) > 1 else results[0]
    else:
        result = measure(args, rest)
    print_table(result)
    print(json.dumps(result))
    if args.json:  # before plotting: a failing plot must not lose a long run's result
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(result, args.plot)
    return 0


def measure(args, rest: list[str]) -> dict:
    if args.seeds < 2:
        raise ValueError("--seeds must be at least 2 (a standard deviation needs two runs)")
    overrides = parse_override_args(rest)
    clash = sorted(k for k in overrides if k in ("seed", "num_seeds"))
    if clash:
        raise ValueError(f"set seeds with --seed and --seeds, not --config.{clash[0]}")
    config = load_config(args.config)
    apply_overrides(config, {**overrides, "num_seeds": args.seeds, "seed": args.seed})
    exp = ex.Experiment.from_config(config)  # validates the config, reads and splits the data once for both sides
    if args.side in ("both", "torch"):  # fail now, not after the JAX side has trained
        import torch

        from benchmarks import torch_reference

        torch_reference.GPT.from_config(exp.model_config)
    result = {"config": args.config, "steps": config.max_iters, "seeds": exp.seeds, "target": args.target}
    if args.side in ("both", "jax"):
        losses, seconds = run_jax(exp)
        result["jax"] = {**_summary(losses, args.target), "seconds": round(seconds, 1)}
    if args.side in ("both", "torch"):
        result["torch_version"] = torch.__version__
        losses, seconds = run_torch(exp)
        result["torch"] = {**_summary(losses, args.target), "seconds": round(seconds, 1)}
    compare(result)
    return result


if __name__ == "__main__":
    sys.exit(main())
