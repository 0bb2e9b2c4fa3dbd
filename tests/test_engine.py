"""RolloutEngine (reflexflow/engine.py) against the per-sample loop oracle
(reference.euler_rollout_per_sample); its CUDA graphs are tests/test_graphs.py's."""

from __future__ import annotations

import pytest
import torch

import reflexflow as rf
from reflexflow import native
from reflexflow.engine import RolloutEngine
from reflexflow.reference import euler_rollout_per_sample
from tests.helpers import Counting, TinyNet, assert_rollout_matches_oracle, rollout_inputs

BACKENDS = ["torch", "native"]


def _backend(name: str) -> RolloutEngine:
    if name == "native" and not native.has_kernel("cpu"):
        pytest.skip(f"C++ extension not loaded: {native.extension_status()['reason']}")
    return RolloutEngine(name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_k_with_zeros_matches_per_sample_loop(backend):
    engine = _backend(backend)
    vm = rf.VelocityModel(TinyNet())
    x, t0, k, h = rollout_inputs()
    got = engine(vm, x, t0, k, h)
    want = euler_rollout_per_sample(vm, x, t0, k, h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[k == 0], x[k == 0])  # k = 0: bit for bit unchanged


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_k_matches_per_sample_loop(backend):
    engine = _backend(backend)
    vm = rf.VelocityModel(TinyNet())
    x, t0, _, h = rollout_inputs()
    k = torch.full((x.shape[0],), 3)
    assert_rollout_matches_oracle(engine, vm, x, t0, k, h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_step_schedule_with_per_sample_steps(backend):
    engine = _backend(backend)
    vm = rf.VelocityModel(TinyNet())
    x, t0, _, _ = rollout_inputs()
    gen = torch.Generator().manual_seed(3)
    k = (torch.rand(x.shape[0], generator=gen) < 0.6).long()
    h = (1 - 1e-3 - t0) * torch.rand(x.shape[0], generator=gen)  # t1 = t0 + (1 - t0) U
    assert_rollout_matches_oracle(engine, vm, x, t0, k, h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_kwargs_follow_the_permutation(backend):
    engine = _backend(backend)
    vm = rf.VelocityModel(TinyNet())
    x, t0, k, h = rollout_inputs(batch=9, kmax=4, seed=1)
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
    x, t0, k, h = rollout_inputs(seed=4)
    got = engine(vm, x, t0, k, h)
    assert got.dtype == torch.float32 and set(seen) == {torch.bfloat16}
    torch.testing.assert_close(got, euler_rollout_per_sample(vm, x, t0, k, h), rtol=0, atol=2e-2)


def test_native_and_torch_engines_agree_bit_for_bit():
    native_engine = _backend("native")
    vm = rf.VelocityModel(TinyNet().to(torch.bfloat16), input_dtype=torch.bfloat16)
    x, t0, k, h = rollout_inputs(batch=11, kmax=5, seed=5)
    assert torch.equal(native_engine(vm, x, t0, k, h), RolloutEngine("torch")(vm, x, t0, k, h))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_state_stays_float64(backend):
    engine = _backend(backend)
    vm = rf.VelocityModel(TinyNet().double())
    x, t0, k, h = rollout_inputs(dtype=torch.float64)
    got = engine(vm, x, t0, k, h)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, euler_rollout_per_sample(vm, x, t0, k, h))


@pytest.mark.parametrize("backend", BACKENDS)
def test_counting_model_sees_sum_of_k_sample_forwards(backend):
    engine = _backend(backend)
    x, t0, k, h = rollout_inputs(batch=10, kmax=4, seed=6)
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
    x, t0, _, h = rollout_inputs()
    counting = Counting(rf.VelocityModel(TinyNet()))
    out = engine(counting, x, t0, torch.zeros(x.shape[0], dtype=torch.int64), h)
    assert torch.equal(out, x) and counting.sizes == []


def test_engine_rejects_unknown_backend_and_non_bool_graph():
    with pytest.raises(ValueError, match="backend"):
        RolloutEngine("cuda")
    with pytest.raises(ValueError, match="backend"):  # the objective's choice, not the rollout's
        RolloutEngine("triton")
    with pytest.raises(TypeError, match="cuda_graph"):
        RolloutEngine("auto", cuda_graph=1)


def test_torch_backend_never_touches_the_extension(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the extension was consulted")

    monkeypatch.setattr(native, "has_kernel", boom)
    vm = rf.VelocityModel(TinyNet())
    x, t0, k, h = rollout_inputs()
    torch.testing.assert_close(
        RolloutEngine("torch")(vm, x, t0, k, h), euler_rollout_per_sample(vm, x, t0, k, h)
    )
    loss_fn = rf.ReflexFlowLoss(rollout_steps=2, num_sampling_steps=20, rollout_backend="torch")
    assert torch.isfinite(loss_fn(TinyNet(), x).loss)


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
    x, t0, k, h = rollout_inputs(seed=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = engine(vm, x, t0, k, h)
        want = euler_rollout_per_sample(vm, x, t0, k, h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=3e-2)


def test_rollout_backend_is_the_rollouts_knob_and_backend_the_objectives(monkeypatch):
    from reflexflow.native import NATIVE_OPS
    from reflexflow.rollout import TORCH_OPS

    with pytest.raises(ValueError, match="rollout_backend must be one of"):
        rf.ReflexFlowConfig(rollout_backend="triton")
    x = torch.zeros(2, 3, 6, 6)
    assert rf.ReflexFlowLoss(rollout_backend="torch").engine.ops_for(x) is TORCH_OPS
    monkeypatch.setattr(native, "has_kernel", lambda device: True)
    for backend in ("torch", "auto"):  # the objective's backend leaves the rollout alone
        engine = rf.ReflexFlowLoss(backend=backend).engine
        assert engine.backend == "auto" and engine.ops_for(x) is NATIVE_OPS
    assert rf.ReflexFlowLoss(rollout_backend="native").engine.ops_for(x) is NATIVE_OPS
    assert RolloutEngine("auto").ops_for(x.half()) is TORCH_OPS  # no half-precision op


def test_native_rollout_backend_without_the_extension_is_a_clear_value_error(monkeypatch):
    monkeypatch.setattr(native, "has_kernel", lambda device: False)
    monkeypatch.setitem(native._state, "reason", "REFLEXFLOW_NO_EXT=1")
    vm = rf.VelocityModel(TinyNet())
    x, t0, k, h = rollout_inputs()
    with pytest.raises(ValueError, match="rollout_backend='native'.*REFLEXFLOW_NO_EXT=1"):
        RolloutEngine("native")(vm, x, t0, k, h)
    loss_fn = rf.ReflexFlowLoss(rollout_steps=2, num_sampling_steps=20, rollout_backend="native")
    with pytest.raises(ValueError, match="rollout_backend='native'"):
        loss_fn(TinyNet(), x)
    torch.testing.assert_close(  # "auto" falls back to the PyTorch twins
        RolloutEngine("auto")(vm, x, t0, k, h), euler_rollout_per_sample(vm, x, t0, k, h)
    )


def _old_static_plan(velocity, x, t0, step, kwargs, steps):
    """The fixed-k plan before masking (every k_i = K): K plain steps x += step * v."""
    with torch.no_grad():
        xs, ts = x.clone(), t0.clone()
        for _ in range(steps):
            xs += step.view(-1, 1, 1, 1) * velocity(xs, ts, kwargs)
            ts += step
    return xs


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_k_masked_plan_with_zeros_matches_per_sample_loop(backend):
    """fixed_k=K: k_i in {0..K}; rows move only while k_i > j, k_i = 0 rows stay put."""
    engine = _backend(backend)
    vm = rf.VelocityModel(TinyNet())
    x, t0, k, h = rollout_inputs(batch=9, kmax=3, seed=11)
    kwargs = {"y": torch.arange(9) % 5}
    got = engine(vm, x, t0, k, h, kwargs, fixed_k=3)
    assert vm.calls == 3 and vm.sample_forwards == 3 * 9  # K full-batch calls
    want = euler_rollout_per_sample(vm, x, t0, k, h, kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[k == 0], x[k == 0])  # bit for bit


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_k_with_every_k_equal_is_bit_identical_to_the_unmasked_static_plan(backend):
    engine = _backend(backend)
    vm = rf.VelocityModel(TinyNet())
    x, t0, _, h = rollout_inputs(batch=6, kmax=4, seed=12)
    k = torch.full((6,), 4)
    kwargs = {"y": torch.arange(6) % 5}
    got = engine(vm, x, t0, k, h, kwargs, fixed_k=4)
    assert torch.equal(got, _old_static_plan(vm, x, t0, h, kwargs, 4))


def test_fixed_k_native_and_torch_engines_agree_bit_for_bit_with_a_bf16_model():
    native_engine = _backend("native")
    vm = rf.VelocityModel(TinyNet().to(torch.bfloat16), input_dtype=torch.bfloat16)
    x, t0, k, h = rollout_inputs(batch=11, kmax=5, seed=13)
    got = native_engine(vm, x, t0, k, h, fixed_k=5)
    want = RolloutEngine("torch")(vm, x, t0, k, h, fixed_k=5)
    assert torch.equal(got, want)
    assert torch.equal(got[k == 0], x[k == 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_k_finished_rows_ignore_nan_velocities(backend):
    """Rows past their k_i are selected out, not multiplied by 0: a NaN the model returns
    for them cannot leak into the result."""
    engine = _backend(backend)
    x, t0, _, h = rollout_inputs(batch=4, kmax=2, seed=14)
    k = torch.tensor([0, 1, 2, 2])

    def velocity(xs, ts, kwargs=None):
        v = -xs
        v[0] = float("nan")  # row 0 has k = 0
        return v

    got = engine(velocity, x, t0, k, h, fixed_k=2)
    assert torch.equal(got[0], x[0]) and bool(torch.isfinite(got).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_k_zero_makes_no_model_call_and_bad_fixed_k_is_rejected(backend):
    engine = _backend(backend)
    x, t0, _, h = rollout_inputs()
    counting = Counting(rf.VelocityModel(TinyNet()))
    k = torch.zeros(x.shape[0], dtype=torch.int64)
    assert torch.equal(engine(counting, x, t0, k, h, fixed_k=0), x) and counting.sizes == []
    with pytest.raises(TypeError, match="fixed_k must be an int"):
        engine(counting, x, t0, k, h, fixed_k=True)
    with pytest.raises(TypeError, match="fixed_k must be an int"):
        engine(counting, x, t0, k, h, fixed_k=2.0)
    with pytest.raises(ValueError, match="fixed_k must be >= 0"):
        engine(counting, x, t0, k, h, fixed_k=-1)


def test_per_sample_k_rejects_negative_k():
    x, t0, _, h = rollout_inputs(batch=3)
    with pytest.raises(ValueError, match="k must be >= 0"):
        RolloutEngine("torch")(rf.VelocityModel(TinyNet()), x, t0, torch.tensor([1, -1, 0]), h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fixed_k", [None, 3])
def test_expanded_time_and_step_tensors_are_accepted(backend, fixed_k):
    """t0 and step given as stride-0 views (t0.expand(B)): the in-place buffers are copies."""
    engine = _backend(backend)
    vm = rf.VelocityModel(TinyNet())
    x, _, k, _ = rollout_inputs(batch=5, kmax=3, seed=18)
    t0, h = torch.tensor(0.2).expand(5), torch.tensor(0.05).expand(5)
    got = engine(vm, x, t0, k, h, fixed_k=fixed_k)
    want = euler_rollout_per_sample(vm, x, t0.contiguous(), k, h.contiguous())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
