"""Benchmark of the ReflexFlow objective, forward + backward (pytest-benchmark).

Rows: the reference eagerly (reference.objective), torch.compile(reference.objective),
and the Triton op (kernels.fused_objective), at shapes users train at, called as the loss
calls it (the joint (2B, ...) model output v_joint in the model dtype, state in fp32).
Each row reports the median time, the bandwidth against the floor of 7 N elements (read
v0, v1, x1, eps, x^, write dL/dv0, dL/dv1, in their dtypes) and that as a share of a
device-to-device copy measured in the same run (its own row, "copy"). Results:
benchmarks/results/loss-<device>.json and a Markdown table on stdout.

    python -m pytest benchmarks/bench_loss.py --benchmark-only -s          # all rows
    python -m pytest benchmarks/bench_loss.py --benchmark-only -s -k sit   # some shapes

Without CUDA the Triton rows are "not measured" (the interpreter is not a timing) and the
reference rows run on CPU. REFLEXFLOW_BENCH_DTYPE=float32 (or bfloat16, float16) forces
the model dtype of every shape.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks.machinery.report import write_device_result
from benchmarks.suites.loss import copy_bandwidth, floor_bytes, objective_call, objective_inputs
from reflexflow import reference as ref
from reflexflow.kernels import triton_usable

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FORCED = os.environ.get("REFLEXFLOW_BENCH_DTYPE")
RESULTS = Path(__file__).parent / "results"
# name: (shape (B, ...), default model dtype); N = elements of v0
SHAPES = {
    "sit256_latent_4x32x32_b256": ((256, 4, 32, 32), "bfloat16"),  # N = 1.0M, <= 30 us
    "sit_latent_4x32x32_b1024": ((1024, 4, 32, 32), "bfloat16"),  # N = 4.2M, 70% copy
    "latent_4x64x64_b256": ((256, 4, 64, 64), "bfloat16"),  # N = 4.2M, one program
    "celeba64_pixels_3x64x64_b128": ((128, 3, 64, 64), "float32"),  # N = 1.6M
    "latent_16x128x128_b32": ((32, 16, 128, 128), "bfloat16"),  # N = 8.4M, large path
    "video_16x16x60x104_b2": ((2, 16, 16, 60, 104), "bfloat16"),  # N = 3.2M, large path
}
IMPLS = ("eager", "compiled", "triton")
_ROWS: list[dict] = []
_COPY: dict[str, float] = {}


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _copy_gbps() -> float:
    if "gbps" not in _COPY:
        _COPY["gbps"] = copy_bandwidth(DEV, (2**26 if DEV == "cuda" else 2**24), reps=25)
    return _COPY["gbps"]


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, FORCED or SHAPES[name][1])


def _objective(impl: str):
    if impl == "eager":
        return ref.objective
    if impl == "compiled":
        return torch.compile(ref.objective, fullgraph=True)
    from reflexflow.kernels import fused_objective

    return fused_objective


@pytest.fixture(scope="session", autouse=True)
def _write_results():
    yield
    if not _ROWS:
        return
    import triton

    name = torch.cuda.get_device_name() if DEV == "cuda" else platform.processor() or "cpu"
    out = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": _copy_gbps(),
        "load_avg": os.getloadavg(),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "rows": _ROWS,
    }
    path = write_device_result(RESULTS, "loss", name, out)
    print(f"\nwrote {path}\n")
    print(f"copy: {out['copy_gbps']:.1f} GB/s (dst.copy_(src), read + write)\n")
    print(
        "| shape | v dtype | impl | median us | GB/s (7 N floor) | % of copy | x eager "
        "| x compiled |"
    )
    print("|---|---|---|---|---|---|---|---|")
    by = {(r["shape"], r["impl"]): r["median_s"] for r in _ROWS}
    for r in _ROWS:
        if r["median_s"] is None:
            print(
                f"| {r['shape']} | {r['v_dtype']} | {r['impl']} | not measured ({r['note']}) "
                "| | | | |"
            )
            continue
        eager, comp = by.get((r["shape"], "eager")), by.get((r["shape"], "compiled"))
        sx = f"{eager / r['median_s']:.2f}" if eager else "-"
        sc = f"{comp / r['median_s']:.2f}" if comp else "-"
        pct = 100 * r["floor_gbps"] / out["copy_gbps"]
        print(
            f"| {r['shape']} | {r['v_dtype']} | {r['impl']} | {1e6 * r['median_s']:.1f} | "
            f"{r['floor_gbps']:.1f} | {pct:.1f} | {sx} | {sc} |"
        )


def _row(shape: str, size: tuple, dtype: torch.dtype, impl: str, **fields) -> dict:
    """One result row: the case (shape, size, v dtype, impl) and its measured ``fields``."""
    v_dtype = str(dtype).removeprefix("torch.")
    return dict(shape=shape, size=list(size), v_dtype=v_dtype, impl=impl, **fields)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_loss_forward_backward(benchmark, shape, impl):
    size, dtype = SHAPES[shape][0], _dtype(shape)
    if impl == "triton" and (DEV != "cuda" or not triton_usable(DEV)):
        _ROWS.append(_row(shape, size, dtype, impl, median_s=None, note="needs CUDA"))
        pytest.skip("Triton rows need CUDA (the CPU interpreter is not a timing): not measured")
    kw = objective_inputs(size, DEV, dtype)
    fn = _objective(impl)
    v = kw["v_joint"]
    call = objective_call(kw)

    def step():
        v.grad = None
        fn(*call).loss.backward()
        _sync()

    for _ in range(3):  # compile, caches
        step()
    benchmark.group = shape
    benchmark.pedantic(step, rounds=30 if DEV == "cuda" else 3, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    floor = floor_bytes(kw)
    _ROWS.append(
        _row(
            shape,
            size,
            dtype,
            impl,
            median_s=median,
            floor_bytes=floor,
            floor_gbps=floor / median / 1e9,
            copy_gbps=_copy_gbps(),
            note="",
        )
    )
