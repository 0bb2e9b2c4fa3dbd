"""pytest-benchmark twin of bench_rollout.py (small UNet, B = 16, K = 4, uniform k).

python -m pytest benchmarks/test_bench_rollout.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

import reflexflow as rf
from reflexflow import native
from reflexflow.demo.toy_models import SmallUNet
from reflexflow.engine import RolloutEngine
from reflexflow.reference import euler_rollout_per_sample

MODES = ["per_sample", "engine_torch", "engine_native"]


@pytest.mark.parametrize("mode", MODES)
def test_rollout_small_unet(benchmark, mode):
    if mode == "engine_native" and not native.has_kernel("cpu"):
        pytest.skip("C++ extension not loaded")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 16, 16, generator=gen)
    k = torch.randint(1, 5, (16,), generator=gen)
    t0 = torch.rand(16, generator=gen) * 0.9
    h = torch.full((16,), 0.02)
    vm = rf.VelocityModel(SmallUNet().eval())
    run = {
        "per_sample": lambda: euler_rollout_per_sample(vm, x, t0, k, h),
        "engine_torch": lambda: RolloutEngine("torch")(vm, x, t0, k, h),
        "engine_native": lambda: RolloutEngine("native")(vm, x, t0, k, h),
    }[mode]
    with torch.no_grad():
        benchmark(run)
