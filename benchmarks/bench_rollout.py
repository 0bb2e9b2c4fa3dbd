"""Benchmark of the scheduled-sampling rollout: per-sample loop vs batched engines.

Rows (each: median seconds per rollout, sample-forwards per rollout, speedup vs the
per-sample loop):

  per_sample     one batch-1 model call per sample and step (SimpleTuner's ReflexFlow
                 option; reflexflow.reference.euler_rollout_per_sample)
  lockstep       full batch for max k steps, finished samples masked (B * max k forwards)
  engine_torch   RolloutEngine("torch"): prefix-compacted, pure PyTorch (sum k forwards)
  engine_native  RolloutEngine("native"): the same with the C++/CUDA ops
  graph          RolloutEngine("native", cuda_graph=True), fixed k only, CUDA only

plus a micro-benchmark of the fused Euler update (torch.ops.reflexflow.euler_update_)
against plain PyTorch (state += h * v; xin.copy_(state)).

    python benchmarks/bench_rollout.py                      # CPU, small sizes
    python benchmarks/bench_rollout.py --device cuda --batch 64 --size 32 --repeats 20

Writes benchmarks/results/rollout-<device>.json (device, torch version, date, load).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

if __package__ in (None, "") and importlib.util.find_spec("reflexflow") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout

import reflexflow as rf  # noqa: E402
from reflexflow import native  # noqa: E402
from reflexflow.engine import RolloutEngine  # noqa: E402
from reflexflow.reference import bcast, euler_rollout_per_sample  # noqa: E402


def time_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
    ang = t.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class SmallUNet(nn.Module):
    """Two-level conv UNet with a time embedding added at every block."""

    def __init__(self, channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.temb = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2 * width))
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.out = nn.Conv2d(2 * width, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.temb(time_embedding(t, self.width).to(x.dtype))
        h1 = self.act(self.inp(x)) + emb[:, : self.width, None, None]
        h2 = self.act(self.down(h1)) + emb[:, :, None, None]
        h2 = self.act(self.mid(h2))
        u = self.act(self.up(h2))
        return self.out(torch.cat([u, h1], dim=1))


class SmallDiT(nn.Module):
    """Patchify (4x4), a few pre-norm transformer blocks with adaLN-style time shift."""

    def __init__(self, channels: int = 3, size: int = 16, dim: int = 128, depth: int = 2):
        super().__init__()
        self.p, self.size, self.dim = 4, size, dim
        self.embed = nn.Linear(channels * 16, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, (size // 4) ** 2, dim))
        self.temb = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 2 * dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, channels * 16)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        p = self.p
        tok = x.reshape(b, c, hgt // p, p, wid // p, p).permute(0, 2, 4, 1, 3, 5)
        tok = self.embed(tok.reshape(b, -1, c * p * p)) + self.pos
        scale, shift = self.temb(time_embedding(t, self.dim).to(x.dtype)).chunk(2, dim=1)
        tok = tok * (1 + scale[:, None]) + shift[:, None]
        out = self.head(self.blocks(tok))
        out = out.reshape(b, hgt // p, wid // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, hgt, wid)


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


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def rollout_modes(x, t0, k, step, native_ok: bool, graph_ok: bool) -> dict:
    """name -> fn(velocity) for every rollout implementation that applies."""
    modes = {
        "per_sample": lambda vm: euler_rollout_per_sample(vm, x, t0, k, step),
        "lockstep": lambda vm: lockstep_rollout(vm, x, t0, k, step),
        "engine_torch": lambda vm: RolloutEngine("torch")(vm, x, t0, k, step),
    }
    if native_ok:
        native_engine = RolloutEngine("native")
        modes["engine_native"] = lambda vm: native_engine(vm, x, t0, k, step)
    if graph_ok:
        graph_engine = RolloutEngine("native", cuda_graph=True)
        modes["graph"] = lambda vm: graph_engine(vm, x, t0, k, step)
    return modes


def bench_rollouts(args, device: torch.device) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    h = 1.0 / args.sampling_steps
    native_ok = native.has_kernel(device)
    for model_name, ctor in (("unet", SmallUNet), ("dit", SmallDiT)):
        net = ctor().to(device).eval()
        for kmode in ("uniform", "fixed"):
            b, kmax = args.batch, args.rollout_steps
            if kmode == "fixed":
                k = torch.full((b,), kmax)
            else:
                k = torch.randint(1, kmax + 1, (b,), generator=gen)
            x = torch.randn(b, 3, args.size, args.size, generator=gen)
            t0 = torch.rand(b, generator=gen) * (1 - kmax * h - 1e-3)
            x, t0, k = x.to(device), t0.to(device), k.to(device)
            step = torch.full_like(t0, h)
            graph_ok = native_ok and device.type == "cuda" and kmode == "fixed"
            modes = rollout_modes(x, t0, k, step, native_ok, graph_ok)
            forwards, fns = {}, {}
            for mode, fn in modes.items():
                if mode == "per_sample" and args.skip_per_sample:
                    continue
                counter = rf.VelocityModel(net)
                with torch.no_grad():
                    fn(counter)  # also the warm-up (and the CUDA graph capture)
                forwards[mode] = counter.sample_forwards
                vm = rf.VelocityModel(net)
                fns[mode] = lambda fn=fn, vm=vm: fn(vm)
            with torch.no_grad():
                secs = interleaved_medians(fns, device, args.repeats)
            base = secs["per_sample"][0] if "per_sample" in secs else None
            for mode, (sec, best) in secs.items():
                row = {
                    "model": model_name,
                    "k_draw": kmode,
                    "batch": b,
                    "K": kmax,
                    "size": args.size,
                    "mode": mode,
                    "median_s": sec,
                    "min_s": best,
                    "sample_forwards": forwards[mode],
                    "speedup_vs_per_sample": None if base is None else base / sec,
                }
                rows.append(row)
                print(
                    f"{model_name:5s} k={kmode:7s} {mode:14s} {sec * 1e3:9.2f} ms  "
                    f"forwards={forwards[mode]:4d}  "
                    f"speedup={row['speedup_vs_per_sample'] or 0:.2f}x",
                    flush=True,
                )
    return rows


def bench_fused_update(args, device: torch.device) -> list[dict]:
    if not native.has_kernel(device):
        return []
    rows = []
    op = torch.ops.reflexflow.euler_update_
    for shape in [tuple(s) for s in args.update_shapes]:
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
            secs = interleaved_medians(
                {"torch": plain, "fused": fused}, device, args.update_repeats
            )
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
            print(
                f"euler {str(shape):20s} v={row['v_dtype']:8s} next_input={row['next_input']}"
                f"  torch {t_plain * 1e6:8.1f} us  fused {t_fused * 1e6:8.1f} us  "
                f"{row['speedup']:.2f}x",
                flush=True,
            )
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def uptime() -> str | None:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--rollout-steps", type=int, default=4)
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--update-repeats", type=int, default=30)
    parser.add_argument(
        "--update-shapes",
        type=lambda s: [int(v) for v in s.split("x")],
        nargs="+",
        default=[[16, 3, 16, 16], [64, 4, 64, 64]],
        help="shapes like 16x3x16x16",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared host)"
    )
    parser.add_argument("--skip-per-sample", action="store_true")
    parser.add_argument("--out", default=None, help="JSON path (default: results/rollout-<device>)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before, uptime_before = load_average(), uptime()
    ext = native.load_extension()
    result = {
        "benchmark": "rollout",
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": load_before,
        "uptime_before": uptime_before,
        "extension": native.extension_status() if ext else {"loaded": False},
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "rollouts": bench_rollouts(args, device),
        "fused_update": bench_fused_update(args, device),
        "load_average_after": load_average(),
        "uptime_after": uptime(),
    }
    out = (
        Path(args.out)
        if args.out
        else (Path(__file__).resolve().parent / "results" / f"rollout-{device.type}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
