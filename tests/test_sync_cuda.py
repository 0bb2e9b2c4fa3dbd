"""CUDA: a whole ReflexFlowLoss step in fixed-k mode makes no host sync.

torch.cuda.set_sync_debug_mode("error") turns every synchronising CUDA call (a
device-to-host read such as .item() or .tolist(), a blocking host-to-device copy such as
torch.tensor(list, device="cuda"), a stream synchronisation) into a RuntimeError, from
Python or from C++. Around the loss's forward and backward in fixed-k mode (k_draw="fixed",
ss_prob=1: the masked static rollout plan) none may happen, on every backend, with and
without the CUDA-graph rollout and bf16 autocast. The CPU twin of this check is
tests/test_host_sync.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import reflexflow as rf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _Net(nn.Module):
    """A conv velocity model whose time embedding is built on the device (no host data)."""

    def __init__(self, channels: int = 4, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.temb = nn.Linear(8, width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t):
        freqs = torch.exp(-torch.arange(4, device=t.device, dtype=torch.float32))
        ang = t.float()[:, None] * 1000 * freqs[None]
        emb = self.temb(torch.cat([ang.sin(), ang.cos()], dim=1).to(x.dtype))
        hidden = nn.functional.silu(self.inp(x) + emb[:, :, None, None])
        return self.out(hidden)


@contextlib.contextmanager
def _sync_errors():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _step(loss_fn, net, x1, gen, amp: bool):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        out = loss_fn(net, x1, generator=gen)
    out.loss.backward()
    return out


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager-rollout", "graph-rollout"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_fixed_k_loss_step_makes_no_host_sync(backend, cuda_graph, amp):
    torch.manual_seed(0)
    net = _Net().cuda()
    loss_fn = rf.ReflexFlowLoss(
        rollout_steps=2,
        k_draw="fixed",
        num_sampling_steps=20,
        backend=backend,
        rollout_backend=backend,  # "torch": the PyTorch rollout too, as before the split
        cuda_graph=cuda_graph,
    )
    x1 = torch.randn(8, 4, 16, 16, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(2):  # warm-up: kernel compilation, extension loading, graph capture
        _step(loss_fn, net, x1, gen, amp)
    with _sync_errors():
        out = _step(loss_fn, net, x1, gen, amp)
    assert bool(torch.isfinite(out.loss))
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())


def test_the_sync_check_catches_the_per_sample_rollout_read():
    """Per-sample k (k_draw="uniform") reads the prefix lengths once: the check sees it, so
    the test above cannot pass vacuously."""
    net = _Net().cuda()
    loss_fn = rf.ReflexFlowLoss(rollout_steps=2, k_draw="uniform", num_sampling_steps=20)
    x1 = torch.randn(8, 4, 16, 16, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    _step(loss_fn, net, x1, gen, False)
    with pytest.raises(RuntimeError, match="synchroniz"), _sync_errors():
        _step(loss_fn, net, x1, gen, False)
