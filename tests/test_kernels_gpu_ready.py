"""What breaks or stalls a GPU, checked without one: launch counts, host transfers, torch
ops between kernels, launch grids, fail-soft rules, and the torch.compile path.

On CPU the kernels run on Triton's interpreter; launches and grids are recorded where
Triton runs them (``InterpretedFunction.run`` / ``JITFunction.run``, see kernel_probes).
The CUDA-only test puts torch.cuda.set_sync_debug_mode("error") around a forward and
backward. No test here is timed.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

pytest.importorskip("triton")

from reflexflow import kernels  # noqa: E402
from reflexflow import reference as ref  # noqa: E402
from reflexflow.kernels import fused_objective, layout, triton_usable  # noqa: E402
from reflexflow.kernels import objective as fo  # noqa: E402
from reflexflow.objective import ObjectiveInputs  # noqa: E402
from reflexflow.paths import get_path  # noqa: E402

from .kernel_probes import (  # noqa: E402
    AtenRecorder,
    host_transfers,
    launches,
    launching_ops,
    make_spec,
)

pytestmark = pytest.mark.skipif(
    not triton_usable("cuda" if torch.cuda.is_available() else "cpu"),
    reason="Triton needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CUDA_GRID_YZ = 65535  # CUDA's limit of grid axes 1 and 2
CUDA_GRID_X = 2**31 - 1


def _args(shape, path="linear", mode="joint", dtype=torch.float32, requires_grad=True, **knobs):
    """(path, spec, inputs) of fused_objective for random data on DEV; knobs: make_spec's."""
    g = torch.Generator().manual_seed(0)
    b = shape[0]
    x1, eps, noise = (torch.randn(shape, generator=g) for _ in range(3))
    t0 = 0.5 * torch.rand(b, generator=g)
    t1 = t0 + 0.1
    x_hat = ref.interpolate(get_path(path), x1, eps, t1) + 0.1 * noise
    kw = dict(x1=x1, eps=eps, x_hat=x_hat, t0=t0, t1=t1, k=torch.ones(b, dtype=torch.int64))
    kw = {n: x.to(DEV) for n, x in kw.items()}
    if mode == "joint":
        v = torch.randn((2 * b, *shape[1:]), generator=g).to(DEV, dtype)
        kw.update(v0=None, v1=None, v_joint=v.requires_grad_(requires_grad))
    elif mode == "shared":
        v = torch.randn(shape, generator=g).to(DEV, dtype).requires_grad_(requires_grad)
        kw.update(v0=v, v1=v)
    else:
        kw.update(
            v0=torch.randn(shape, generator=g).to(DEV, dtype).requires_grad_(requires_grad),
            v1=torch.randn(shape, generator=g).to(DEV, dtype).requires_grad_(requires_grad),
        )
    return get_path(path), make_spec(**knobs), ObjectiveInputs(**kw)


COMMON = {
    "defar_default": dict(),
    "direction_gaussian_separate": dict(mode="separate"),
    "mse_box": dict(adr_loss="mse", fc_filter="box", fc_size=5),
    "per_channel_gvp": dict(fc_per_channel=True, path="gvp"),
    "signed_squared_none": dict(fc_signed=True, fc_form="squared", fc_filter="none"),
    "biased_fm_input_shared_v": dict(mode="shared"),
    "weights_and_stable_targets": dict(weights=True, targets=True),
    "fc_only": dict(lambda_adr=0.0),
    "bf16_model_fp32_state": dict(dtype=torch.bfloat16),
}


def _common(name, shape=(4, 4, 8, 8)):
    knobs = dict(COMMON[name])
    extra = {}
    if knobs.pop("weights", False):
        extra.update(
            fm_weight=torch.rand(shape[0], device=DEV), adr_weight=torch.ones(shape[0], device=DEV)
        )
    if knobs.pop("targets", False):
        extra.update(u0=torch.randn(shape, device=DEV), v_adr=torch.randn(shape, device=DEV))
    p, spec, inputs = _args(shape, **knobs)
    for name, x in extra.items():
        setattr(inputs, name, x)
    return p, spec, inputs


