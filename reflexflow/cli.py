"""The ``reflexflow`` console command."""

from __future__ import annotations

import argparse
import sys

from .bench.run import add_bench_parser


def _example(args: argparse.Namespace) -> int:
    from .example import run_example

    run_example(steps=args.steps, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reflexflow",
        description="ReflexFlow: exposure-bias-aware training loss for flow matching.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "example",
        help="train a tiny model on a 2-D toy with FM and ReflexFlow and print both losses",
        description="A short runnable example: trains a small MLP on 8 gaussians with plain "
        "FM and with ReflexFlowLoss for the same steps and seed, and prints sample quality.",
    )
    ex.add_argument("--steps", type=int, default=300, help="optimizer steps per method")
    ex.add_argument("--seed", type=int, default=0, help="random seed")
    ex.set_defaults(func=_example)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
