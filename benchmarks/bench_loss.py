"""Benchmark of the ReflexFlow objective, forward + backward (pytest-benchmark).

Rows: the reference eagerly (reference.objective), torch.compile(reference.objective),
and the Triton op (kernels.fused_objective), at shapes users train at. Each row reports
the median time, the bandwidth achieved against the floor of 7 N elements (read v0, v1,
x1, eps, x^, write dL/dv0, dL/dv1) and that as a share of a device-to-device copy
measured in the same run. Results: benchmarks/results/loss-<device>.json and a table on
stdout.

    python -m pytest benchmarks/bench_loss.py --benchmark-only          # all rows
    python -m pytest benchmarks/bench_loss.py --benchmark-only -k sit   # one shape

On a machine without CUDA the Triton rows are skipped (the interpreter is no timing),
and the eager / compiled reference rows run on CPU. REFLEXFLOW_BENCH_DTYPE=bfloat16 runs
v0, v1 in bf16 (the state x1, eps, x^ stays fp32, as ReflexFlowLoss keeps it).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

from reflexflow import reference as ref
from reflexflow.bench.loss import objective_inputs
from reflexflow.kernels import triton_usable

DEV = "cuda" if torch.cuda.is_available() else "cpu"
V_DTYPE = getattr(torch, os.environ.get("REFLEXFLOW_BENCH_DTYPE", "float32"))
RESULTS = Path(__file__).parent / "results"
SHAPES = {
    "sit256_latent_4x32x32_b256": (256, 4, 32, 32),
    "celeba64_pixels_3x64x64_b128": (128, 3, 64, 64),
    "latent_16x128x128_b32": (32, 16, 128, 128),
    "video_16x16x60x104_b2": (2, 16, 16, 60, 104),
}
IMPLS = ("eager", "compiled", "triton")
_ROWS: list[dict] = []
_COPY: dict[str, float] = {}


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _copy_gbps() -> float:
    """Device-to-device copy bandwidth (read + write bytes / median time), GB/s."""
    if "gbps" not in _COPY:
        n = (256 if DEV == "cuda" else 16) * 2**20
        src = torch.randn(n, device=DEV)
        dst = torch.empty_like(src)
        times = []
        for i in range(25):
            _sync()
            t = _now()
            dst.copy_(src)
            _sync()
            if i >= 5:
                times.append(_now() - t)
        times.sort()
        _COPY["gbps"] = 2 * src.numel() * src.element_size() / times[len(times) // 2] / 1e9
    return _COPY["gbps"]


def _now() -> float:
    import time

    return time.perf_counter()


def _inputs(shape: tuple[int, ...]) -> dict:
    return objective_inputs(shape, DEV, V_DTYPE)


def _objective(impl: str):
    if impl == "eager":
        return ref.objective
    if impl == "compiled":
        compiled = torch.compile(ref.objective, fullgraph=True)
        return lambda path, **kw: compiled(path, **kw)
    from reflexflow.kernels import fused_objective

    return fused_objective


@pytest.fixture(scope="session", autouse=True)
def _write_results():
    yield
    if not _ROWS:
        return
    import triton  # noqa: F401  (version below; benchmarks need it installed)

    name = torch.cuda.get_device_name() if DEV == "cuda" else platform.processor() or "cpu"
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    out = {
        "device": name,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "v_dtype": str(V_DTYPE),
        "copy_gbps": _copy_gbps(),
        "load_avg": load,
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "rows": _ROWS,
    }
    RESULTS.mkdir(exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
    path = RESULTS / f"loss-{slug}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}\n")
    print(
        "| shape | impl | median ms | GB/s (7 N floor) | % of copy | GB/s moved | "
        "x eager | x compiled |"
    )
    print("|---|---|---|---|---|---|---|---|")
    by = {(r["shape"], r["impl"]): r["median_s"] for r in _ROWS}
    for r in _ROWS:
        eager = by.get((r["shape"], "eager"))
        comp = by.get((r["shape"], "compiled"))
        sx = f"{eager / r['median_s']:.2f}" if eager else "-"
        sc = f"{comp / r['median_s']:.2f}" if comp else "-"
        moved = "-" if r["moved_gbps"] is None else f"{r['moved_gbps']:.0f}"
        print(
            f"| {r['shape']} | {r['impl']} | {1e3 * r['median_s']:.3f} | {r['floor_gbps']:.1f} | "
            f"{100 * r['floor_gbps'] / out['copy_gbps']:.0f} | {moved} | {sx} | {sc} |"
        )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_loss_forward_backward(benchmark, shape, impl):
    if impl == "triton" and (DEV != "cuda" or not triton_usable(DEV)):
        pytest.skip("Triton rows need CUDA (the CPU interpreter is not a timing)")
    size = SHAPES[shape]
    kw = _inputs(size)
    fn = _objective(impl)
    v0, v1 = kw["v0"], kw["v1"]

    def step():
        v0.grad = v1.grad = None
        fn(**kw)["loss"].backward()
        _sync()

    for _ in range(3):  # compile, autotune, caches
        step()
    benchmark.group = shape
    benchmark.pedantic(step, rounds=20 if DEV == "cuda" else 3, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    n = v0.numel()
    floor = n * (2 * v0.element_size() + 3 * kw["x1"].element_size() + 2 * v0.element_size())
    moved = (
        _moved_bytes(size, v0.element_size(), kw["x1"].element_size()) if impl == "triton" else None
    )
    _ROWS.append(
        dict(
            shape=shape,
            size=list(size),
            impl=impl,
            median_s=median,
            floor_bytes=floor,
            floor_gbps=floor / median / 1e9,
            moved_bytes=moved,
            moved_gbps=None if moved is None else moved / median / 1e9,
            copy_gbps=_copy_gbps(),
        )
    )


def _moved_bytes(size: tuple[int, ...], vb: int, sb: int) -> int:
    """Bytes the Triton op moves, forward + backward (default knobs: gaussian channel-mean
    map, direction loss), as counted in benchmarks/README.md."""
    n = 1
    for d in size:
        n *= d
    nm = n // size[1]  # map elements
    pb = max(vb, sb)  # d0, r1 are stored in the promoted dtype
    forward = n * (2 * vb + 3 * sb + 2 * pb) + nm * 4 * (2 + 4 + 3)  # main, filter, sums/w
    backward = n * (2 * pb + vb + 2 * vb) + nm * 4  # d0, r1, v1 -> 2 grads
    return forward + backward