def _leaves(inputs):
    vs = (inputs.v_joint, inputs.v0, inputs.v1 if inputs.v1 is not inputs.v0 else None)
    return [x for x in vs if x is not None]


# ------------------------------------------------------------------ launches and syncs


@pytest.mark.parametrize("name", list(COMMON))
def test_common_configurations_take_three_launches_forward_and_backward(name):
    """One program per sample: sample_kernel + finalize_kernel, then scale_kernel."""
    p, spec, inputs = _common(name)
    with launches() as probe:
        out = fused_objective(p, spec, inputs)
        out.loss.backward()
    names = [n for n, _ in probe.launches]
    assert names == ["sample_kernel", "finalize_kernel", "scale_kernel"], names


@pytest.mark.parametrize("name", ["defar_default", "mse_box", "biased_fm_input_shared_v"])
def test_common_configurations_make_no_host_transfer_and_no_torch_op(name):
    """Forward + backward (loss.backward() and a GradScaler-like scaled backward):
    no .item()/.tolist()/.cpu()/bool(tensor)/torch.tensor(...) and no aten op that
    launches anything (only allocations and views) outside the Triton kernels."""
    p, spec, inputs = _common(name)
    grad = torch.full((), 3.0, device=DEV)
    with launches() as probe, host_transfers(probe), AtenRecorder(probe):
        out = fused_objective(p, spec, inputs)
        torch.autograd.backward(out.loss, grad)
    assert probe.transfers == []
    assert launching_ops(probe) == [], probe.aten
    assert len(probe.launches) == 3


def test_large_samples_take_five_launches(monkeypatch):
    """stats, plane, grad, finalize forward; scale backward (samples past the tile)."""
    monkeypatch.setattr(layout, "SMALL_TILE_MAX", 0)
    p, spec, inputs = _args((2, 4, 8, 8))
    with launches() as probe, host_transfers(probe):
        fused_objective(p, spec, inputs).loss.backward()
    names = [n for n, _ in probe.launches]
    assert names == [
        "stats_kernel",
        "plane_kernel",
        "grad_kernel",
        "finalize_kernel",
        "scale_kernel",
    ], names
    assert probe.transfers == []


def test_backward_of_a_plain_loss_moves_no_gradient_bytes():
    """dL/dloss = 1: scale_kernel skips every block; the gradient is the stored one."""
    p, spec, inputs = _args((3, 2, 6, 6))
    out = fused_objective(p, spec, inputs)
    stored = {}

    original = fo._scale

    def spy(src, *args, **kwargs):
        stored["before"] = src[0].clone()
        original(src, *args, **kwargs)
        stored["after"], stored["ptr"] = src[0].clone(), src[0].data_ptr()  # no reference kept

    fo._scale = spy
    try:
        out.loss.backward()
    finally:
        fo._scale = original
    assert torch.equal(stored["before"], stored["after"])
    assert inputs.v_joint.grad.data_ptr() == stored["ptr"]  # the leaf took it: no copy either


def test_taps_need_no_host_to_device_copy():
    """Gaussian taps are computed in the kernel from constexpr sigma: no tensor of taps."""
    p, spec, inputs = _args((2, 2, 9, 9), fc_sigma=1.7)
    with launches() as probe, host_transfers(probe), AtenRecorder(probe):
        fused_objective(p, spec, inputs)
    assert probe.transfers == [] and launching_ops(probe) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sync debug mode needs CUDA")
@pytest.mark.parametrize("name", ["defar_default", "mse_box", "signed_squared_none"])
def test_no_host_sync_under_cuda_sync_debug_mode(name):
    p, spec, inputs = _common(name)
    fused_objective(p, spec, inputs).loss.backward()  # compile the kernels first
    for x in _leaves(inputs):
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fused_objective(p, spec, inputs)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


# ------------------------------------------------------------------------- grid limits


def _grids(p, spec, inputs):
    with launches(execute=False) as probe:
        out = fused_objective(p, spec, inputs)
        out.loss.backward()
    return probe.launches


