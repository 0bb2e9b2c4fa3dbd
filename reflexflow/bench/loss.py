"""The loss-objective suite of ``reflexflow bench``: reference eager, compiled, Triton.

Forward + backward of the objective alone (v0, v1 leaves; the model is not involved) at
one SiT-like latent shape, median of a few repetitions. Bandwidth is reported against
the floor of 7 N elements (read v0, v1, x1, eps, x^; write dL/dv0, dL/dv1). The full
per-shape benchmark with a measured copy bandwidth is benchmarks/bench_loss.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .. import reference as ref
from ..paths import get_path

__all__ = ["objective_inputs", "run_loss_benchmark"]

QUICK_SHAPE = (8, 4, 16, 16)
CPU_SHAPE = (64, 4, 32, 32)
GPU_SHAPE = (256, 4, 32, 32)


def objective_inputs(
    shape: tuple[int, ...], device: str | torch.device, v_dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Random keyword arguments of reference.objective (linear path, k = 1, t1 = t0 + 0.1).

    v0 and v1 are leaves that require grad, in v_dtype; the state tensors are float32.
    """
    g = torch.Generator(device=device).manual_seed(0)
    path = get_path("linear")

    def rnd(dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, device=device, generator=g).to(dtype)

    x1, eps = rnd(), rnd()
    t0 = 0.5 * torch.rand(shape[0], device=device, generator=g)
    t1 = t0 + 0.1
    return {
        "path": path,
        "v0": rnd(v_dtype).requires_grad_(),
        "v1": rnd(v_dtype).requires_grad_(),
        "x1": x1,
        "eps": eps,
        "x_hat": ref.interpolate(path, x1, eps, t1) + 0.1 * rnd(),
        "t0": t0,
        "t1": t1,
        "k": torch.ones(shape[0], dtype=torch.int64, device=device),
    }


def _implementations(device: str) -> dict[str, Callable[..., dict]]:
    impls: dict[str, Callable[..., dict]] = {"eager": ref.objective}
    impls["compiled"] = torch.compile(ref.objective, fullgraph=True)
    if device == "cuda":
        from ..kernels import triton_usable

        if triton_usable("cuda"):
            from ..kernels import fused_objective

            impls["triton"] = fused_objective
    return impls


def run_loss_benchmark(device: str, quick: bool) -> list[dict[str, Any]]:
    """Rows {impl, shape, median_ms, floor_gbps, x_eager} for each usable implementation.

    On CPU the Triton row is absent: the interpreter is not a timing.
    """
    dev = torch.device(device).type
    shape = QUICK_SHAPE if quick else (GPU_SHAPE if dev == "cuda" else CPU_SHAPE)
    reps, warmup = (2, 1) if quick else ((20, 3) if dev == "cuda" else (5, 2))
    kw = objective_inputs(shape, dev)
    v0, v1 = kw["v0"], kw["v1"]
    floor = 7 * v0.numel() * v0.element_size()

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    rows = []
    for name, fn in _implementations(dev).items():

        def step(fn: Callable[..., dict] = fn) -> None:
            v0.grad = v1.grad = None
            fn(**kw)["loss"].backward()
            sync()

        for _ in range(warmup):
            step()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        median = sorted(times)[len(times) // 2]
        rows.append(
            {
                "impl": name,
                "shape": "x".join(map(str, shape)),
                "median_ms": 1e3 * median,
                "floor_gbps": floor / median / 1e9,
            }
        )
    eager = rows[0]["median_ms"]
    for row in rows:
        row["x_eager"] = eager / row["median_ms"]
    return rows
