"""Run a sweep defined by a config file's ``get_sweep(arg)``.

    python -m experiments.sweep --config configs/ablate_scale.py:cpu [--dry-run]
        [--index I] [--print-commands] [--workdir DIR] [--config.KEY=VALUE ...]

Without flags every point runs here, one after another, each in
``DIR/<point name>``: finished points are skipped, interrupted ones resume from
their checkpoint, a failed point is recorded (``DIR/status.json``) and the rest
go on. ``--index I`` (also ``0,3`` or ``4-7``) runs only those points: one
array-job task or one cloud TPU VM per point. ``--dry-run`` lists the points
and their status; ``--print-commands`` prints one self-contained
``experiments.train`` command per point. ``--config.KEY=VALUE`` applies to
every point. The exit status is 1 when a selected point failed or diverged.
"""

from __future__ import annotations

import sys

from attention_jax import cli
from attention_jax.config_utils import load_config, parse_override_args


@cli.main_wrapper
def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m experiments.sweep", description="Run the points of a sweep.")
    parser.add_argument("--config", required=True, help="config file with get_sweep(arg), optionally :VARIANT")
    parser.add_argument("--workdir", help="sweep directory, one subfolder per point (default runs/sweeps/<config>)")
    parser.add_argument("--index", help="run only these points: I, I,J or I-J (0-based, see --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="list the points and their status; train nothing")
    parser.add_argument("--print-commands", action="store_true", help="print one experiments.train command per point")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per point")
    args, rest = parser.parse_known_args(argv)
    base_overrides = parse_override_args(rest)

    from attention_jax import sweep as sweep_lib

    points = sweep_lib.load_sweep(args.config)
    chosen = sweep_lib.select(points, args.index)
    for point in chosen:  # every point's config must be valid before anything runs
        sweep_lib.point_config(args.config, point, base_overrides)
    sweep_dir = args.workdir or sweep_lib.default_sweep_dir(args.config)
    if args.print_commands:
        for point in chosen:
            print(sweep_lib.train_command(args.config, point, sweep_dir, base_overrides))
        return 0
    if args.dry_run:
        print(sweep_lib.describe(chosen, sweep_dir))
        print(f"{len(chosen)} of {len(points)} points; sweep dir {sweep_dir}", file=sys.stderr)
        return 0
    config = load_config(args.config)
    if base_overrides.get("distributed", str(config.get("distributed", False))).lower() in ("true", "1", "yes"):
        import jax  # pragma: no cover - multi-host only

        jax.distributed.initialize()  # before any other JAX call; every host runs this same command

    status = sweep_lib.run_sweep(
        args.config,
        chosen,
        sweep_dir,
        all_points=points,
        base_overrides=base_overrides,
        progress=args.progress,
    )
    bad = [r for r in status["points"] if r["index"] in {p.index for p in chosen} and r["status"] not in ("done",)]
    print(f"sweep: {status['counts']} in {status['seconds']:.0f} s; status in {sweep_dir}/status.json", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
