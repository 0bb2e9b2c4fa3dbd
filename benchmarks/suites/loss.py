"""The loss-objective suite of ``reflexflow bench``: reference eager, compiled, Triton.

Forward + backward of the objective alone at SiT-like latent shapes, called as the loss
calls it: the joint (2B, ...) model output ``v_joint`` (a leaf here; the model is not
involved) in the model's dtype, the state x1, eps, x^ in fp32. Median of a few
repetitions. Each row also reports the bandwidth against the floor of 7 N elements
(read v0, v1, x1, eps, x^; write dL/dv0, dL/dv1, in their dtypes) and that as a share of
a device-to-device copy measured in the same run (the "copy" row). The Triton rows need
CUDA: on CPU they are listed as "not measured" (the interpreter is not a timing).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from reflexflow import reference as ref
from reflexflow.objective import ObjectiveInputs, ObjectiveSpec
from reflexflow.paths import get_path

__all__ = [
    "objective_inputs",
    "objective_call",
    "floor_bytes",
    "copy_bandwidth",
    "run_loss_benchmark",
]

QUICK_SHAPE = (8, 4, 16, 16)
CPU_SHAPE = (64, 4, 32, 32)
GPU_SHAPES = ((256, 4, 32, 32), (1024, 4, 32, 32))  # SiT-B/2 latents; N = 1M and 4.2M


def objective_inputs(
    shape: tuple[int, ...], device: str | torch.device, v_dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Keyword arguments of reference.objective / fused_objective (linear path, k = 1,
    t1 = t0 + 0.1): v_joint (2B, ...) a leaf that requires grad, in v_dtype; x1, eps, x^
    float32."""
    g = torch.Generator(device=device).manual_seed(0)
    path = get_path("linear")
    batch = shape[0]

    def rnd(size: tuple[int, ...] = shape) -> torch.Tensor:
        return torch.randn(size, device=device, generator=g)

    x1, eps = rnd(), rnd()
    t0 = 0.5 * torch.rand(batch, device=device, generator=g)
    t1 = t0 + 0.1
    return {
        "path": path,
        "v0": None,
        "v1": None,
        "v_joint": rnd((2 * batch, *shape[1:])).to(v_dtype).requires_grad_(),
        "x1": x1,
        "eps": eps,
        "x_hat": ref.interpolate(path, x1, eps, t1) + 0.1 * rnd(),
        "t0": t0,
        "t1": t1,
        "k": torch.ones(batch, dtype=torch.int64, device=device),
    }


def objective_call(kw: dict[str, Any]) -> tuple[Any, ObjectiveSpec, ObjectiveInputs]:
    """(path, spec, inputs) of reference.objective for :func:`objective_inputs`' dict
    (the default spec)."""
    fields = {name: value for name, value in kw.items() if name != "path"}
    return kw["path"], ObjectiveSpec(), ObjectiveInputs(**fields)


def floor_bytes(kw: dict[str, Any]) -> int:
    """7 N floor: read v0, v1 (the joint output), x1, eps, x^; write the joint gradient."""
    v, x1 = kw["v_joint"], kw["x1"]
    return 2 * v.numel() * v.element_size() + 3 * x1.numel() * x1.element_size()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn: Callable[[], None], device: str, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: str, numel: int, reps: int = 20) -> float:
    """Device-to-device copy ``dst.copy_(src)`` of numel fp32: read + write bytes / median
    time, GB/s (the yardstick of the "% of copy" column)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    sec = _median_seconds(lambda: dst.copy_(src), device, 3, reps)
    return 2 * src.numel() * src.element_size() / sec / 1e9


def _implementations(device: str) -> dict[str, Callable[..., Any] | None]:
    impls: dict[str, Callable[..., Any] | None] = {"eager": ref.objective}
    impls["compiled"] = torch.compile(ref.objective, fullgraph=True)
    impls["triton"] = None  # not measured without CUDA
    if device == "cuda":
        from reflexflow.kernels import fused_objective, triton_usable

        if triton_usable("cuda"):
            impls["triton"] = fused_objective
    return impls


def run_loss_benchmark(device: str, quick: bool) -> list[dict[str, Any]]:
    """Rows {impl, shape, v_dtype, median_us, floor_gbps, pct_of_copy, x_eager,
    x_compiled} for each implementation and shape, plus one "copy" row. Triton rows on
    CPU carry median_us None and note "not measured: needs CUDA"."""
    dev = torch.device(device).type
    if quick:
        shapes, v_dtype = (QUICK_SHAPE,), torch.float32
    elif dev == "cuda":
        shapes, v_dtype = GPU_SHAPES, torch.bfloat16
    else:
        shapes, v_dtype = (CPU_SHAPE,), torch.float32
    reps, warmup = (3, 1) if quick else ((50, 5) if dev == "cuda" else (5, 2))
    copy_n = (2**26 if dev == "cuda" else 2**24) if not quick else 2**16
    copy_gbps = copy_bandwidth(dev, copy_n, reps=max(reps, 10))
    rows: list[dict[str, Any]] = [
        {
            "impl": "copy",
            "shape": f"{copy_n} fp32",
            "v_dtype": "-",
            "median_us": None,
            "floor_gbps": copy_gbps,
            "pct_of_copy": 100.0,
            "x_eager": None,
            "x_compiled": None,
            "note": "dst.copy_(src), read + write",
        }
    ]
    for shape in shapes:
        kw = objective_inputs(shape, dev, v_dtype)
        floor = floor_bytes(kw)
        v = kw["v_joint"]
        timed: dict[str, float] = {}
        for name, fn in _implementations(dev).items():
            row: dict[str, Any] = {
                "impl": name,
                "shape": "x".join(map(str, shape)),
                "v_dtype": str(v_dtype).removeprefix("torch."),
            }
            if fn is None:
                row.update(
                    median_us=None,
                    floor_gbps=None,
                    pct_of_copy=None,
                    x_eager=None,
                    x_compiled=None,
                    note="not measured: needs CUDA",
                )
                rows.append(row)
                continue

            call = objective_call(kw)

            def step(fn: Callable[..., Any] = fn, call: tuple = call, v: torch.Tensor = v) -> None:
                v.grad = None
                fn(*call).loss.backward()

            sec = _median_seconds(step, dev, warmup, reps)
            timed[name] = sec
            row.update(
                median_us=1e6 * sec,
                floor_gbps=floor / sec / 1e9,
                pct_of_copy=100 * floor / sec / 1e9 / copy_gbps,
                x_eager=None,
                x_compiled=None,
                note="",
            )
            rows.append(row)
        for row in rows:
            if row.get("shape") == "x".join(map(str, shape)) and row["impl"] in timed:
                sec = timed[row["impl"]]
                row["x_eager"] = timed["eager"] / sec
                row["x_compiled"] = timed["compiled"] / sec
    return rows
