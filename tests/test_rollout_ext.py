"""The C++ ops against their PyTorch twins; the loader's fallback; the .cu compiles."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from reflexflow import native
from reflexflow.rollout import euler_update, plan_tensors

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
STATES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def ops():
    if not native.has_kernel("cpu"):
        pytest.skip(f"C++ extension not loaded: {native.extension_status()['reason']}")
    return torch.ops.reflexflow


def _case(state_dtype, v_dtype, n=5, shape=(3, 4, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = torch.randn(n, *shape, generator=gen, dtype=torch.float64).to(state_dtype)
    v = torch.randn(n, *shape, generator=gen, dtype=torch.float64).to(v_dtype)
    h = torch.rand(n, generator=gen, dtype=torch.float64).to(state_dtype)
    return state, v, h


def test_extension_loads_in_a_source_checkout():
    if os.environ.get("REFLEXFLOW_NO_EXT") == "1" or shutil.which("c++") is None:
        pytest.skip("extension disabled or no C++ compiler")
    assert native.load_extension(), native.extension_status()["reason"]


@pytest.mark.parametrize("state_dtype", STATES)
@pytest.mark.parametrize("v_dtype", FLOATS)
@pytest.mark.parametrize("out_dtype", [None, *FLOATS])
def test_fused_euler_matches_state_plus_h_times_v(ops, state_dtype, v_dtype, out_dtype):
    state, v, h = _case(state_dtype, v_dtype)
    want = state + h.view(-1, 1, 1, 1) * v.to(state_dtype)
    out = None if out_dtype is None else torch.empty(state.shape, dtype=out_dtype)
    ops.euler_update_(state, v, h, out)
    assert torch.equal(state, want)  # bit for bit: product and sum rounded separately
    if out is not None:
        assert torch.equal(out, want.to(out_dtype))


def test_fused_euler_non_contiguous_v_and_scalar_h(ops):
    state, _, _ = _case(torch.float32, torch.float32)
    v_big = torch.randn(4, 4, 3, 5, dtype=torch.bfloat16)
    v = v_big.permute(3, 2, 0, 1)  # (5, 3, 4, 4), not contiguous
    assert not v.is_contiguous()
    h = torch.tensor(0.125)
    want = state + h * v.float()
    ops.euler_update_(state, v, h)
    assert torch.equal(state, want)


def test_fused_euler_on_a_prefix_view_leaves_the_rest(ops):
    state, v, h = _case(torch.float32, torch.float16, n=6)
    ref = state.clone()
    euler_update(ref[:4], v[:4], h[:4])
    ops.euler_update_(state[:4], v[:4], h[:4])
    assert torch.equal(state, ref)
    before = state.clone()
    ops.euler_update_(state[:0], v[:0], h[:0], torch.empty(0, 3, 4, 4))  # empty prefix
    assert torch.equal(state, before)


def test_torch_twin_matches_the_op(ops):
    for v_dtype in FLOATS:
        a, v, h = _case(torch.float32, v_dtype, seed=3)
        b = a.clone()
        oa, ob = (
            torch.empty(a.shape, dtype=torch.bfloat16),
            torch.empty(a.shape, dtype=torch.bfloat16),
        )
        ops.euler_update_(a, v, h, oa)
        euler_update(b, v, h, ob)
        assert torch.equal(a, b) and torch.equal(oa, ob)


def test_fused_euler_rejects_bad_arguments(ops):
    state, v, h = _case(torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="state must be float32 or float64"):
        ops.euler_update_(state.half(), v, h)
    with pytest.raises(RuntimeError, match="v has shape"):
        ops.euler_update_(state, v[:2], h)
    with pytest.raises(RuntimeError, match="h must have one element"):
        ops.euler_update_(state, v, h[:2])
    with pytest.raises(RuntimeError, match="state must be contiguous"):
        ops.euler_update_(state.transpose(2, 3), v, h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rollout_plan_matches_torch_twin(ops, dtype):
    gen = torch.Generator().manual_seed(0)
    for batch, kmax in [(13, 4), (1, 1), (8, 0), (0, 0), (40, 7)]:
        k = torch.randint(0, kmax + 1, (batch,), generator=gen)
        t0 = torch.rand(batch, generator=gen, dtype=dtype) * 0.5
        step = torch.rand(batch, generator=gen, dtype=dtype) * 0.05
        got = ops.rollout_plan(k, t0, step)
        want = plan_tensors(k, t0, step)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            assert torch.equal(g, w)


def test_rollout_plan_is_a_stable_descending_sort(ops):
    k = torch.tensor([1, 3, 0, 3, 1, 2, 0])
    order, counts, times, _ = ops.rollout_plan(k, torch.zeros(7), torch.full((7,), 0.25))
    assert order.tolist() == [1, 3, 5, 0, 4, 2, 6]
    assert counts.tolist() == [5, 3, 2]
    assert times[:, 0].tolist() == [0.0, 0.25, 0.5]
    with pytest.raises(RuntimeError, match="k must be >= 0"):
        ops.rollout_plan(torch.tensor([1, -1]), torch.zeros(2), torch.zeros(2))
    with pytest.raises(RuntimeError, match="k must be int64"):
        ops.rollout_plan(torch.tensor([1, 2], dtype=torch.int32), torch.zeros(2), torch.zeros(2))


def test_ops_trace_under_torch_compile(ops):
    def step(state, v, h, xin):
        torch.ops.reflexflow.euler_update_(state, v, h, xin)
        return state * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    state, v, h = _case(torch.float32, torch.bfloat16)
    xin = torch.empty(state.shape, dtype=torch.bfloat16)
    ref_state = state.clone()
    euler_update(ref_state, v, h)
    out = compiled(state, v, h, xin)
    assert torch.equal(out, ref_state * 2) and torch.equal(state, ref_state)
    assert torch.equal(xin, ref_state.bfloat16())


def test_fallback_warns_with_the_reason_and_uses_torch(monkeypatch):
    for key, val in {"tried": False, "loaded": False, "source": None, "reason": None}.items():
        monkeypatch.setitem(native._state, key, val)
    monkeypatch.delenv("REFLEXFLOW_NO_EXT", raising=False)
    monkeypatch.setattr(native, "_load_prebuilt", lambda: "no prebuilt reflexflow._C")
    monkeypatch.setattr(native, "_load_jit", lambda: "JIT build failed: OSError: no compiler")
    with pytest.warns(RuntimeWarning, match="no compiler.*pure-PyTorch"):
        assert native.load_extension() is False
    assert native.has_kernel("cpu") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tried once: no second warning
        assert native.load_extension() is False
    import reflexflow as rf
    from reflexflow.engine import RolloutEngine
    from reflexflow.reference import euler_rollout_per_sample
    from tests._rollout_models import TinyNet

    vm = rf.VelocityModel(TinyNet())
    x, k = torch.randn(4, 3, 6, 6), torch.tensor([2, 0, 1, 2])
    t0, h = torch.full((4,), 0.2), torch.full((4,), 0.1)
    torch.testing.assert_close(
        RolloutEngine("auto")(vm, x, t0, k, h), euler_rollout_per_sample(vm, x, t0, k, h)
    )
    with pytest.raises(RuntimeError, match="no compiler"):
        RolloutEngine("native")(vm, x, t0, k, h)


def test_jit_failure_is_reported_not_raised(monkeypatch):
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension 'reflexflow_jit_C'")

    monkeypatch.delenv("REFLEXFLOW_NO_JIT", raising=False)
    monkeypatch.setattr(cpp_extension, "load", fail)
    reason = native._load_jit()
    assert reason is not None and reason.startswith("JIT build failed: RuntimeError")
    monkeypatch.setenv("REFLEXFLOW_NO_JIT", "1")
    assert native._load_jit() == "REFLEXFLOW_NO_JIT=1"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    from torch.utils.cpp_extension import include_paths

    cmd = ["nvcc", "-c", str(native.CSRC / "rollout_cuda.cu"), "-o", str(tmp_path / "r.o")]
    cmd += ["-std=c++20", "-arch=sm_90", *native.NVCC_FLAGS, "-w"]
    cmd += [f"-I{p}" for p in include_paths()]
    cmd += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "r.o").stat().st_size > 0


def test_native_module_imports_without_side_effects():
    code = "import reflexflow, reflexflow.native as n; assert not n.extension_status()['tried']"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_rollout_plan_fake_kernel_has_a_dynamic_step_count(ops):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()):
        k = torch.empty(6, dtype=torch.int64)
        t0 = torch.empty(6)
        order, counts, times, steps = ops.rollout_plan(k, t0, t0)
    assert order.shape == (6,) and steps.shape == (6,) and times.shape[1] == 6
    assert isinstance(counts.shape[0], torch.SymInt) and times.shape[0] == counts.shape[0]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_next_input_cast_keeps_nan_inf_and_rounding_ties(ops, out_dtype):
    vals = [float("nan"), float("inf"), -float("inf"), 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38, -0.0]
    vals += [1e-40, 65520.0, 2**-24 * 1.5]
    state = torch.tensor(vals, dtype=torch.float32).view(-1, 1)
    out = torch.empty(state.shape, dtype=out_dtype)
    ops.euler_update_(state, torch.zeros_like(state), torch.zeros(state.shape[0]), out)
    assert torch.equal(out.float().isnan(), state.isnan())
    keep = ~state.isnan()
    assert torch.equal(out[keep], state.to(out_dtype)[keep])


def test_extension_without_cuda_kernels_warns_once_on_cuda(ops, monkeypatch):
    monkeypatch.setitem(native._state, "warned_cuda", False)
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
    with pytest.warns(RuntimeWarning, match="no CUDA kernels"):
        assert native.has_kernel("cuda") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.has_kernel("cuda") is False
        assert native.has_kernel("cpu") is False  # no warning for other devices
