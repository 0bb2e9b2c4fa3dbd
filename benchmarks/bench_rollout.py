"""Benchmark of the scheduled-sampling rollout: per-sample loop vs batched engines.

Rows: the rollout modes of benchmarks/suites/rollout.py (per_sample, lockstep,
engine_torch, engine_native, fixed_native, graph; its docstring says what each runs),
each with its median seconds per rollout, sample-forwards per rollout and speedup vs the
per-sample loop, plus a micro-benchmark of the fused Euler update
(torch.ops.reflexflow.euler_update_) against plain PyTorch (state += h * v; xin.copy_(state)).

    python benchmarks/bench_rollout.py                      # CPU: the committed run
    python benchmarks/bench_rollout.py --device cuda --batch 64 --size 32 --repeats 20

Writes benchmarks/results/rollout-<device>.json (cpu, h100, h200, ...; with the device,
torch version, date and load).
The measuring code lives in benchmarks/suites/rollout.py (``reflexflow bench`` runs its
rollout rows as the "rollout" suite); this script adds the fused-update rows and the file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: the checkout's root holds benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machinery.report import device_slug  # noqa: E402
from benchmarks.suites.rollout import bench_fused_update, bench_rollouts  # noqa: E402
from reflexflow import native  # noqa: E402


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def uptime() -> str | None:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--rollout-steps", type=int, default=4)
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--update-repeats", type=int, default=80)
    parser.add_argument(
        "--update-shapes",
        type=lambda s: [int(v) for v in s.split("x")],
        nargs="+",
        default=[[16, 3, 16, 16], [64, 4, 64, 64]],
        help="shapes like 16x3x16x16",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared host)"
    )
    parser.add_argument("--skip-per-sample", action="store_true")
    parser.add_argument("--out", default=None, help="JSON path (default: results/rollout-<device>)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before, uptime_before = load_average(), uptime()
    ext = native.load_extension()
    result = {
        "benchmark": "rollout",
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": load_before,
        "uptime_before": uptime_before,
        "extension": native.extension_status() if ext else {"loaded": False},
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "rollouts": bench_rollouts(
            device,
            batch=args.batch,
            size=args.size,
            rollout_steps=args.rollout_steps,
            sampling_steps=args.sampling_steps,
            repeats=args.repeats,
            skip_per_sample=args.skip_per_sample,
        ),
        "fused_update": bench_fused_update(
            device, shapes=args.update_shapes, repeats=args.update_repeats
        ),
        "load_average_after": load_average(),
        "uptime_after": uptime(),
    }
    out = (
        Path(args.out)
        if args.out
        else (Path(__file__).resolve().parent / "results" / f"rollout-{device_slug(device)}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
