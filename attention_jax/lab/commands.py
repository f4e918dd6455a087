"""The commands: ``experiments/<name>.py`` from a clone, ``attention-jax-<name>`` after an install.

Each function parses its flags and calls the lab; ``cli.main_wrapper`` turns
bad input into one ``error:`` line and exit status 2 (every status: ``cli``).
``--config`` is a path to a config file (``configs/shakespeare_char.py:cpu``)
or the name of a shipped one (``shakespeare_char:cpu``: the files of
``configs/``, installed with the package), so the console scripts work from
any folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from attention_jax.lab import cli, distributed
from attention_jax.lab.config import ConfigError, apply_overrides, load_config, parse_override_args, run_name
from attention_jax.lab.parts import resolve_distributed

# Sampling holds every generated id in one array and decodes it at the end; a bound keeps a typo
# (1000000000) from running for hours and filling memory. 1M characters of the smoke model took
# 45 s and 0.4 GB on 2 CPU cores; Ctrl-C stops it at once (cli.exit_on_interrupt).
MAX_NEW_TOKENS = 1_000_000


def config_from_args(spec: str, rest: list[str]):
    config = load_config(spec)
    apply_overrides(config, parse_override_args(rest))
    return config


def default_workdir(spec: str) -> str:
    return str(Path("runs") / run_name(spec))


@cli.main_wrapper(interrupted=cli.INTERRUPTED_RESUMABLE)
def train(argv=None):
    """Train a model from a config file; the same command on the same workdir resumes it."""
    parser = cli.ArgumentParser(prog="attention-jax-train", description=train.__doc__, epilog=cli.overrides_epilog())
    parser.add_argument("--config", required=True, help="config file or shipped config name, optionally with :VARIANT")
    parser.add_argument("--workdir", help="where checkpoints and metrics go (default runs/<config>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = parser.parse_known_args(argv)
    config = config_from_args(args.config, rest)
    # supervised a child that trained
    if (status := distributed.launch(resolve_distributed(config), "train", argv)) is not None:
        return status
    from attention_jax.lab.loop import train as train_loop

    train_loop(config, args.workdir or default_workdir(args.config), progress=not args.no_progress)


@cli.main_wrapper
def sample(argv=None):
    """Sample text from a trained run."""
    parser = cli.ArgumentParser(prog="attention-jax-sample", description=sample.__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--max_new_tokens", type=int, default=500, help=f"1 to {MAX_NEW_TOKENS:,}")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument(
        "--top_k",
        type=top_k_arg,
        default=None,
        help="sample from the K most likely characters only (default: off; 0 or none: off)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--checkpoint", choices=("latest", "best"), default="latest")
    parser.add_argument(
        "--model_seed",
        type=int,
        default=0,
        help="which of the run's models: its member index (of num_seeds or the population)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"--max_new_tokens must be in [1, {MAX_NEW_TOKENS:,}], got {args.max_new_tokens:,}")

    from attention_jax.lab.runs import load_run
    from attention_jax.lab.sampling import check_run_dir, sample_text

    # Sampling writes nothing, so Ctrl-C may end it at once, even inside the compiled decoding loop.
    with cli.exit_on_interrupt():
        check_run_dir(args.workdir)
        run = load_run(args.workdir, which=args.checkpoint)
        if not 0 <= args.model_seed < run.num_members:
            raise ValueError(f"--model_seed must be in [0, {run.num_members}), got {args.model_seed}")
        if run.diverged[args.model_seed] is not None:
            raise ValueError(
                f"model {args.model_seed} of {args.workdir} diverged at step {run.diverged[args.model_seed]}: "
                "its parameters are not usable; pick another --model_seed or --checkpoint best"
            )
        text = sample_text(
            run,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            member=args.model_seed,
        )
    sys.stdout.write(text + "\n")


def top_k_arg(text: str) -> int | None:
    """``--top_k``: a positive K, or 0 / none for off (the default)."""
    if text.strip().lower() in ("0", "none", "off"):
        return None
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, or 0 or none for off, got {text!r}") from None
    if k < 0:
        raise argparse.ArgumentTypeError(f"must be positive (or 0 or none for off), got {k}")
    return k


@cli.main_wrapper(interrupted=cli.INTERRUPTED_RESUMABLE)
def sweep(argv=None):
    """Run the points of a sweep defined by a config file's get_sweep(arg).

    Without flags every point runs here, one after another, each in DIR/<point name>:
    finished points are skipped, interrupted ones resume from their checkpoint, a failed
    point is recorded (DIR/status.json) and the rest go on. --index I (also 0,3 or 4-7)
    runs only those points: one array-job task or one cloud TPU VM per point. The exit
    status is 1 when a selected point failed or diverged, 7 when none did but some were
    left to other runners (trained elsewhere at the time), 0 when every one is done.
    """
    parser = cli.ArgumentParser(
        prog="attention-jax-sweep", description=sweep.__doc__.split("\n")[0], epilog=cli.overrides_epilog()
    )
    parser.add_argument(
        "--config", required=True, help="config file (or shipped config name) with get_sweep(arg), optionally :VARIANT"
    )
    parser.add_argument("--workdir", help="sweep directory, one subfolder per point (default runs/sweeps/<config>)")
    parser.add_argument("--index", help="run only these points: I, I,J or I-J (0-based, see --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="list the points and their status; train nothing")
    parser.add_argument("--print-commands", action="store_true", help="print one experiments.train command per point")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per point")
    parser.add_argument(
        "--no-group",
        dest="group",
        action="store_false",
        help="one program per point (default: points that differ only in seed, optimizer scalars and attention scale "
        "train together, one program per shape)",
    )
    parser.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local: the points one after another, here; ray: a Ray task per program (pip install attention_jax[ray])",
    )
    parser.add_argument("--address", help="with --backend ray: the cluster to use (default: start a local Ray)")
    args, rest = parser.parse_known_args(argv)
    if args.address and args.backend != "ray":
        parser.error("--address needs --backend ray")
    base_overrides = parse_override_args(rest)

    from attention_jax.lab import sweep as sweep_lib

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
    # Before any other JAX call; with distributed.enabled every process runs this same command.
    config = apply_overrides(load_config(args.config), base_overrides)
    if args.backend == "ray":
        if resolve_distributed(config).enabled:
            raise ConfigError("with --backend ray, a point spans several hosts through ray.hosts, not distributed.*")
        from attention_jax.lab import ray_backend

        kw = dict(all_points=points, base_overrides=base_overrides, group=args.group, address=args.address)
        status = ray_backend.run_sweep(args.config, chosen, sweep_dir, **kw)
    elif (status := distributed.launch(resolve_distributed(config), "sweep", argv)) is not None:  # a child ran it
        return status
    else:
        status = sweep_lib.run_sweep(
            args.config,
            chosen,
            sweep_dir,
            all_points=points,
            base_overrides=base_overrides,
            progress=args.progress,
            group=args.group,
        )
    print(f"sweep: {status['counts']} in {status['seconds']:.0f} s; status in {sweep_dir}/status.json", file=sys.stderr)
    return sweep_exit_status(status, chosen)


def sweep_exit_status(status: dict, chosen) -> int:
    """0: every chosen point done; 1: one failed or diverged; 7: the rest were left to other runners."""
    mine = {p.index for p in chosen}
    states = {r["status"] for r in status["points"] if r["index"] in mine}
    if states <= {"done"}:
        return 0
    if states <= {"done", "running"}:  # "running": its lock held by a trainer elsewhere
        return cli.EXIT_SWEEP_LEFT_TO_OTHERS
    return 1


@cli.main_wrapper
def report(argv=None):
    """Aggregate an ablate-scale sweep's points into report.md with plots.

    Reads every DIR/<point>/ (config.json, metrics.jsonl, checkpoints) and writes report.md,
    val_loss_curves.png, final_loss_vs_head_size.png, entropy_vs_head_size.png and
    attention_heatmaps.png into --outdir (default: the sweep dir). The entropy and the
    heatmaps load the trained checkpoints and the runs' dataset; --no-entropy skips them.
    """
    parser = cli.ArgumentParser(prog="attention-jax-report", description=report.__doc__.split("\n")[0])
    parser.add_argument("--sweep", required=True, help="the sweep dir (one subfolder per point)")
    parser.add_argument("--outdir", help="where report.md and the PNGs go (default: the sweep dir)")
    parser.add_argument("--target", type=float, help="val loss for 'steps to target' (default: median final loss)")
    parser.add_argument("--prompt", help="text for the attention heatmaps")
    parser.add_argument("--heatmap_head_size", type=int, help="head size of the points shown as heatmaps")
    parser.add_argument("--no-entropy", action="store_true", help="do not load checkpoints (no entropy, no heatmaps)")
    parser.add_argument("--dpi", type=int, default=90)
    args = parser.parse_args(argv)

    from attention_jax.lab.ablate_scale import report as report_lib

    path = report_lib.write_report(
        args.sweep,
        args.outdir,
        target=args.target,
        prompt=args.prompt or report_lib.DEFAULT_PROMPT,
        heatmap_head_size=args.heatmap_head_size,
        entropy=not args.no_entropy,
        dpi=args.dpi,
    )
    print(path.read_text())
    print(f"wrote {path} and its plots", file=sys.stderr)


@cli.main_wrapper
def bench(argv=None):
    """Time the real training step of a config, and this machine's matmul speed.

    Prints a table, then as its last line one JSON object with ms_per_step, tokens_per_s,
    model_flops_per_s, mfu (model FLOP/s over the matmul FLOP/s measured in this same run),
    mfu_hardware (over the CPU's estimated peak, or --peak_gflops), compile_s, peak_rss_mb,
    backend and devices. The side-by-side with eager PyTorch is python -m benchmarks.train_step.
    """
    parser = cli.ArgumentParser(
        prog="attention-jax-bench", description=bench.__doc__.split("\n")[0], epilog=cli.overrides_epilog()
    )
    add_bench_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    check_bench_arguments(args)
    config = config_from_args(args.config, rest)

    from attention_jax.lab.bench import benchmark_training, format_table

    result = benchmark_training(config, **bench_kwargs(args))
    print(format_table(result))
    print(json.dumps(result))


def add_bench_arguments(parser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=30, help="measured optimizer steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="calls run before timing")
    parser.add_argument("--matmul_n", type=int, default=2048, help="size of the reference square matmul")
    parser.add_argument(
        "--peak_gflops", type=float, default=None, help="hardware peak for the MFU (default: estimated from cpuinfo)"
    )


def check_bench_arguments(args) -> None:
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    if args.peak_gflops is not None and args.peak_gflops <= 0:
        raise ValueError("--peak_gflops must be positive")


def bench_kwargs(args) -> dict:
    peak = args.peak_gflops * 1e9 if args.peak_gflops else None
    return dict(steps=args.steps, warmup=args.warmup, matmul_n=args.matmul_n, peak_flops=peak)


@cli.main_wrapper
def attention_stats(argv=None):
    """Measure attention at initialization across scales and head sizes (no training).

    Writes attention_stats.md (table), attention_stats.csv and attention_stats.png into
    --outdir (default: the config's outdir). The model setting needs tiny shakespeare (or
    --config.model.dataset=PATH); without it that setting is skipped with a message, or
    --config.model.enabled=false skips it silently.
    """
    parser = cli.ArgumentParser(
        prog="attention-jax-attention-stats",
        description=attention_stats.__doc__.split("\n")[0],
        epilog=cli.overrides_epilog(),
    )
    parser.add_argument("--config", required=True, help="config file, optionally with :VARIANT")
    parser.add_argument("--outdir", help="output directory (default: the config's outdir)")
    args, rest = parser.parse_known_args(argv)
    config = config_from_args(args.config, rest)
    outdir = Path(args.outdir or config.outdir)

    from attention_jax.lab.ablate_scale import init_stats

    rows = init_stats.run_grid(config)
    table = init_stats.write_outputs(rows, outdir)
    print(table)
    print(f"wrote attention_stats.md, .csv and .png to {outdir}", file=sys.stderr)
