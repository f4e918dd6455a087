"""Sample text from a trained run.

python -m experiments.sample --workdir DIR [--prompt TEXT] [--max_new_tokens N]
    [--temperature T] [--top_k K] [--seed S] [--checkpoint latest|best]
"""

from __future__ import annotations

import sys

from attention_jax import cli


@cli.main_wrapper
def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m experiments.sample", description="Sample text from a trained run.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--checkpoint", choices=("latest", "best"), default="latest")
    parser.add_argument("--model_seed", type=int, default=0, help="which of num_seeds models (index)")
    args = parser.parse_args(argv)

    from attention_jax.sampling import load_run, sample_text

    run = load_run(args.workdir, which=args.checkpoint, seed_index=args.model_seed)
    text = sample_text(
        run,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
