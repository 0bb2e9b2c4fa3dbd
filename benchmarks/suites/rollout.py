"""Rollout-engine benchmark: the per-sample loop against the batched engines.

Modes (each row: median and min seconds per rollout, sample-forwards, speedup against
the per-sample loop):

  per_sample     one batch-1 model call per sample and step (SimpleTuner's ReflexFlow
                 option; reflexflow.reference.euler_rollout_per_sample)
  lockstep       full batch for max k steps, finished samples masked (B * max k forwards)
  engine_torch   RolloutEngine("torch"): prefix-compacted, pure PyTorch (sum k forwards)
  engine_native  RolloutEngine("native"): the same with the C++/CUDA ops
  fixed_native   RolloutEngine("native") with fixed_k=K: the masked static plan, no host
                 sync (fixed k only)
  graph          RolloutEngine("native", cuda_graph=True) with fixed_k=K, fixed k only,
                 CUDA only

plus :func:`bench_fused_update`, the fused Euler update against plain PyTorch.
``reflexflow bench`` runs :func:`run_rollout_benchmark`; the script
benchmarks/bench_rollout.py runs both and writes benchmarks/results/rollout-<device>.json.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor

from reflexflow import native
from reflexflow.conventions import VelocityModel
from reflexflow.demo.toy_models import SmallDiT, SmallUNet
from reflexflow.engine import RolloutEngine
from reflexflow.reference import bcast, euler_rollout_per_sample

__all__ = [
    "SmallUNet",
    "SmallDiT",
    "lockstep_rollout",
    "bench_rollouts",
    "bench_fused_update",
    "run_rollout_benchmark",
]


def lockstep_rollout(velocity, x_t0: Tensor, t0: Tensor, k: Tensor, step: Tensor) -> Tensor:
    """Full batch for max k steps; samples past their k_i are masked (B * max k forwards)."""
    with torch.no_grad():
        x, tau = x_t0.clone(), t0.clone()
        for j in range(int(k.max())):
            live = (k > j).to(x.dtype)
            v = velocity(x, tau)
            x += bcast(live * step, x) * v
            tau += live * step
    return x


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict, device: torch.device, repeats: int) -> dict:
    """Median seconds per fn, timing the fns round-robin so that load drifts hit all alike."""
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(vals), min(vals)) for name, vals in times.items()}


def rollout_modes(
    x, t0, k, step, native_ok: bool, graph_ok: bool, fixed_k: int | None = None
) -> dict:
    """name -> fn(velocity) for every rollout implementation that applies; fixed_k: every
    k_i is known to be <= fixed_k (adds the static-plan modes)."""
    modes = {
        "per_sample": lambda vm: euler_rollout_per_sample(vm, x, t0, k, step),
        "lockstep": lambda vm: lockstep_rollout(vm, x, t0, k, step),
        "engine_torch": lambda vm: RolloutEngine("torch")(vm, x, t0, k, step),
    }
    if native_ok:
        native_engine = RolloutEngine("native")
        modes["engine_native"] = lambda vm: native_engine(vm, x, t0, k, step)
        if fixed_k is not None:
            modes["fixed_native"] = lambda vm: native_engine(vm, x, t0, k, step, fixed_k=fixed_k)
    if graph_ok and fixed_k is not None:
        graph_engine = RolloutEngine("native", cuda_graph=True)
        modes["graph"] = lambda vm: graph_engine(vm, x, t0, k, step, fixed_k=fixed_k)
    return modes


def bench_rollouts(
    device: torch.device | str,
    *,
    batch: int = 32,
    size: int = 16,
    rollout_steps: int = 4,
    sampling_steps: int = 50,
    repeats: int = 15,
    skip_per_sample: bool = False,
    verbose: bool = True,
) -> list[dict]:
    """One row per (model, k draw, mode): median/min seconds per rollout, sample-forwards,
    speedup against the per-sample loop. Modes are timed round-robin."""
    device = torch.device(device)
    rows = []
    gen = torch.Generator().manual_seed(0)
    h = 1.0 / sampling_steps
    native_ok = native.has_kernel(device)
    for model_name, ctor in (("unet", SmallUNet), ("dit", lambda: SmallDiT(size=size))):
        net = ctor().to(device).eval()
        for kmode in ("uniform", "fixed"):
            b, kmax = batch, rollout_steps
            if kmode == "fixed":
                k = torch.full((b,), kmax)
            else:
                k = torch.randint(1, kmax + 1, (b,), generator=gen)
            x = torch.randn(b, 3, size, size, generator=gen)
            t0 = torch.rand(b, generator=gen) * (1 - kmax * h - 1e-3)
            x, t0, k = x.to(device), t0.to(device), k.to(device)
            step = torch.full_like(t0, h)
            graph_ok = native_ok and device.type == "cuda" and kmode == "fixed"
            fixed = kmax if kmode == "fixed" else None
            modes = rollout_modes(x, t0, k, step, native_ok, graph_ok, fixed)
            forwards, fns = {}, {}
            for mode, fn in modes.items():
                if mode == "per_sample" and skip_per_sample:
                    continue
                counter = VelocityModel(net)
                with torch.no_grad():
                    fn(counter)  # also the warm-up (and the CUDA graph capture)
                forwards[mode] = counter.sample_forwards
                vm = VelocityModel(net)
                fns[mode] = lambda fn=fn, vm=vm: fn(vm)
            with torch.no_grad():
                secs = interleaved_medians(fns, device, repeats)
            base = secs["per_sample"][0] if "per_sample" in secs else None
            for mode, (sec, best) in secs.items():
                row = {
                    "model": model_name,
                    "k_draw": kmode,
                    "batch": b,
                    "K": kmax,
                    "size": size,
                    "mode": mode,
                    "median_s": sec,
                    "min_s": best,
                    "sample_forwards": forwards[mode],
                    "speedup_vs_per_sample": None if base is None else base / sec,
                }
                rows.append(row)
                if not verbose:
                    continue
                print(
                    f"{model_name:5s} k={kmode:7s} {mode:14s} {sec * 1e3:9.2f} ms  "
                    f"forwards={forwards[mode]:4d}  "
                    f"speedup={row['speedup_vs_per_sample'] or 0:.2f}x",
                    flush=True,
                )
    return rows


def bench_fused_update(
    device: torch.device | str,
    *,
    shapes: list[list[int]] | None = None,
    repeats: int = 80,
    verbose: bool = True,
) -> list[dict]:
    """torch.ops.reflexflow.euler_update_ against state += h * v (+ xin.copy_(state))."""
    device = torch.device(device)
    shapes = shapes or [[16, 3, 16, 16], [64, 4, 64, 64]]
    if not native.has_kernel(device):
        return []
    rows = []
    op = torch.ops.reflexflow.euler_update_
    for shape in [tuple(s) for s in shapes]:
        for v_dtype, in_dtype in [
            (torch.float32, None),
            (torch.bfloat16, None),
            (torch.float32, torch.bfloat16),
        ]:
            state = torch.randn(shape, device=device)
            v = torch.randn(shape, device=device).to(v_dtype)
            h = torch.full((shape[0],), 0.01, device=device)
            xin = None if in_dtype is None else torch.empty(shape, device=device, dtype=in_dtype)
            hb = h.view(-1, *([1] * (len(shape) - 1)))

            def plain(state=state, v=v, hb=hb, xin=xin):
                state += hb * v.to(state.dtype)
                if xin is not None:
                    xin.copy_(state)

            def fused(state=state, v=v, h=h, xin=xin):
                op(state, v, h, xin)

            for _ in range(3):
                plain(), fused()
            secs = interleaved_medians({"torch": plain, "fused": fused}, device, repeats)
            (t_plain, min_plain), (t_fused, min_fused) = secs["torch"], secs["fused"]
            row = {
                "shape": list(shape),
                "v_dtype": str(v_dtype).replace("torch.", ""),
                "next_input": None if in_dtype is None else str(in_dtype).replace("torch.", ""),
                "torch_s": t_plain,
                "fused_s": t_fused,
                "torch_min_s": min_plain,
                "fused_min_s": min_fused,
                "speedup": t_plain / t_fused,
            }
            rows.append(row)
            if not verbose:
                continue
            print(
                f"euler {str(shape):20s} v={row['v_dtype']:8s} next_input={row['next_input']}"
                f"  torch {t_plain * 1e6:8.1f} us  fused {t_fused * 1e6:8.1f} us  "
                f"{row['speedup']:.2f}x",
                flush=True,
            )
    return rows


def run_rollout_benchmark(device: str = "cpu", quick: bool = False) -> list[dict]:
    """The ``reflexflow bench`` suite: :func:`bench_rollouts` rows (tiny sizes if quick)."""
    if quick:
        return bench_rollouts(device, batch=4, size=8, rollout_steps=2, repeats=3, verbose=False)
    return bench_rollouts(device, verbose=False)
