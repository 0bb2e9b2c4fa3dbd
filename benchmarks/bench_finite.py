"""What the default non-finite warning costs per step (reflexflow.finite.WATCH).

With check_finite=False (the default) every loss call arms the watch (the flag
~isfinite(loss) copied to host memory without blocking: on CUDA a non-blocking copy into
pinned memory behind an event) and polls it. Rows, on one device:

* ``watch arm+poll``: ``WATCH.arm(loss); WATCH.poll()`` on a scalar loss, alone;
* ``step, watch on`` / ``step, watch off``: one ReflexFlowLoss() (defar) training step of
  the step benchmark's TinyDiT at size "quick" (4x32x32, batch 8): forward, loss,
  backward, with the watch as shipped and with ``arm`` / ``poll`` replaced by no-ops.
  The rounds alternate on and off, so load drifts hit both alike. On a CPU the benchmark
  runs on one thread (steadier on a shared machine).

Writes benchmarks/results/finite-<device>.json and prints the share of a step:

    python -m pytest benchmarks/bench_finite.py --benchmark-only    # ~5 s on a CPU
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import reflexflow as rf
from benchmarks.machinery.report import environment, load_average, write_device_result
from reflexflow import finite
from reflexflow.demo.toy_models import build_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 8
RESULTS = Path(__file__).parent / "results"
_ROWS: list[dict] = []


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    threads = torch.get_num_threads()
    if DEV == "cpu":
        torch.set_num_threads(1)  # steadier on a shared CPU; recorded in the result file
    env = environment(DEV)
    yield
    torch.set_num_threads(threads)
    if not _ROWS:
        return
    env["load_avg_end"] = load_average()
    by = {r["op"]: r for r in _ROWS}
    step = by.get("step, watch off")
    for r in _ROWS:
        r["pct_of_step"] = None if step is None else 100 * r["median_s"] / step["median_s"]
        r["pct_of_fastest_step"] = None if step is None else 100 * r["median_s"] / step["min_s"]
    out = {
        "environment": env,
        "command": "python -m pytest benchmarks/bench_finite.py --benchmark-only",
        "model": "TinyDiT quick (build_model('dit', 'quick')), 4x32x32, preset defar",
        "batch": BATCH,
        "rows": _ROWS,
    }
    path = write_device_result(RESULTS, "finite", env["device"], out)
    print(f"\nwrote {path}; load average {env['load_avg_start']} -> {env['load_avg_end']}\n")
    print("| op | median ms | % of the median / fastest step without the watch |")
    print("|---|---:|---:|")
    for r in _ROWS:
        pct = "-" if r["pct_of_step"] is None else f"{r['pct_of_step']:.2f}"
        low = "-" if r["pct_of_fastest_step"] is None else f"{r['pct_of_fastest_step']:.2f}"
        print(f"| {r['op']} | {1e3 * r['median_s']:.4f} | {pct} / {low} |")


def test_watch_arm_and_poll(benchmark):
    watch = finite.NonFiniteWatch()
    loss = torch.tensor(1.0, device=DEV)

    def arm_poll():
        watch.arm(loss)
        watch.poll()

    benchmark.group = "non-finite watch"
    benchmark.pedantic(arm_poll, rounds=2000, iterations=1, warmup_rounds=50)
    assert not watch.warned  # a finite loss: the watch stayed quiet
    _ROWS.append({"op": "watch arm+poll", "median_s": benchmark.stats.stats.median})


def test_step_with_and_without_the_watch(benchmark, monkeypatch):
    torch.manual_seed(0)
    model, shape = build_model("dit", "quick")
    model = model.to(DEV)
    x1 = torch.randn(BATCH, *shape, device=DEV)
    loss_fn = rf.ReflexFlowLoss()
    gen = torch.Generator(DEV).manual_seed(0)
    shipped = finite.WATCH

    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model, x1, generator=gen).loss.backward()
        _sync()

    class _Off:
        def arm(self, loss):
            pass

        def poll(self):
            pass

    times: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(3):  # warm-up
        step()
    for i in range(60 if DEV == "cpu" else 200):
        for mode in ("on", "off") if i % 2 else ("off", "on"):
            monkeypatch.setattr(finite, "WATCH", shipped if mode == "on" else _Off())
            t0 = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - t0)
    monkeypatch.setattr(finite, "WATCH", shipped)
    benchmark.group = "non-finite watch"
    benchmark.pedantic(step, rounds=5, iterations=1)  # the shipped step, for the record
    for mode in ("on", "off"):
        ts = sorted(times[mode])
        _ROWS.append(
            {
                "op": f"step, watch {mode}",
                "median_s": ts[len(ts) // 2],
                "min_s": ts[0],
                "max_s": ts[-1],
                "rounds": len(ts),
            }
        )
