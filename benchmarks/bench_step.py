"""pytest-benchmark: one full optimizer step per configuration (benchmarks/README.md).

    python -m pytest benchmarks/bench_step.py --benchmark-only

Plain FM and ReflexFlowLoss (K = 1, 2, 4; joint 2B forward and two calls; every backend
the installed config accepts and the device runs) on the small DiT and UNet of
reflexflow.demo.toy_models. Each benchmark's extra_info carries the model FLOPs of the
step and its FLOP ratio to plain FM; ``reflexflow bench`` computes the FLOP ideal.
Environment: REFLEXFLOW_BENCH_DEVICE (default cuda when available), REFLEXFLOW_BENCH_SIZE
(quick / small / gpu), REFLEXFLOW_BENCH_BATCH, REFLEXFLOW_BENCH_THREADS (torch CPU threads;
1 gives steadier figures on a loaded machine).
"""

import os

import pytest
import torch

from benchmarks.machinery.run import DEFAULT_CPU, DEFAULT_GPU
from benchmarks.machinery.step import (
    available_backends,
    count_step_flops,
    make_loss_fn,
    make_train_step,
    step_specs,
)
from reflexflow.demo.toy_models import build_model

DEVICE = torch.device(
    os.environ.get("REFLEXFLOW_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
)
ON_GPU = DEVICE.type == "cuda"
DEFAULTS = DEFAULT_GPU if ON_GPU else DEFAULT_CPU
SIZE = os.environ.get("REFLEXFLOW_BENCH_SIZE", DEFAULTS["size"])
BATCH = int(os.environ.get("REFLEXFLOW_BENCH_BATCH", DEFAULTS["batch"]))
AMP = "bf16" if ON_GPU else "none"
if "REFLEXFLOW_BENCH_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["REFLEXFLOW_BENCH_THREADS"]))
SPECS = step_specs(available_backends(DEVICE)[0], DEFAULTS["rollout_steps"])
FM_FLOPS: dict[str, int] = {}


@pytest.fixture(scope="module", params=["dit", "unet"])
def workload(request):
    torch.manual_seed(0)
    model, shape = build_model(request.param, SIZE)
    model = model.to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return request.param, model, opt, torch.randn(BATCH, *shape, device=DEVICE)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name.replace(" ", "-"))
def test_step(benchmark, workload, spec):
    name, model, opt, x1 = workload
    loss_fn = make_loss_fn(spec)
    counts = count_step_flops(model, loss_fn, x1, torch.Generator(DEVICE).manual_seed(0))
    if spec.method == "fm":
        FM_FLOPS[name] = counts["flops"]
    benchmark.group = f"step {name} {SIZE} batch {BATCH} on {DEVICE.type}"
    benchmark.extra_info.update(counts, model=name, config=spec.name, amp=AMP)
    if name in FM_FLOPS:
        benchmark.extra_info["flop_ratio"] = counts["flops"] / FM_FLOPS[name]
    step = make_train_step(
        model, opt, loss_fn, x1, torch.Generator(DEVICE).manual_seed(0), amp=AMP, sync=ON_GPU
    )
    benchmark.pedantic(step, rounds=DEFAULTS["reps"], warmup_rounds=1, iterations=1)
