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
from reflexflow.rollout import euler_update, euler_update_masked, rollout_plan

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
        want = rollout_plan(k, t0, step)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            assert torch.equal(g, w)


@pytest.mark.parametrize("kmax", [0, 2, 4, 6])
def test_rollout_plan_with_a_given_step_count_matches_torch_twin(ops, kmax):
    """kmax given (the engine's path: no host read of k on CUDA): K = kmax rows of times
    and counts, counts past max k are 0, samples with k_i > K are truncated to K rows."""
    gen = torch.Generator().manual_seed(kmax)
    for batch in (0, 1, 13):
        k = torch.randint(0, 5, (batch,), generator=gen)
        t0 = torch.rand(batch, generator=gen)
        step = torch.rand(batch, generator=gen) * 0.05
        got = ops.rollout_plan(k, t0, step, kmax)
        want = rollout_plan(k, t0, step, kmax)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)
        assert got[1].shape == (kmax,) and got[2].shape == (kmax, batch)
    with pytest.raises(RuntimeError, match="kmax must be >= 0"):
        ops.rollout_plan(torch.tensor([1]), torch.zeros(1), torch.zeros(1), -1)


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
    from tests.helpers import TinyNet

    vm = rf.VelocityModel(TinyNet())
    x, k = torch.randn(4, 3, 6, 6), torch.tensor([2, 0, 1, 2])
    t0, h = torch.full((4,), 0.2), torch.full((4,), 0.1)
    torch.testing.assert_close(
        RolloutEngine("auto")(vm, x, t0, k, h), euler_rollout_per_sample(vm, x, t0, k, h)
    )
    with pytest.raises(ValueError, match="rollout_backend='native'.*no compiler"):
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


def test_rollout_plan_fake_kernel_with_a_given_step_count_is_static(ops):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()):
        k = torch.empty(6, dtype=torch.int64)
        t0 = torch.empty(6)
        order, counts, times, steps = ops.rollout_plan(k, t0, t0, 3)
    assert counts.shape == (3,) and times.shape == (3, 6)


def _masked_case(state_dtype, v_dtype, out_dtype, seed=0, shape=(3, 4, 4)):
    gen = torch.Generator().manual_seed(seed)
    n = 7
    state = torch.randn(n, *shape, generator=gen, dtype=torch.float64).to(state_dtype)
    v = torch.randn(n, *shape, generator=gen, dtype=torch.float64).to(v_dtype)
    h = torch.rand(n, generator=gen, dtype=torch.float64).to(state_dtype) * 0.1
    tau = torch.rand(n, generator=gen, dtype=torch.float64).to(state_dtype)
    k = torch.tensor([0, 1, 2, 3, 2, 0, 1])
    out = None if out_dtype is None else torch.randn(state.shape, generator=gen).to(out_dtype)
    return state, tau, v, h, k, out


def _clone(x):
    return None if x is None else x.clone()


@pytest.mark.parametrize("state_dtype", STATES)
@pytest.mark.parametrize("v_dtype", FLOATS)
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16, torch.float32])
def test_masked_euler_matches_torch_twin_and_leaves_inactive_rows(
    ops, state_dtype, v_dtype, out_dtype
):
    state, tau, v, h, k, out = _masked_case(state_dtype, v_dtype, out_dtype)
    for j in range(4):
        live = k > j
        before = (state.clone(), tau.clone(), _clone(out))
        ref = (state.clone(), tau.clone(), _clone(out))
        euler_update_masked(ref[0], ref[1], v, h, k, j, ref[2])
        ops.euler_update_masked_(state, tau, v, h, k, j, out)
        assert torch.equal(state, ref[0]) and torch.equal(tau, ref[1])  # bit for bit
        assert torch.equal(state[~live], before[0][~live])
        assert torch.equal(tau[~live], before[1][~live])
        want_rows = before[0][live] + h[live].view(-1, 1, 1, 1) * v[live].to(state_dtype)
        assert torch.equal(state[live], want_rows)
        assert torch.equal(tau[live], before[1][live] + h[live])
        if out is not None:
            assert torch.equal(out, ref[2])
            assert torch.equal(out[~live], before[2][~live])
            assert torch.equal(out[live], state[live].to(out_dtype))


def test_masked_euler_with_every_row_live_equals_the_plain_update(ops):
    state, tau, v, h, _, out = _masked_case(torch.float32, torch.bfloat16, torch.bfloat16, seed=1)
    plain_state, plain_out = state.clone(), out.clone()
    ops.euler_update_(plain_state, v, h, plain_out)
    ops.euler_update_masked_(state, tau, v, h, torch.full((7,), 5), 4, out)
    assert torch.equal(state, plain_state) and torch.equal(out, plain_out)


