"""Host reads on the rollout's hot path, counted on CPU (tests/_host_sync.py).

Fixed k (the masked static plan) makes none on the torch and native paths; per-sample k
makes exactly the one documented read (``k.tolist()``, the prefix lengths). The CUDA
twin of these tests, with torch.cuda.set_sync_debug_mode("error"), is
tests/test_sync_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

import reflexflow as rf
from reflexflow import native
from reflexflow.engine import RolloutEngine
from reflexflow.rollout import euler_rollout
from tests._host_sync import count_host_reads
from tests.helpers import TinyNet

BACKENDS = ["torch", "native"]


def _engine(backend: str) -> RolloutEngine:
    if backend == "native" and not native.has_kernel("cpu"):
        pytest.skip(f"C++ extension not loaded: {native.extension_status()['reason']}")
    return RolloutEngine(backend)


def _inputs(batch=6, kmax=2):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 6, 6, generator=gen)
    k = torch.randint(0, kmax + 1, (batch,), generator=gen)
    h = torch.full((batch,), 0.05)
    t0 = torch.rand(batch, generator=gen) * 0.5
    return x, t0, k, h


def test_the_counter_sees_python_reads_and_syncing_aten_ops():
    t = torch.tensor([0.0, 1.0, 2.0])
    with count_host_reads() as events:
        t.sum().item()
        t.tolist()
        bool(t.any())
        torch.nonzero(t)
        torch.equal(t, t)
        torch.tensor([1.0], device="cpu")
    for name in (
        "Tensor.item",
        "Tensor.tolist",
        "Tensor.__bool__",
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::equal",
        "torch.tensor(device=...)",
    ):
        assert name in events, (name, events)
    with count_host_reads() as events:
        (t * 2 + 1).sin()
    assert events == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_k_rollout_reads_nothing_from_the_device(backend):
    engine = _engine(backend)
    vm = rf.VelocityModel(TinyNet().to(torch.bfloat16), input_dtype=torch.bfloat16)
    x, t0, k, h = _inputs()
    kwargs = {"y": torch.arange(6) % 5}
    engine(vm, x, t0, k, h, kwargs, fixed_k=2)  # warm-up (extension loading, caches)
    with count_host_reads() as events:
        engine(vm, x, t0, k, h, kwargs, fixed_k=2)
    assert events == []


def test_fixed_k_torch_twin_reads_nothing_from_the_device():
    vm = rf.VelocityModel(TinyNet())
    x, t0, k, h = _inputs()
    with count_host_reads() as events:
        euler_rollout(vm, x, t0, k, h, fixed_k=2)
    assert events == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_k_rollout_makes_exactly_one_host_read(backend):
    engine = _engine(backend)
    vm = rf.VelocityModel(TinyNet())
    x, t0, k, h = _inputs(batch=9, kmax=3)
    engine(vm, x, t0, k, h)
    with count_host_reads() as events:
        engine(vm, x, t0, k, h)
    assert events == ["Tensor.tolist"]


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_loss_in_fixed_k_mode_reads_nothing_from_the_device(backend):
    """A whole ReflexFlowLoss step (forward and backward) with k drawn in fixed-k mode."""
    net = TinyNet()
    loss_fn = rf.ReflexFlowLoss(
        rollout_steps=2, k_draw="fixed", num_sampling_steps=20, backend=backend
    )
    x1 = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    loss_fn(net, x1).loss.backward()  # warm-up
    with count_host_reads() as events:
        loss_fn(net, x1).loss.backward()
    assert events == []
