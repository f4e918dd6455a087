"""K seeds in one vmapped program vs K separate single-seed runs, timed side by side.

    python -m benchmarks.seeds_vmap --config configs/ablate_scale.py:cpu --seeds 3 --steps 100
    python -m benchmarks.seeds_vmap --config configs/ablate_scale.py --seeds 8 --synthetic  # accelerator

Both sides use the real training step (attention_jax.lab.experiment.train_program; same
config, same per-seed batch size): side "vmapped" builds one Experiment with
num_seeds=K; side "separate" builds K Experiments with num_seeds=1 and seeds
seed, seed+1, ..., as K separate runs would. Each side is compiled (timed
apart), warmed up with one call, then runs --steps optimizer steps
(``steps_per_call`` per call; blocked until ready). The two sides run
alternately --repeats times; medians are reported. Printed: a table, then one
JSON line with ms_per_step of each side, the compile seconds, and
``speedup`` = separate / vmapped training time, ``speedup_with_compile``
including compilation. --synthetic trains on random characters (no dataset
needed; the timing does not depend on the text).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import numpy as np

from attention_jax.lab import experiment as ex
from attention_jax.lab.config import apply_overrides, load_config, parse_override_args


def _build(config, text, num_seeds, seed):
    c = apply_overrides(config.copy_and_resolve_references(), {"num_seeds": num_seeds, "seed": seed})
    exp = ex.Experiment.from_config(c, text=text)
    ex.clear_programs()  # each side compiles its own, as a separate process would
    t0 = time.perf_counter()
    state = ex.init_state(exp)
    step = ex.train_steps(exp, c.steps_per_call, state)
    compile_s = time.perf_counter() - t0
    state, _ = step(state)  # warm-up
    jax.block_until_ready(state)
    return step, state, compile_s


def _time(step, state, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        state, out = step(state)
    jax.block_until_ready((state, out))
    return time.perf_counter() - t0, state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/ablate_scale.py:cpu")
    parser.add_argument("--seeds", type=int, default=3, help="K")
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps per side and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic", action="store_true", help="random text instead of the config's dataset")
    parser.add_argument("--json", help="also write the result here")
    args, rest = parser.parse_known_args(argv)
    config = load_config(args.config)
    apply_overrides(config, parse_override_args(rest))
    text = None
    if args.synthetic:
        rng = np.random.default_rng(0)
        text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz .,\n"), size=200_000))
    calls = max(args.steps // config.steps_per_call, 1)
    steps = calls * config.steps_per_call
    K = args.seeds

    vm_step, vm_state, vm_compile = _build(config, text, K, config.seed)
    singles = [_build(config, text, 1, config.seed + i) for i in range(K)]
    sep_compile = sum(c for _, _, c in singles)
    states = [s for _, s, _ in singles]
    vm_times, sep_times = [], []
    for _ in range(args.repeats):
        dt, vm_state = _time(vm_step, vm_state, calls)
        vm_times.append(dt)
        total = 0.0
        for i, (step, _, _) in enumerate(singles):
            dt, states[i] = _time(step, states[i], calls)
            total += dt
        sep_times.append(total)
    vm, sep = statistics.median(vm_times), statistics.median(sep_times)
    result = {
        "config": args.config,
        "seeds": K,
        "steps": steps,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "vmapped_ms_per_step": round(1000 * vm / steps, 3),
        "separate_ms_per_step": round(1000 * sep / steps, 3),
        "vmapped_compile_s": round(vm_compile, 2),
        "separate_compile_s": round(sep_compile, 2),
        "speedup": round(sep / vm, 2),
        "speedup_with_compile": round((sep + sep_compile) / (vm + vm_compile), 2),
    }
    print(f"{'':<10} {'ms/step (all K seeds)':>22} {'compile s':>10}")
    print(f"{'vmapped':<10} {result['vmapped_ms_per_step']:>22.2f} {result['vmapped_compile_s']:>10.1f}")
    print(f"{'separate':<10} {result['separate_ms_per_step']:>22.2f} {result['separate_compile_s']:>10.1f}")
    print(f"speedup {result['speedup']}x (training), {result['speedup_with_compile']}x (with compilation)")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
