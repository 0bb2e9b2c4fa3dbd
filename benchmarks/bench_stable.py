"""What target="stable" costs: reflexflow.stable.stable_target vs a SiT-S/2 forward.

Rows, all on one batch of B = 256 latents 4x32x32 (D = 4096) with R = 1024 references:

* ``stable_target fp32``: the shipped fast path (addmm with the per-query scale and the
  rank-1 bias, softmax, mm);
* ``stable_target bf16 in``: the same with bf16 x and ref_x1 (upcast, computed in fp32);
* ``sdpa (not shipped)``: the same logits through F.scaled_dot_product_attention with the
  rank-1 term as an additive attention mask, for the record of why it is not used;
* ``SiT-S/2 forward``: ``build_model("dit", "gpu")`` (depth 12, hidden 384, 6 heads,
  patch 2, 32.5M parameters) under no_grad (a training forward is slower, so the share
  is an upper bound).

Writes benchmarks/results/stable-<device>.json and prints a table with each row's share
of the SiT-S/2 forward and the load average at start and end:

    python -m pytest benchmarks/bench_stable.py --benchmark-only          # ~4 min on 2 cores
    REFLEXFLOW_BENCH_BATCH=64 python -m pytest benchmarks/bench_stable.py --benchmark-only
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.machinery.report import write_device_result
from benchmarks.suites.stable import stable_inputs
from reflexflow.demo.toy_models import build_model
from reflexflow.stable import stable_target

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = int(os.environ.get("REFLEXFLOW_BENCH_BATCH", "256"))
REFS, SHAPE = 1024, (4, 32, 32)
RESULTS = Path(__file__).parent / "results"
MODEL = "SiT-S/2 forward"
_ROWS: list[dict] = []
_LOAD: dict[str, tuple[float, float, float]] = {}


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _sdpa_target(path, x, t, ref_x1):
    """The stable target with the logits through scaled_dot_product_attention."""
    xf, rf = x.flatten(1), ref_x1.flatten(1)
    a, s = path.a(t)[:, None], path.s(t).clamp_min(1e-4)[:, None]
    bias = -(a * a / (2 * s * s)) * rf.square().sum(1)[None]
    x1_tilde = F.scaled_dot_product_attention(
        (xf * a / (s * s))[None], rf[None], rf[None], attn_mask=bias[None], scale=1.0
    )[0]
    return path.da(t)[:, None] * x1_tilde + path.ds(t)[:, None] * (xf - a * x1_tilde) / s


@pytest.fixture(scope="session", autouse=True)
def _write_results():
    _LOAD["start"] = os.getloadavg()
    yield
    if not _ROWS:
        return
    _LOAD["end"] = os.getloadavg()
    name = torch.cuda.get_device_name() if DEV == "cuda" else platform.processor() or "cpu"
    by = {r["op"]: r["median_s"] for r in _ROWS}
    for r in _ROWS:
        r["pct_of_sit_s2_forward"] = 100 * r["median_s"] / by[MODEL] if MODEL in by else None
    out = {
        "device": name,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch": BATCH,
        "refs": REFS,
        "shape": list(SHAPE),
        "load_avg_start": _LOAD["start"],
        "load_avg_end": _LOAD["end"],
        "rows": _ROWS,
    }
    path = write_device_result(RESULTS, "stable", name, out)
    print(f"\nwrote {path}; load average {_LOAD['start']} -> {_LOAD['end']}\n")
    print("| op | B | R | D | median ms | % of SiT-S/2 forward |")
    print("|---|---|---|---|---|---|")
    for r in _ROWS:
        pct = r["pct_of_sit_s2_forward"]
        print(
            f"| {r['op']} | {BATCH} | {REFS if r['op'] != MODEL else '-'} | 4096 | "
            f"{1e3 * r['median_s']:.1f} | {'-' if pct is None else f'{pct:.2f}'} |"
        )


def _record(benchmark, op: str, fn, rounds: int) -> None:
    def step():
        fn()
        _sync()

    benchmark.group = "stable-target"
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    _ROWS.append({"op": op, "median_s": benchmark.stats.stats.median})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stable_target(benchmark, dtype):
    kw = stable_inputs(BATCH, REFS, SHAPE, DEV, dtype)
    op = "stable_target fp32" if dtype == torch.float32 else "stable_target bf16 in"
    _record(benchmark, op, lambda: stable_target(**kw), 20 if DEV == "cuda" else 7)


def test_sdpa_variant_not_shipped(benchmark):
    kw = stable_inputs(BATCH, REFS, SHAPE, DEV)
    torch.testing.assert_close(  # the same quantity, or the timing would mean nothing
        _sdpa_target(**kw).view_as(kw["x"]), stable_target(**kw), rtol=1e-3, atol=1e-3
    )
    _record(benchmark, "sdpa (not shipped)", lambda: _sdpa_target(**kw), 20 if DEV == "cuda" else 7)


def test_sit_s2_forward(benchmark):
    kw = stable_inputs(BATCH, REFS, SHAPE, DEV)
    model, shape = build_model("dit", "gpu")
    assert shape == SHAPE
    model = model.to(DEV).eval()

    def forward():
        with torch.no_grad():
            model(kw["x"], kw["t"])

    _record(benchmark, MODEL, forward, 20 if DEV == "cuda" else 3)
