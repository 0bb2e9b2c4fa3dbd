"""The stable-target suite of ``reflexflow bench``: what target="stable" costs.

Times :func:`reflexflow.stable.stable_target` (B queries, R references, latents 4x32x32,
D = 4096, float32) against the forward of a SiT-S/2-size DiT (depth 12, hidden 384,
6 heads, patch 2; ``build_model("dit", "gpu")``) on the same batch, under no_grad (a
training forward records autograd and is slower, so the share reported is an upper
bound). The cost of the target scales as B R D, the model's as B: the share is
independent of B. The full benchmark at B = 256 is benchmarks/bench_stable.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from reflexflow.demo.toy_models import build_model
from reflexflow.paths import get_path
from reflexflow.stable import stable_target

__all__ = ["stable_inputs", "time_median", "run_stable_benchmark"]

# (batch, references, data shape, model size) per run kind
QUICK = (8, 32, (4, 32, 32), "quick")
CPU = (64, 1024, (4, 32, 32), "gpu")  # SiT-S/2 at B = 256 takes ~40 s a forward on 2 cores
GPU = (256, 1024, (4, 32, 32), "gpu")


def stable_inputs(
    batch: int,
    refs: int,
    shape: tuple[int, ...],
    device: str | torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments of stable_target: linear path, x on the path of the first B
    references (the batch) with t ~ U(0, 1 - 1e-3), ref_x1 (R, *shape) with R >= B."""
    if refs < batch:
        raise ValueError(f"refs must be >= batch (the batch leads the set), got {refs} < {batch}")
    g = torch.Generator(device=device).manual_seed(seed)
    path = get_path("linear")
    ref_x1 = torch.randn((refs, *shape), device=device, generator=g)
    eps = torch.randn((batch, *shape), device=device, generator=g)
    t = (1 - 1e-3) * torch.rand(batch, device=device, generator=g)
    x = path.a(t).view(-1, 1, 1, 1) * ref_x1[:batch] + path.s(t).view(-1, 1, 1, 1) * eps
    return {"path": path, "x": x.to(dtype), "t": t, "ref_x1": ref_x1.to(dtype)}


def time_median(fn: Callable[[], Any], reps: int, warmup: int, device: str) -> float:
    """Median wall time of fn() in seconds (CUDA synchronised around each call)."""

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_stable_benchmark(device: str, quick: bool) -> list[dict[str, Any]]:
    """Rows {op, batch, refs, shape, median_ms, pct_of_forward}: stable_target and the
    model forward on the same batch (quick: a tiny DiT, not SiT-S/2)."""
    dev = torch.device(device).type
    batch, refs, shape, size = QUICK if quick else (GPU if dev == "cuda" else CPU)
    reps, warmup = (3, 3) if quick else ((20, 3) if dev == "cuda" else (3, 1))
    kw = stable_inputs(batch, refs, shape, dev)
    model, _ = build_model("dit", size)
    model = model.to(dev).eval()
    x, t = kw["x"], kw["t"]

    def forward() -> None:
        with torch.no_grad():
            model(x, t)

    target_s = time_median(lambda: stable_target(**kw), reps, warmup, dev)
    model_s = time_median(forward, max(1, reps // 2) if dev != "cuda" else reps, 1, dev)
    label = "x".join(map(str, shape))
    model_name = "SiT-S/2 forward" if size == "gpu" else "tiny DiT forward (quick)"
    return [
        {
            "op": "stable_target fp32",
            "batch": batch,
            "refs": refs,
            "shape": label,
            "median_ms": 1e3 * target_s,
            "pct_of_forward": 100 * target_s / model_s,
        },
        {
            "op": model_name,
            "batch": batch,
            "refs": 0,
            "shape": label,
            "median_ms": 1e3 * model_s,
            "pct_of_forward": 100.0,
        },
    ]