def test_masked_euler_inactive_rows_never_see_nan_v_or_lose_negative_zero(ops):
    """A select, not a multiply by 0: NaN/inf velocities of finished rows cannot leak,
    and -0.0 in a finished row stays -0.0 (x + 0 * v would turn it into +0.0)."""
    for update in (ops.euler_update_masked_, euler_update_masked):
        state = torch.tensor([[-0.0, 1.0], [2.0, -0.0]])
        v = torch.tensor([[float("nan"), float("inf")], [1.0, 1.0]])
        tau = torch.zeros(2)
        k = torch.tensor([0, 1])
        update(state, tau, v, torch.full((2,), 0.5), k, 0)
        assert torch.equal(state[0], torch.tensor([-0.0, 1.0]))
        assert torch.signbit(state[0, 0]) and state[1].tolist() == [2.5, 0.5]
        assert tau.tolist() == [0.0, 0.5]


def test_masked_euler_scalar_h_non_contiguous_v_and_empty_rows(ops):
    state, tau, _, _, k, _ = _masked_case(torch.float32, torch.float32, None, seed=2)
    v = torch.randn(4, 4, 3, 7, dtype=torch.bfloat16).permute(3, 2, 0, 1)  # (7, 3, 4, 4)
    assert not v.is_contiguous()
    h = torch.tensor(0.125)
    ref_state, ref_tau = state.clone(), tau.clone()
    euler_update_masked(ref_state, ref_tau, v, h, k, 1)
    ops.euler_update_masked_(state, tau, v, h, k, 1)
    assert torch.equal(state, ref_state) and torch.equal(tau, ref_tau)
    empty_rows, tau2 = torch.empty(7, 0), torch.zeros(7)  # no elements: tau still moves
    ops.euler_update_masked_(empty_rows, tau2, torch.empty(7, 0), h, k, 0)
    assert torch.equal(tau2, torch.where(k > 0, 0.125, 0.0))
    nothing = torch.empty(0, 3)
    ops.euler_update_masked_(
        nothing, torch.empty(0), nothing, h, torch.empty(0, dtype=torch.long), 0
    )


def test_masked_euler_rejects_bad_arguments(ops):
    state, tau, v, h, k, _ = _masked_case(torch.float32, torch.float32, None)
    with pytest.raises(RuntimeError, match="tau must have the state's dtype"):
        ops.euler_update_masked_(state, tau.double(), v, h, k, 0)
    with pytest.raises(RuntimeError, match="tau must have shape"):
        ops.euler_update_masked_(state, tau[:3], v, h, k, 0)
    with pytest.raises(RuntimeError, match="tau must be contiguous"):
        ops.euler_update_masked_(state, torch.zeros(7, 2)[:, 0], v, h, k, 0)
    with pytest.raises(RuntimeError, match="k must be int64"):
        ops.euler_update_masked_(state, tau, v, h, k.int(), 0)
    with pytest.raises(RuntimeError, match="k must have shape"):
        ops.euler_update_masked_(state, tau, v, h, k[:2], 0)
    with pytest.raises(RuntimeError, match="j must be >= 0"):
        ops.euler_update_masked_(state, tau, v, h, k, -1)
    with pytest.raises(RuntimeError, match="v has shape"):
        ops.euler_update_masked_(state, tau, v[:2], h, k, 0)


def test_ops_pass_opcheck(ops):
    """Schemas, fake kernels and the dispatcher registrations agree (torch.library.opcheck)."""
    state, tau, v, h, k, out = _masked_case(torch.float32, torch.bfloat16, torch.bfloat16)
    torch.library.opcheck(ops.euler_update_masked_, (state, tau, v, h, k, 1, out))
    torch.library.opcheck(ops.euler_update_, (state, v, h, out))
    gen = torch.Generator().manual_seed(0)
    kk = torch.randint(0, 4, (9,), generator=gen)
    torch.library.opcheck(ops.rollout_plan, (kk, torch.rand(9), torch.rand(9), 4))


def test_masked_op_traces_under_torch_compile(ops):
    def steps(state, tau, v, h, k):
        for j in range(3):
            torch.ops.reflexflow.euler_update_masked_(state, tau, v, h, k, j)
        return state * 2

    compiled = torch.compile(steps, backend="aot_eager", fullgraph=True)
    state, tau, v, h, k, _ = _masked_case(torch.float32, torch.float32, None, seed=3)
    ref_state, ref_tau = state.clone(), tau.clone()
    for j in range(3):
        euler_update_masked(ref_state, ref_tau, v, h, k, j)
    out = compiled(state, tau, v, h, k)
    assert torch.equal(out, ref_state * 2) and torch.equal(tau, ref_tau)


def test_stale_extension_without_the_new_ops_falls_back_with_the_reason(monkeypatch):
    """A library built from older sources (no euler_update_masked_) is not used: the
    engine would call ops it does not have."""
    for key, val in {"tried": False, "loaded": False, "source": None, "reason": None}.items():
        monkeypatch.setitem(native._state, key, val)
    monkeypatch.delenv("REFLEXFLOW_NO_EXT", raising=False)
    monkeypatch.setattr(native, "_load_prebuilt", lambda: None)
    monkeypatch.setattr(native, "OPS", (*native.OPS, "an_op_from_the_future_"))
    with pytest.warns(RuntimeWarning, match="out of date.*an_op_from_the_future_.*rebuild"):
        assert native.load_extension() is False
    assert native.has_kernel("cpu") is False


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
