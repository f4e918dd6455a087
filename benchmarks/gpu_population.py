"""One prepared run for a GPU machine: populations on the device, their speed, then the tuned grid as time allows.

    python -m benchmarks.gpu_population --out DIR [--budget 420] [--steps 200]

1. Correctness on the device: a population of 3 members (different learning
   rates and seeds) trained 20 steps equals each member trained alone
   (max relative difference of the losses, float32).
2. Speed: ``benchmarks.population`` on the accelerator ablation model
   (``configs/ablate_scale.py``: 4 layers, n_embd 256, block 128, batch 32,
   bfloat16) for K in {4, 16, 64} members, both sides in this run, with JAX's
   persistent compilation cache on (as the command-line tools run: the K
   separate runs share one compiled program through it).
3. The tuned grid (``configs/ablate_scale.py:tuned``), one population program
   per (arm, head size) of design a, in order, while ``--budget`` seconds of
   this script's time are left; every finished program's points are complete
   run directories, reported with ``python -m experiments.report``.

Writes DIR/gpu_population.json (every figure, as it goes) and
DIR/tuned_runs.tar.gz: the sweep dir of step 3 (trained in /tmp/gpu_tuned)
without its checkpoints (config.json, metrics.jsonl, summary.json and the
sweep records of every point), enough for ``experiments.report --no-entropy``.
It never asserts: a failing part is recorded and the rest still runs.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import jax
import numpy as np


def log(report: dict, key: str, value, out: Path) -> None:
    report[key] = value
    print(f"{key}: {json.dumps(value)}", flush=True)
    (out / "gpu_population.json").write_text(json.dumps(report, indent=2))


def synthetic_text(n: int = 200_000) -> str:
    rng = np.random.default_rng(0)
    return "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz .,\n"), size=n))


def check_members_equal_separate_runs(variant: str) -> dict:
    from attention_jax.lab import population
    from attention_jax.lab.config import apply_overrides, load_config
    from attention_jax.lab.loop import train

    config = load_config(f"configs/ablate_scale.py{variant}")
    entries = ({"learning_rate": 1e-3, "seed": 1}, {"learning_rate": 3e-3, "seed": 2}, {"learning_rate": 5e-4})
    apply_overrides(config, {"num_seeds": 1, "max_iters": 20, "eval_interval": 10, "log_interval": 10,
                             "checkpoint_every": 20, "steps_per_call": 10, "eval_iters": 4, "model.dtype": "float32",
                             "population": entries})  # fmt: skip
    text = synthetic_text()
    pop = train(config, "/tmp/gpu_pop/population", text=text, progress=False)
    worst = 0.0
    for m in population.members(config):
        alone = train(population.member_config(config, m), f"/tmp/gpu_pop/alone{m.index}", text=text, progress=False)
        for key in ("final_train_loss", "final_val_loss", "full_val_loss"):
            a, b = pop[key][m.index], alone[key][0]
            worst = max(worst, abs(a - b) / abs(b))
    return {"max_relative_difference": worst, "members": len(entries)}


def pack_runs(sweep_dir: Path, out: Path) -> None:
    """The sweep dir's small files (no checkpoints) as out/tuned_runs.tar.gz."""
    import tarfile

    keep = {"config.json", "metrics.jsonl", "summary.json", "sweep_point.json", "status.json", "sweep.json"}
    with tarfile.open(out / "tuned_runs.tar.gz", "w:gz") as tar:
        for path in sorted(sweep_dir.rglob("*")):
            if path.is_file() and path.name in keep:
                tar.add(path, arcname=str(path.relative_to(sweep_dir.parent)))


def tuned_grid(
    out: Path, deadline: float, variant: str, report: dict, sweep_dir: Path = Path("/tmp/gpu_tuned")
) -> dict:
    """Design a of the tuned sweep, one program per (D, qk_norm), until ``deadline``; packed after each."""
    from attention_jax.lab import sweep as sw

    spec = f"configs/ablate_scale.py:{variant}"
    points = [p for p in sw.load_sweep(spec) if "model.head_size" not in p.overrides]  # design a
    sweep_dir.mkdir(parents=True, exist_ok=True)
    groups = sw.group_points(spec, points, sweep_dir)
    # Head sizes in the order 8, 128, 32, 16, 64 (both programs of one D before the next D): a run cut
    # short by the budget still compares all arms, at the extremes of D first.
    rank = {8: 0, 128: 1, 32: 2, 16: 3, 64: 4}
    model = {g[0].name: sw.point_config(spec, g[0]).model for g in groups}
    groups.sort(key=lambda g: rank.get(model[g[0].name].n_embd // model[g[0].name].n_head, 5))
    done = []
    for group in groups:
        if time.time() > deadline:
            break
        t0 = time.time()
        records = sw.run_group(spec, group, sweep_dir, progress=False)
        done.append({"points": len(records), "status": sorted({r["status"] for r in records}),
                     "head_size": model[group[0].name].n_embd // model[group[0].name].n_head,
                     "seconds": round(time.time() - t0, 1)})  # fmt: skip
        sw.write_status(sweep_dir, points)
        pack_runs(sweep_dir, out)
        log(report, "tuned_grid_progress", {"programs_done": len(done), "programs_total": len(groups),
                                            "programs": done}, out)  # fmt: skip
    return {"programs_done": len(done), "programs_total": len(groups), "programs": done}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=200, help="steps per model and side in the speed comparison")
    parser.add_argument("--members", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--budget", type=float, default=420.0, help="seconds of this script after which step 3 stops")
    parser.add_argument("--smoke", action="store_true", help="the smoke variants: checks the script on a CPU")
    args = parser.parse_args()
    variant, tuned_variant = (":smoke", "tuned_smoke") if args.smoke else ("", "tuned")
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from attention_jax.lab.cli import enable_compilation_cache

    enable_compilation_cache()
    report: dict = {}
    log(report, "devices", [d.device_kind for d in jax.devices()], out)
    log(report, "jax", jax.__version__, out)
    try:
        log(report, "population_equals_separate", check_members_equal_separate_runs(variant), out)
    except Exception:
        log(report, "population_equals_separate_failed", traceback.format_exc()[-1500:], out)
    try:
        from attention_jax.lab.config import apply_overrides, load_config
        from benchmarks import population as bench

        config = apply_overrides(load_config(f"configs/ablate_scale.py{variant}"), {"num_seeds": 1})
        text = synthetic_text()
        for k in args.members:
            log(report, f"population_vs_separate_K{k}", bench.compare(config, k, text, args.steps), out)
    except Exception:
        log(report, "population_speed_failed", traceback.format_exc()[-1500:], out)
    try:
        log(report, "tuned_grid", tuned_grid(out, start + args.budget, tuned_variant, report), out)
    except Exception:
        log(report, "tuned_grid_failed", traceback.format_exc()[-1500:], out)
    log(report, "script_seconds", round(time.time() - start, 1), out)


if __name__ == "__main__":
    main()
