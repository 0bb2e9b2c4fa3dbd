"""The ``reflexflow`` console command."""

from __future__ import annotations

import argparse
import sys


def _example(args: argparse.Namespace) -> int:
    from .example import run_example

    run_example(steps=args.steps, seed=args.seed)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench.run import run_bench

    overrides = {
        key: val
        for key, val in {"size": args.size, "batch": args.batch, "reps": args.reps}.items()
        if val is not None
    }
    run_bench(
        args.device,
        quick=args.quick,
        out=args.out,
        models=tuple(args.models),
        overrides=overrides,
        threads=args.threads,
    )
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
    bench = sub.add_parser(
        "bench",
        help="benchmark a training step (FM vs ReflexFlow) and the loss/rollout kernels",
        description="Times a full optimizer step of plain FM and of ReflexFlowLoss (K = 1, 2, "
        "4; joint 2B and two-call; every usable backend) on a small DiT and UNet, compares "
        "each with its FLOP ideal, runs the loss and rollout benchmarks that are installed, "
        "prints one table and writes benchmarks/results/step-<device>.json.",
    )
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    bench.add_argument("--quick", action="store_true", help="tiny sizes, one step: a smoke test")
    bench.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    bench.add_argument(
        "--models", nargs="+", default=["dit", "unet"], choices=["dit", "unet"], help="models"
    )
    bench.add_argument("--size", choices=["quick", "small", "gpu"], help="model size preset")
    bench.add_argument("--batch", type=int, help="batch size")
    bench.add_argument("--reps", type=int, help="timed steps per configuration")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
