"""RolloutEngine against the per-sample loop oracle (reference.euler_rollout_per_sample)."""

from __future__ import annotations

import pytest
import torch

import reflexflow as rf
from reflexflow import native
from reflexflow.engine import RolloutEngine, rollout
from reflexflow.reference import euler_rollout_per_sample
from tests._rollout_models import Counting, TinyNet

BACKENDS = ["torch", "native"]


def _backend(name: str) -> RolloutEngine:
    if name == "native" and not native.has_kernel("cpu"):
        pytest.skip(f"C++ extension not loaded: {native.extension_status()['reason']}")
    return RolloutEngine(name)


def _inputs(batch=7, kmax=3, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 6, 6, generator=gen, dtype=dtype)
    k = torch.randint(0, kmax + 1, (batch,), generator=gen)
    k[0] = 0  # at least one zero
    h = torch.full((batch,), 1 / 20, dtype=dtype)
    t0 = torch.rand(batch, generator=gen, dtype=dtype) * (1 - kmax * h)
    return x, t0, k, h


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_k_with_zeros_matches_per_sample_loop(backend):
    engine = _backend(backend)
    vm = rf.VelocityModel(TinyNet())
    x, t0, k, h = _inputs()
    got = engine(vm, x, t0, k, h)
    want = euler_rollout_per_sample(vm, x, t0, k, h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[k == 0], x[k == 0])  # k = 0: bit for bit unchanged


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_k_matches_per_sample_loop(backend):
    engine = _backend(backend)
    vm = rf.VelocityModel(TinyNet())
    x, t0, _, h = _inputs()
    k = torch.full((x.shape[0],), 3)
    torch.testing.assert_close(
        engine(vm, x, t0, k, h), euler_rollout_per_sample(vm, x, t0, k, h), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_step_schedule_with_per_sample_steps(backend):
    engine = _backend(backend)
    vm = rf.VelocityModel(TinyNet())
    x, t0, _, _ = _inputs()
    gen = torch.Generator().manual_seed(3)
    k = (torch.rand(x.shape[0], generator=gen) < 0.6).long()
    h = (1 - 1e-3 - t0) * torch.rand(x.shape[0], generator=gen)  # t1 = t0 + (1 - t0) U
    torch.testing.assert_close(
        engine(vm, x, t0, k, h), euler_rollout_per_sample(vm, x, t0, k, h), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_kwargs_follow_the_permutation(backend):
    engine = _backend(backend)
    vm = rf.VelocityModel(TinyNet())
    x, t0, k, h = _inputs(batch=9, kmax=4, seed=1)
    gen = torch.Generator().manual_seed(2)
    kwargs = {"y": torch.randint(0, 5, (9,), generator=gen), "emb": torch.randn(9, 2, 4)}
    got = engine(vm, x, t0, k, h, kwargs)
    want = euler_rollout_per_sample(vm, x, t0, k, h, kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the labels matter: a rollout without them differs
    assert not torch.allclose(got, engine(vm, x, t0, k, h))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_model_with_float32_state(backend):
    engine = _backend(backend)
    net = TinyNet().to(torch.bfloat16)
    seen = []

    def model(x, t):
        seen.append(x.dtype)
        return net(x, t)

    vm = rf.VelocityModel(model, input_dtype=torch.bfloat16)
    x, t0, k, h = _inputs(seed=4)
    got = engine(vm, x, t0, k, h)
    assert got.dtype == torch.float32 and set(seen) == {torch.bfloat16}
    torch.testing.assert_close(got, euler_rollout_per_sample(vm, x, t0, k, h), rtol=0, atol=2e-2)


def test_native_and_torch_engines_agree_bit_for_bit():
    native_engine = _backend("native")
    vm = rf.VelocityModel(TinyNet().to(torch.bfloat16), input_dtype=torch.bfloat16)
    x, t0, k, h = _inputs(batch=11, kmax=5, seed=5)
    assert torch.equal(native_engine(vm, x, t0, k, h), RolloutEngine("torch")(vm, x, t0, k, h))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_state_stays_float64(backend):
    engine = _backend(backend)
    vm = rf.VelocityModel(TinyNet().double())
    x, t0, k, h = _inputs(dtype=torch.float64)
    got = engine(vm, x, t0, k, h)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, euler_rollout_per_sample(vm, x, t0, k, h))


@pytest.mark.parametrize("backend", BACKENDS)
def test_counting_model_sees_sum_of_k_sample_forwards(backend):
    engine = _backend(backend)
    x, t0, k, h = _inputs(batch=10, kmax=4, seed=6)
    counting = Counting(rf.VelocityModel(TinyNet()))
    engine(counting, x, t0, k, h)
    assert sum(counting.sizes) == int(k.sum())
    assert counting.sizes == sorted(counting.sizes, reverse=True)  # shrinking prefixes
    assert len(counting.sizes) == int(k.max())
    vm = rf.VelocityModel(TinyNet())
    engine(vm, x, t0, k, h)
    assert vm.sample_forwards == int(k.sum()) and vm.calls == int(k.max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_k_makes_no_model_call(backend):
    engine = _backend(backend)
    x, t0, _, h = _inputs()
    counting = Counting(rf.VelocityModel(TinyNet()))
    out = engine(counting, x, t0, torch.zeros(x.shape[0], dtype=torch.int64), h)
    assert torch.equal(out, x) and counting.sizes == []


def test_engine_rejects_unknown_backend_and_non_bool_graph():
    with pytest.raises(ValueError, match="backend"):
        RolloutEngine("cuda")
    with pytest.raises(TypeError, match="cuda_graph"):
        RolloutEngine("auto", cuda_graph=1)


def test_torch_backend_never_touches_the_extension(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the extension was consulted")

    monkeypatch.setattr(native, "has_kernel", boom)
    vm = rf.VelocityModel(TinyNet())
    x, t0, k, h = _inputs()
    torch.testing.assert_close(
        rollout(vm, x, t0, k, h, backend="torch"), euler_rollout_per_sample(vm, x, t0, k, h)
    )


def test_loss_backends_agree():
    net = TinyNet()
    x1 = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    out = {}
    for backend in ("torch", "auto"):
        fn = rf.ReflexFlowLoss(rollout_steps=3, num_sampling_steps=20, backend=backend)
        out[backend] = fn(net, x1, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(out["auto"].loss, out["torch"].loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["auto"].bias_norm, out["torch"].bias_norm, rtol=1e-6, atol=0)


def test_loss_cuda_graph_knob_is_validated():
    with pytest.raises(TypeError, match="cuda_graph"):
        rf.ReflexFlowConfig(cuda_graph="yes")
    # on CPU the knob is a no-op: same loss as without it
    net = TinyNet()
    x1 = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(9))
    kw = dict(rollout_steps=2, num_sampling_steps=20, k_draw="fixed")
    a = rf.ReflexFlowLoss(cuda_graph=True, **kw)(
        net, x1, generator=torch.Generator().manual_seed(1)
    )
    b = rf.ReflexFlowLoss(**kw)(net, x1, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.loss, b.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_model_keeps_a_float32_state(backend):
    engine = _backend(backend)
    vm = rf.VelocityModel(TinyNet())
    x, t0, k, h = _inputs(seed=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = engine(vm, x, t0, k, h)
        want = euler_rollout_per_sample(vm, x, t0, k, h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=3e-2)


def test_clear_graph_cache_empties_every_engine():
    from reflexflow import engine as engine_mod

    eng = RolloutEngine("torch", cuda_graph=True)
    eng._graphs[("fake",)] = object()
    eng.clear_graphs()
    assert eng._graphs == {}
    rollout(rf.VelocityModel(TinyNet()), *_inputs(), backend="torch", cuda_graph=True)
    engine_mod.clear_graph_cache()
    assert all(not e._graphs for e in engine_mod._ENGINES.values())
