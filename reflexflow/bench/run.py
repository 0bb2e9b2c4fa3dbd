"""``reflexflow bench``: the step, loss and rollout benchmarks; one table, one JSON file."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from .report import device_slug, environment, format_step_table, load_average, write_json
from .step import run_step_benchmark
from .suites import SUITES, format_rows, run_suite

__all__ = ["run_bench", "add_bench_parser", "QUICK", "DEFAULT_CPU", "DEFAULT_GPU"]

# step-benchmark settings: --quick (a test), the CPU default (a few minutes on 2 cores)
# and the CUDA default (SiT-S/2-sized DiT and a 128-channel UNet, batch 64, bf16)
QUICK = {"size": "quick", "batch": 2, "rollout_steps": (1,), "reps": 1, "warmup": 0}
DEFAULT_CPU = {"size": "small", "batch": 8, "rollout_steps": (1, 2, 4), "reps": 5, "warmup": 1}
DEFAULT_GPU = {"size": "gpu", "batch": 64, "rollout_steps": (1, 2, 4), "reps": 10, "warmup": 3}


def run_bench(
    device: str | None = None,
    *,
    quick: bool = False,
    out: str | Path | None = None,
    models: tuple[str, ...] = ("dit", "unet"),
    overrides: dict[str, Any] | None = None,
    threads: int | None = None,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Run every benchmark present on ``device``, print one report, write the JSON.

    device defaults to CUDA when available, else CPU; out defaults to
    benchmarks/results/step-<device>.json. ``overrides`` replace step-benchmark
    settings (size, batch, rollout_steps, reps, warmup, amp, backends). threads sets
    torch's intra-op CPU threads for the run (1 gives steadier figures on a loaded CPU).
    Returns the JSON payload.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_bench(
                device, quick=quick, out=out, models=models, overrides=overrides, stream=stream
            )
        finally:
            torch.set_num_threads(before)
    stream = stream if stream is not None else sys.stdout
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available")
    settings = dict(QUICK if quick else DEFAULT_GPU if dev.type == "cuda" else DEFAULT_CPU)
    settings.update(overrides or {})
    out = (
        Path(out)
        if out is not None
        else Path("benchmarks/results") / (f"step-{device_slug(dev)}.json")
    )
    env = environment(dev)
    start = time.perf_counter()
    step = run_step_benchmark(dev, models=models, **settings)
    suites = {name: run_suite(name, str(dev), quick) for name in SUITES}
    env["load_avg_end"] = load_average()
    payload = {
        "environment": env,
        "elapsed_s": round(time.perf_counter() - start, 1),
        "step": step,
        "suites": suites,
    }
    print(_report(payload), file=stream)
    write_json(out, payload)
    print(f"wrote {out}", file=stream)
    return payload


def _report(payload: dict[str, Any]) -> str:
    env, step = payload["environment"], payload["step"]
    s = step["settings"]
    lines = [
        f"reflexflow bench on {env['device']} ({env['device_name']}), torch {env['torch']}, "
        f"triton {env['triton']}, {env['date_utc']}, load {env['load_avg_start']} -> "
        f"{env['load_avg_end']}",
        "",
        f"== Training step: size {s['size']}, batch {s['batch']}, amp {s['amp']}, "
        f"median of {s['reps']} steps, threads {env['torch_threads']}",
        "(vs ideal = ms / (opt ms + (fm ms - opt ms) x FLOP ratio); 1.00 = only model work; "
        "/shared = ms / the shared mode's ms at the same K)",
        format_step_table(step["rows"]),
    ]
    for key, goal in (
        ("max_vs_ideal", "1.05 on H100/H200"),
        ("k1_shared_vs_fm", "2.1 on CPU, 2.05 on H100/H200"),
        ("k1_shared_vs_joint", "0.9"),
        ("max_lean_saved_vs_fm", "1.1"),
    ):
        worst = step["summary"][key]
        if worst is not None:
            lines.append(
                f"{key}: {worst['value']:.3f} ({worst['model']}, {worst['config']}); goal <= {goal}"
            )
    lines.append(f"peak memory: {s['peak_memory']}")
    for backend, reason in step["skipped_backends"].items():
        lines.append(f"backend {backend!r}: not available: {reason}")
    for name, suite in payload["suites"].items():
        lines += ["", f"== {name}: {suite['status']} ({suite['source']})"]
        if suite["rows"]:
            lines.append(format_rows(suite["rows"]))
    lines.append(f"\nelapsed {payload['elapsed_s']} s on {os.cpu_count()} CPUs")
    return "\n".join(lines)


def _bench_command(args: argparse.Namespace) -> int:
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


def add_bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the ``reflexflow`` command's subparsers."""
    bench = sub.add_parser(
        "bench",
        help="benchmark a training step (FM vs ReflexFlow) and the loss/rollout kernels",
        description="Times a full optimizer step of plain FM and of ReflexFlowLoss (K = 1, 2, "
        "4; shared first call, joint 2B, two-call and lean modes; every usable backend) on a "
        "small DiT and UNet, compares "
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
    bench.set_defaults(func=_bench_command)
    return bench