def _assert_grids_fit_cuda(grids):
    assert grids
    for name, grid in grids:
        assert len(grid) <= 3 and grid[0] <= CUDA_GRID_X, (name, grid)
        assert all(g <= CUDA_GRID_YZ for g in grid[1:]), (name, grid)


@pytest.mark.parametrize("large", [False, True])
def test_launch_grids_fit_cuda_for_70000_vectors(monkeypatch, large):
    """B = 70000 > 65535 samples: the batch never goes on grid axis 1 or 2."""
    if large:
        monkeypatch.setattr(layout, "SMALL_TILE_MAX", 0)
    p, spec, inputs = _args((70000, 8), mode="separate")
    _assert_grids_fit_cuda(_grids(p, spec, inputs))


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("knobs", [dict(fc_per_channel=True), dict(fc_signed=True)])
def test_launch_grids_fit_cuda_for_video_with_many_planes(monkeypatch, large, knobs):
    """B C T = 1100 * 4 * 16 = 70400 > 65535 filter planes."""
    if large:
        monkeypatch.setattr(layout, "SMALL_TILE_MAX", 0)
    p, spec, inputs = _args((1100, 4, 16, 2, 2), **knobs)
    grids = _grids(p, spec, inputs)
    _assert_grids_fit_cuda(grids)
    if large:
        planes = dict(grids)["plane_kernel"][0]
        assert planes >= 1100 * 4 * 16  # all planes on axis 0


# --------------------------------------------------------------------- failure policy


def _inject(monkeypatch, target, name, err):
    """Make target.name raise err when called."""

    def broken(*args, **kwargs):
        raise err

    monkeypatch.setattr(target, name, broken)


def _break_kernel(monkeypatch, kernel, err):
    """Make every launch of a Triton kernel raise err (as a failed compile would)."""
    _inject(monkeypatch, kernel, "run", err)


@pytest.mark.parametrize(
    "err",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
    ],
    ids=["OutOfMemoryError", "runtime_oom"],
)
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_out_of_memory_propagates_and_never_switches_to_the_reference(monkeypatch, err, where):
    monkeypatch.setattr(fo, "_FAILED", [])
    p, spec, inputs = _args((2, 2, 5, 5))
    if where == "forward":
        _break_kernel(monkeypatch, fo.sample_kernel, err)
        with pytest.raises(type(err)):
            fused_objective(p, spec, inputs, fail_soft=True)
    else:
        out = fused_objective(p, spec, inputs, fail_soft=True)
        _break_kernel(monkeypatch, fo.scale_kernel, err)
        with pytest.raises(type(err)):
            out.loss.backward()
    assert fo._FAILED == []


