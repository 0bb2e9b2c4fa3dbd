"""Each preset's training-step cost against plain FM, side by side in one run (CPU).

    PYTHONPATH=. python benchmarks/results/presets_cost.py [--reps 5] [--out PATH]

One step = zero_grad; loss; backward; AdamW step (benchmarks.machinery.step). Each preset
runs as shipped (its own draws of k and t, backend "torch"), on the step benchmark's
"dit" model at size "quick", batch 8, float32; times are medians over round-robin reps
(load on a shared machine hits every row alike); FLOPs and model calls are
torch.utils.flop_counter's for one step with the same seed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.machinery.step import _timed, count_step_flops, make_train_step, plain_fm_loss
from reflexflow import ReflexFlowLoss
from reflexflow.demo.toy_models import build_model

PRESETS = ("defar", "arioso", "simpletuner", "takenoko", "grid-direction")


def _loss_fn(name: str):
    if name == "fm":
        return plain_fm_loss
    loss = ReflexFlowLoss(preset=name, backend="torch")
    return lambda model, x1, generator: loss(model, x1, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/presets-cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, shape = build_model("dit", "quick")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x1 = torch.randn(args.batch, *shape)
    names = ("fm", *PRESETS)
    info, steps = {}, {}
    for name in names:
        fn = _loss_fn(name)
        info[name] = count_step_flops(model, fn, x1, torch.Generator().manual_seed(0))
        steps[name] = make_train_step(model, opt, fn, x1, torch.Generator().manual_seed(1))
    for name in names:  # warm-up
        steps[name]()
    times = {name: [] for name in names}
    for _ in range(args.reps):
        for name in names:
            times[name].append(_timed(steps[name], torch.device("cpu"))[0])
    fm_time = statistics.median(times["fm"])
    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append(
            {
                "preset": name,
                "median_s": round(med, 5),
                "times_s": [round(t, 5) for t in times[name]],
                "vs_fm_time": round(med / fm_time, 3),
                "model_calls": info[name]["calls"],
                "sample_forwards": info[name]["sample_forwards"],
                "model_flops": info[name]["flops"],
                "vs_fm_flops": round(info[name]["flops"] / info["fm"]["flops"], 3),
            }
        )
    result = {
        "command": "PYTHONPATH=. python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_avg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        "note": (
            "times: medians of round-robin reps, each step with fresh draws (simpletuner's "
            "k ~ U{0..10} varies per step); FLOPs, calls, sample forwards: one step, seed 0"
        ),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "machine": platform.machine() + ", " + str(os.cpu_count()) + " cores, 1 thread",
        "model": {"name": "dit", "size": "quick", "shape": list(shape), "batch": args.batch},
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(
            f"{r['preset']:15s} {r['median_s'] * 1e3:8.1f} ms  x{r['vs_fm_time']:<6} "
            f"calls {r['model_calls']:3d}  sample-fwd {r['sample_forwards']:4d}  "
            f"flops x{r['vs_fm_flops']}"
        )


if __name__ == "__main__":
    main()
