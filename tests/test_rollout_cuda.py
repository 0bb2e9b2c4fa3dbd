"""CUDA: the CUDA ops and the graph-captured fixed-k rollout against the references."""

from __future__ import annotations

import pytest
import torch

import reflexflow as rf
from reflexflow import native
from reflexflow.engine import RolloutEngine
from reflexflow.reference import euler_rollout_per_sample
from reflexflow.rollout import euler_update, plan_tensors
from tests._rollout_models import TinyNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture(scope="module")
def ops():
    if not native.has_kernel("cuda"):
        pytest.skip(f"extension has no CUDA kernels: {native.extension_status()}")
    return torch.ops.reflexflow


def _inputs(batch=16, kmax=4, dtype=torch.float32, fixed=False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 8, 8, generator=gen, dtype=dtype)
    k = torch.full((batch,), kmax) if fixed else torch.randint(0, kmax + 1, (batch,), generator=gen)
    h = torch.full((batch,), 1 / 32, dtype=dtype)
    t0 = torch.rand(batch, generator=gen, dtype=dtype) * (1 - kmax * h)
    return [a.cuda() for a in (x, t0, k, h)]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("v_dtype", FLOATS)
@pytest.mark.parametrize("out_dtype", [None, *FLOATS])
def test_cuda_fused_euler_matches_torch(ops, state_dtype, v_dtype, out_dtype):
    gen = torch.Generator().manual_seed(1)
    state = torch.randn(7, 3, 5, 5, generator=gen, dtype=state_dtype).cuda()
    v = torch.randn(7, 5, 5, 3, generator=gen).to(v_dtype).cuda().permute(0, 3, 1, 2)
    h = torch.rand(7, generator=gen, dtype=state_dtype).cuda()
    out = None if out_dtype is None else torch.empty(state.shape, dtype=out_dtype, device="cuda")
    ref_state, ref_out = state.clone(), None if out is None else out.clone()
    euler_update(ref_state, v, h, ref_out)
    ops.euler_update_(state, v, h, out)
    assert torch.equal(state, ref_state)
    if out is not None:
        assert torch.equal(out, ref_out)
    ops.euler_update_(state[:0], v[:0], h[:0])  # empty prefix is a no-op


def test_cuda_plan_matches_torch_twin(ops):
    for batch, kmax in [(37, 5), (1, 0), (0, 0), (2000, 3)]:
        gen = torch.Generator().manual_seed(batch)
        k = torch.randint(0, kmax + 1, (batch,), generator=gen).cuda()
        t0 = torch.rand(batch, generator=gen).cuda()
        step = torch.rand(batch, generator=gen).cuda() * 0.1
        for g, w in zip(ops.rollout_plan(k, t0, step), plan_tensors(k, t0, step), strict=True):
            assert torch.equal(g, w)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cuda_engine_matches_per_sample_loop(ops, backend):
    vm = rf.VelocityModel(TinyNet().cuda())
    x, t0, k, h = _inputs()
    kwargs = {"y": torch.randint(0, 5, (16,), device="cuda")}
    got = RolloutEngine(backend)(vm, x, t0, k, h, kwargs)
    want = euler_rollout_per_sample(vm, x, t0, k, h, kwargs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_fixed_k_matches_reference(ops, backend, model_dtype):
    net = TinyNet().cuda().to(model_dtype)
    vm = rf.VelocityModel(net, input_dtype=model_dtype)
    engine = RolloutEngine(backend, cuda_graph=True)
    for seed in range(3):  # first call captures, later calls replay with new inputs
        x, t0, k, h = _inputs(fixed=True)
        x = x + seed
        kwargs = {"y": torch.full((16,), seed, device="cuda")}
        got = engine(vm, x, t0, k, h, kwargs)
        want = RolloutEngine("torch")(vm, x, t0, k, h, kwargs)
        tol = 1e-5 if model_dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert len(engine._graphs) == 1
    vm2 = rf.VelocityModel(net, input_dtype=model_dtype)
    engine(vm2, x, t0, k, h, kwargs)
    assert vm2.sample_forwards == int(k.sum()) and vm2.calls == int(k.max())


def test_cuda_loss_with_graph_matches_torch_backend(ops):
    net = TinyNet().cuda()
    x1 = torch.randn(8, 3, 8, 8, device="cuda")
    kw = dict(rollout_steps=3, num_sampling_steps=20, k_draw="fixed")
    out = {}
    for name, extra in (("graph", dict(cuda_graph=True)), ("torch", dict(backend="torch"))):
        gen = torch.Generator(device="cuda").manual_seed(0)
        out[name] = rf.ReflexFlowLoss(**kw, **extra)(net, x1, generator=gen)
    torch.testing.assert_close(out["graph"].loss, out["torch"].loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_rollout_of_a_channels_last_state_matches_reference(ops, model_dtype):
    """The captured graph's buffers are contiguous whatever the input layout: the fused
    update needs contiguous state and next-input buffers."""
    net = TinyNet().cuda().to(model_dtype)
    vm = rf.VelocityModel(net, input_dtype=model_dtype)
    x, t0, k, h = _inputs(fixed=True)
    x = x.contiguous(memory_format=torch.channels_last)
    kwargs = {"y": torch.zeros(16, dtype=torch.int64, device="cuda")}
    got = RolloutEngine("native", cuda_graph=True)(vm, x, t0, k, h, kwargs)
    want = RolloutEngine("torch")(vm, x, t0, k, h, kwargs)
    tol = 1e-5 if model_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_cuda_graph_cache_never_replays_another_models_graph(ops):
    """Bound methods are new objects at every access: the cache keys them by their
    instance and function, and keeps what it captured alive, so ids are never reused."""

    class Wrapper:
        def __init__(self, scale):
            self.net, self.scale = TinyNet().cuda(), scale

        def vel(self, x, t, kwargs):
            return self.scale * self.net(x, t, **(kwargs or {}))

    engine = RolloutEngine("torch", cuda_graph=True)
    x, t0, k, h = _inputs(fixed=True)
    kwargs = {"y": torch.zeros(16, dtype=torch.int64, device="cuda")}
    for scale in (1.0, -1.0, 2.0, 0.5):
        w = Wrapper(scale)
        got = engine(w.vel, x, t0, k, h, kwargs)
        want = RolloutEngine("torch")(w.vel, x, t0, k, h, kwargs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        del w


def test_cuda_graph_replays_copy_labels_given_in_any_mapping(ops):
    from types import MappingProxyType

    vm = rf.VelocityModel(TinyNet().cuda())
    engine = RolloutEngine("native", cuda_graph=True)
    x, t0, k, h = _inputs(fixed=True)
    for label in (0, 3):  # the second call replays: its labels must reach the graph
        kwargs = MappingProxyType({"y": torch.full((16,), label, device="cuda")})
        got = engine(vm, x, t0, k, h, kwargs)
        want = RolloutEngine("torch")(vm, x, t0, k, h, dict(kwargs))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
