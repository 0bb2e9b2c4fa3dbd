"""Mixed precision: under torch.autocast the model runs in bf16/fp16 while the rollout
state, the targets, the FC weight and the loss stay float32.

Tolerance: the bf16/fp16 loss is within 1e-2 (relative) of the float32 loss on the same
noise, t and k (measured on CPU bf16: about 1e-4).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reflexflow as rf
from reflexflow import reference as ref

RTOL = 1e-2


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(4, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 3, 3, padding=1)
        self.dtypes = []  # dtype of the hidden activation, per call

    def forward(self, x, t):
        tt = t.view(-1, 1, 1, 1).to(x.dtype).expand(-1, 1, *x.shape[2:])
        h = self.inp(torch.cat([x, tt], 1))
        self.dtypes.append(h.dtype)
        return self.out(nn.functional.silu(h))


def _draws(device):
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(8, 3, 8, 8, generator=g)
    noise = torch.randn(x1.shape, generator=g)
    k = torch.tensor([0, 1, 2, 1, 2, 0, 1, 2])
    t = torch.rand(8, generator=g) * 0.5
    return {n: v.to(device) for n, v in dict(x1=x1, noise=noise, t=t, k=k).items()}


def _check(device: str, dtype: torch.dtype, adr_loss: str, preset: str = "grid-direction") -> None:
    torch.manual_seed(0)
    net = ConvNet().to(device)
    d = _draws(device)
    loss_fn = rf.ReflexFlowLoss(
        preset=preset, rollout_steps=2, num_sampling_steps=10, adr_loss=adr_loss
    )
    full = loss_fn(net, d["x1"], noise=d["noise"], t=d["t"], k=d["k"])
    net.dtypes.clear()
    with torch.autocast(device, dtype=dtype):
        low = loss_fn(net, d["x1"], noise=d["noise"], t=d["t"], k=d["k"])
    assert set(net.dtypes) == {dtype}  # the model ran in low precision
    for name in ("loss", "fc_loss", "adr_loss", "bias_norm", "fc_weight", "t0", "t1"):
        assert getattr(low, name).dtype == torch.float32, name
    torch.testing.assert_close(low.loss, full.loss, rtol=RTOL, atol=0)
    low.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())
    if preset != "grid-direction":
        return
    # the FC weight is the float32 reference formula applied to the low-precision rollout's
    # bias (the filter does not run in low precision)
    w = ref.fc_weight(
        _bias(net, d, dtype, device), lambda_fc=1.0, active=d["k"] > 0, sigma=2.0
    ).float()
    torch.testing.assert_close(low.fc_weight, w, rtol=1e-5, atol=1e-5)


def _bias(net, d, dtype, device):
    """delta = x^_t1 - x_t1 of the same rollout the loss ran, under autocast."""
    from reflexflow.conventions import VelocityModel
    from reflexflow.rollout import euler_rollout

    path = rf.LinearPath()
    t0, k = d["t"], d["k"]
    t1 = t0 + 0.1 * k
    x_t0 = ref.interpolate(path, d["x1"], d["noise"], t0)
    with torch.autocast(device, dtype=dtype):
        x_hat = euler_rollout(VelocityModel(net), x_t0, t0, k, torch.full_like(t0, 0.1))
    return x_hat - ref.interpolate(path, d["x1"], d["noise"], t1)


@pytest.mark.parametrize("adr_loss", ["direction", "mse"])
def test_bf16_autocast_on_cpu_keeps_state_and_loss_float32(adr_loss):
    _check("cpu", torch.bfloat16, adr_loss)


def test_bf16_autocast_on_cpu_with_the_default_preset_keeps_loss_float32():
    _check("cpu", torch.bfloat16, "mse", preset="defar")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_keeps_state_and_loss_float32(dtype):
    _check("cuda", dtype, "direction")