def test_a_failing_forward_kernel_switches_auto_to_the_reference_once(monkeypatch):
    monkeypatch.setattr(fo, "_FAILED", [])
    _break_kernel(monkeypatch, fo.sample_kernel, RuntimeError("no kernel image for this device"))
    p, spec, inputs = _args((3, 2, 5, 4))
    with pytest.warns(RuntimeWarning, match="Triton loss kernels failed"):
        got = fused_objective(p, spec, inputs, fail_soft=True)
    want = ref.objective(p, spec, inputs)
    torch.testing.assert_close(got.loss, want.loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with launches() as probe:
            fused_objective(p, spec, inputs, fail_soft=True)  # no second warning, no kernel tried
    assert probe.launches == [] and len(fo._FAILED) == 1


@pytest.mark.parametrize("mode", ["joint", "separate", "shared"])
def test_a_failing_backward_kernel_falls_back_to_reference_gradients(monkeypatch, mode):
    """Mid-backward: the forward ran the kernels; the backward kernel fails to launch.
    backend="auto": one warning, the reference's gradients from the saved inputs, and
    the reference for every later call."""
    monkeypatch.setattr(fo, "_FAILED", [])
    p, spec, inputs = _args((3, 2, 5, 4), mode=mode)
    got = fused_objective(p, spec, inputs, fail_soft=True)
    _break_kernel(monkeypatch, fo.scale_kernel, RuntimeError("ptxas fatal: scale_kernel"))
    with pytest.warns(RuntimeWarning, match="Triton loss kernels failed"):
        (2.0 * got.loss + got.adr_loss).backward()
    got_grads = [x.grad.clone() for x in _leaves(inputs)]
    for x in _leaves(inputs):
        x.grad = None
    want = ref.objective(p, spec, inputs)
    (2.0 * want.loss + want.adr_loss).backward()
    for a, b in zip(got_grads, [x.grad for x in _leaves(inputs)], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert len(fo._FAILED) == 1
    with launches() as probe:
        fused_objective(p, spec, inputs, fail_soft=True)
    assert probe.launches == []


def test_backend_triton_shows_a_failing_backward_kernel(monkeypatch):
    monkeypatch.setattr(fo, "_FAILED", [])
    p, spec, inputs = _args((3, 2, 5, 4))
    out = fused_objective(p, spec, inputs)
    _break_kernel(monkeypatch, fo.scale_kernel, RuntimeError("ptxas fatal: scale_kernel"))
    with pytest.raises(RuntimeError, match="ptxas"):
        out.loss.backward()
    assert fo._FAILED == []


def test_argument_errors_are_not_hidden_by_auto(monkeypatch):
    monkeypatch.setattr(fo, "_FAILED", [])
    p, spec, inputs = _args((3, 2, 5, 4))
    inputs.fm_weight = torch.ones(5, device=DEV)
    with pytest.raises(ValueError, match="fm_weight"):
        fused_objective(p, spec, inputs, fail_soft=True)
    assert fo._FAILED == []


def test_double_backward_takes_the_reference_gradients():
    """create_graph=True: the gradients come from the reference and are differentiable."""
    p, spec, inputs = _args((2, 2, 4, 4), mode="separate")
    v0, v1 = inputs.v0, inputs.v1
    got = torch.autograd.grad(fused_objective(p, spec, inputs).loss, [v0, v1], create_graph=True)
    want = torch.autograd.grad(ref.objective(p, spec, inputs).loss, [v0, v1], create_graph=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    gg_got = torch.autograd.grad(sum(g.square().sum() for g in got), [v0, v1])
    gg_want = torch.autograd.grad(sum(g.square().sum() for g in want), [v0, v1])
    for a, b in zip(gg_got, gg_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------ routing


def test_supports_routes_what_the_kernels_compute():
    p, spec, inputs = _args((3, 2, 5, 4))

    def with_(**changes):
        return dataclasses.replace(inputs, **changes)

    x1 = inputs.x1
    assert kernels.supports(p, spec, inputs)
    fft = spec.replace(fc_filter="fft", fc_signed=True, fc_form="squared")
    assert kernels.supports(p, fft, inputs)
    assert kernels.supports(p, spec, with_(u0=x1, v_adr=x1, fm_weight=inputs.t0))
    doubles = {
        f.name: getattr(inputs, f.name).double()
        for f in dataclasses.fields(inputs)
        if isinstance(getattr(inputs, f.name), torch.Tensor)
        and getattr(inputs, f.name).is_floating_point()
    }
    assert not kernels.supports(p, spec, with_(**doubles))
    assert not kernels.supports(p, spec, with_(x1=x1.clone().requires_grad_()))
    assert not kernels.supports(p, spec, with_(u0=x1.clone().requires_grad_()))
    with torch.no_grad():
        assert kernels.supports(p, spec, with_(u0=x1.clone().requires_grad_()))
    assert not kernels.supports(p, spec, with_(x1=x1[:0]))


def test_supports_is_false_where_triton_cannot_run(monkeypatch):
    p, spec, inputs = _args((3, 2, 5, 4))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.supports(p, spec, inputs) == (DEV == "cuda")


def test_every_call_supports_accepts_matches_the_reference():
    """The routing predicate never sends a call the kernels would get wrong."""
    cases = [
        dict(),
        dict(fc_filter="fft", fc_signed=True),
        dict(mode="shared", adr_loss="mse", fc_form="squared"),
        dict(fc_per_channel=True, fc_filter="none", lambda_adr=0.0),
    ]
    for knobs in cases:
        p, spec, inputs = _args((3, 2, 5, 4), **knobs)
        assert kernels.supports(p, spec, inputs)
        got, want = fused_objective(p, spec, inputs), ref.objective(p, spec, inputs)
        for key in ("loss", "fc_loss", "adr_loss", "per_sample"):
            torch.testing.assert_close(getattr(got, key), getattr(want, key), rtol=2e-5, atol=1e-6)


# -------------------------------------------------------------------- torch.compile


def _capture_backend(graphs):
    """aot_eager that keeps the forward and backward graphs' code (CPU: Inductor cannot
    launch Triton kernels; CUDA: inductor is tested below)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def keep(gm, _):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def test_compiled_step_with_dynamic_batch_runs_the_triton_kernels_and_matches_eager():
    """torch.compile(dynamic=True) on two batch sizes: one graph for both (no recompile),
    the forward and backward graphs call the Triton kernels through the functional
    higher-order op (the registration CUDA uses), results equal eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1).to(DEV)
    p, spec = get_path("linear"), make_spec()

    def step(x1, eps, x_hat, t0, t1, k):
        v = net(torch.cat([ref.interpolate(p, x1, eps, t0), x_hat]))
        inputs = ObjectiveInputs(v_joint=v, x1=x1, eps=eps, x_hat=x_hat, t0=t0, t1=t1, k=k)
        out = fused_objective(p, spec, inputs)
        return out.loss + 0.1 * out.per_sample.sum()

    graphs: list[str] = []
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=_capture_backend(graphs))
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for b in (4, 7):  # no batch equal to another size: duck sizing would tie them
        _, _, inputs = _args((b, 3, 6, 5), mode="separate", requires_grad=False)
        data = [getattr(inputs, n) for n in ("x1", "eps", "x_hat", "t0", "t1", "k")]
        net.zero_grad()
        loss_c = compiled(*data)
        loss_c.backward()
        grad_c = net.weight.grad.clone()
        net.zero_grad()
        loss_e = step(*data)
        loss_e.backward()
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_c, net.weight.grad, rtol=1e-4, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before == 1
    code = "\n".join(graphs)
    assert "triton_kernel_wrapper_functional" in code
    assert code.count("triton_kernel_wrapper_functional") >= 3  # sample, finalize, scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's Triton path needs CUDA")
def test_inductor_compiles_the_objective_with_dynamic_batch():
    torch._dynamo.reset()

    def f(p, spec, inputs):
        return fused_objective(p, spec, inputs).loss

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for b in (5, 7):
        p, spec, inputs = _args((b, 4, 8, 8))
        got = compiled(p, spec, inputs)
        got.backward()
        g = inputs.v_joint.grad.clone()
        inputs.v_joint.grad = None
        want = f(p, spec, inputs)
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, inputs.v_joint.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ sm_90 compilation


def _ptxas_available() -> bool:
    import pathlib

    import triton

    return (pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="this triton wheel carries no ptxas")
def test_the_common_path_compiles_for_an_h100(tmp_path):
    """The interpreter accepts what the GPU compiler rejects (it ran the GVP path with a
    plain global float): compile the kernels of the SiT configuration (bf16 model output,
    fp32 state) on the three path kinds (linear, GVP, coefficient table) for sm_90 down
    to a cubin, as Triton's CUDA backend does."""
    import json
    import pathlib
    import subprocess
    import sys

    out = tmp_path / "sm90.json"
    cases = ["sit_4x32x32_bf16_joint", "sit_gvp_fc_active_bool", "sit_vp_table_fc_delta"]
    cmd = [sys.executable, "-m", "tools.compile_check", "--arch", "90"]
    cmd += [f"--case={c}" for c in cases] + ["--json", str(out)]
    root = pathlib.Path(__file__).resolve().parent.parent  # tools/ is in the checkout
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["case"] for r in rows} == set(cases)
    assert {r["kernel"] for r in rows} == {"sample_kernel", "finalize_kernel", "scale_kernel"}
    assert all("error" not in r and r["reg"] > 0 for r in rows)
