"""The fused Triton objective against reflexflow.reference.objective.

On CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1).
Reference: float64 on the same (already rounded) inputs. Tolerances, as max |error| over
max |reference|: w (fp32) 1e-5; losses (returned in the inputs' promoted dtype, computed
in fp32) fp32 1e-5, fp16 1e-3, bf16 4e-3; gradients (stored in v's dtype) fp32 1e-5,
fp16 4e-3, bf16 3e-2. Kernel buffers start as NaN (kernels.objective_op.POISON) so any
element a kernel fails to write shows up.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from reflexflow import reference as ref  # noqa: E402
from reflexflow.kernels import objective_op as fo  # noqa: E402
from reflexflow.kernels import triton_usable  # noqa: E402
from reflexflow.paths import get_path  # noqa: E402

pytestmark = pytest.mark.skipif(
    not triton_usable("cuda" if torch.cuda.is_available() else "cpu"),
    reason="Triton needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}  # output dtype


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    from reflexflow.kernels import objective_op as mod

    monkeypatch.setattr(mod, "POISON", True)


def _err(got, want) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), "kernel output has NaN (unwritten element?)"
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _data(shape, dtype, seed, path, inactive=(0,), noncontig=False, state=None):
    """Fresh random v0, v1, x1, eps, x^ (rounded to dtype), t0, t1, k."""
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    x1, eps, v0, v1, noise = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in "abcde")
    t0 = 0.6 * torch.rand(b, generator=g, dtype=torch.float64)
    t1 = t0 + 0.05 + 0.3 * torch.rand(b, generator=g, dtype=torch.float64)
    x_hat = ref.interpolate(path, x1, eps, t1) + 0.5 * noise * (1 + torch.rand(shape, generator=g))
    k = torch.ones(b, dtype=torch.int64)
    k[list(inactive)] = 0
    state = state or dtype
    tensors = [v0.to(dtype), v1.to(dtype)] + [z.to(state) for z in (x1, eps, x_hat)]
    if noncontig:  # same values, transposed storage
        tensors = [z.transpose(0, -1).contiguous().transpose(0, -1) for z in tensors]
        assert not tensors[0].is_contiguous()
    return tensors, t0.float(), t1.float(), k


def _compare(
    shape,
    dtype=torch.float32,
    seed=0,
    path="linear",
    grad_scale=(1.0, 0.0, 0.0),
    inactive=(0,),
    noncontig=False,
    zero_v1_rows=(),
    small_v1_rows=(),
    fc_delta=False,
    state=None,
    grad_tol=None,
    **kw,
):
    p = get_path(path)
    (v0, v1, x1, eps, x_hat), t0, t1, k = _data(shape, dtype, seed, p, inactive, noncontig, state)
    if zero_v1_rows:
        v1 = v1.clone()
        v1[list(zero_v1_rows)] = 0
    if small_v1_rows:  # |v1| below norm_floor |v_adr| but far above norm_eps
        v1 = v1.clone()
        v1[list(small_v1_rows)] *= 1e-4
    delta_fc = 0.1 * torch.randn(shape, dtype=torch.float64).to(dtype) if fc_delta else None
    has_v1 = kw.pop("has_v1", True)
    active = kw.pop("fc_active", None)
    lead = [z.double().detach().clone().requires_grad_() for z in (v0, v1)]
    want = ref.objective(
        p,
        v0=lead[0],
        v1=lead[1] if has_v1 else None,
        x1=x1.double(),
        eps=eps.double(),
        x_hat=x_hat.double(),
        t0=t0.double(),
        t1=t1.double(),
        k=k,
        fc_active=active,
        fc_delta=None if delta_fc is None else delta_fc.double(),
        **kw,
    )
    dev = [z.to(DEV).detach().requires_grad_() for z in (v0, v1)]
    got = fo.fused_objective(
        p,
        v0=dev[0],
        v1=dev[1] if has_v1 else None,
        x1=x1.to(DEV),
        eps=eps.to(DEV),
        x_hat=x_hat.to(DEV),
        t0=t0.to(DEV),
        t1=t1.to(DEV),
        k=k.to(DEV),
        fc_active=None if active is None else active.to(DEV),
        fc_delta=None if delta_fc is None else delta_fc.to(DEV),
        **kw,
    )
    for key in ("loss", "fc_loss", "adr_loss"):
        if want[key] is None:
            assert got[key] is None
        else:
            assert _err(got[key], want[key]) < LOSS_TOL[got[key].dtype], key
    if want["w"] is None:
        assert got["w"] is None
    else:
        assert got["w"].shape == want["w"].shape
        assert _err(got["w"], want["w"]) < 1e-5
    for out, g in zip(("loss", "fc_loss", "adr_loss"), grad_scale, strict=True):
        if g and want[out] is not None:
            (g * want[out]).backward(retain_graph=True)
            (g * got[out]).backward(retain_graph=True)
    tol = grad_tol or GRAD_TOL[dtype]
    assert dev[0].grad.dtype == dtype
    assert _err(dev[0].grad, lead[0].grad) < tol
    if has_v1 and lead[1].grad is None:  # only fc_loss was differentiated
        assert not dev[1].grad.any()
    elif has_v1:
        assert dev[1].grad.dtype == dtype
        assert _err(dev[1].grad, lead[1].grad) < tol
    else:
        assert dev[1].grad is None


SHAPES = [(3, 1, 7, 9), (3, 3, 12, 10), (2, 4, 5, 11), (2, 16, 6, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("adr_loss", ["direction", "mse"])
@pytest.mark.parametrize("fc_filter", ["gaussian", "box", "fft"])
def test_images_match_reference_for_every_dtype_filter_and_adr_loss(dtype, adr_loss, fc_filter):
    i = ["gaussian", "box", "fft"].index(fc_filter) + 3 * (adr_loss == "mse")
    _compare(
        SHAPES[i % 4],
        dtype,
        seed=i,
        adr_loss=adr_loss,
        fc_filter=fc_filter,
        fc_sigma=1.3,
        fc_size=3,
        per_channel=i % 2 == 1,
    )


@pytest.mark.parametrize(
    "shape", [(3, 10), (3, 2, 13), (2, 3, 2, 5, 7), (2, 2, 2, 2, 3, 5)], ids=str
)
@pytest.mark.parametrize("adr_loss", ["direction", "mse"])
def test_vectors_signals_and_video_match_reference(shape, adr_loss):
    _compare(shape, adr_loss=adr_loss, per_channel=adr_loss == "mse", path="gvp")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("adr_loss", ["direction", "mse"])
def test_half_model_outputs_with_fp32_state_round_only_once(dtype, adr_loss):
    """As ReflexFlowLoss calls it: v0, v1 in half precision, x1, eps, x^ in fp32. The
    kernels keep d0 and r1 in fp32, so the gradients carry one rounding to v's dtype."""
    tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    _compare((3, 4, 6, 5), dtype, state=torch.float32, adr_loss=adr_loss, grad_tol=tol)


@pytest.mark.parametrize("shape", [(2, 3, 17, 19), (1, 2, 33, 35)], ids=str)
def test_samples_spanning_many_programs_match_reference(shape):
    """F P > 128 splits a sample over programs in both passes; H W > 1024 splits the
    filter's planes: partial sums and block edges must add up."""
    _compare(shape, inactive=(), adr_loss="direction", fc_sigma=2.5)
    _compare(shape, inactive=(), adr_loss="mse", per_channel=True, fc_filter="box", fc_size=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs_match_reference(dtype):
    _compare((3, 3, 6, 5), dtype, noncontig=True, adr_loss="direction")


@pytest.mark.parametrize(
    "case",
    [
        dict(inactive=(0, 1, 2)),  # every row k = 0: w = 1
        dict(inactive=(), path="vp", fc_filter="box", fc_size=1),
        dict(lambda_fc=0.0, adr_loss="mse"),
        dict(lambda_adr=0.0),
        dict(has_v1=False, per_channel=True),
        dict(fc_delta=True, fc_sigma=0.0),
        dict(fc_active=torch.tensor([True, False, True]), lambda_fc=2.5, lambda_adr=3.0),
        dict(zero_v1_rows=(1,)),  # |v1| < norm_eps: the clamp's gradient
        dict(small_v1_rows=(0, 2)),  # |v1| < norm_floor |v_adr|: the relative floor
        dict(small_v1_rows=(0,), norm_floor=0.0),  # floor off: only norm_eps bounds |v1|
    ],
    ids=[
        "all_k0",
        "vp_box1",
        "no_fc",
        "no_adr",
        "no_v1",
        "fc_delta",
        "fc_active",
        "zero_v1",
        "small_v1",
        "small_v1_no_floor",
    ],
)
def test_special_rows_and_options_match_reference(case):
    _compare((3, 2, 9, 7), **case)


def test_gradients_of_every_output_scale_like_reference():
    _compare((2, 3, 5, 6), grad_scale=(2.5, -1.0, 0.5), adr_loss="direction")
    _compare((2, 3, 5, 6), grad_scale=(0.0, 3.0, 0.0), adr_loss="mse")


def test_x1_requiring_grad_is_refused():
    p = get_path("linear")
    x = torch.randn(2, 3)
    t = torch.full((2,), 0.3)
    with pytest.raises(ValueError, match="x1"):
        fo.fused_objective(
            p,
            v0=x,
            v1=x,
            x1=x.clone().requires_grad_(),
            eps=x,
            x_hat=x,
            t0=t,
            t1=t,
            k=torch.ones(2, dtype=torch.int64),
        )


def _op_args(v1=True, **over):
    p = get_path("linear")
    (v0, v1_, x1, eps, x_hat), t0, t1, k = _data((2, 3, 5, 4), torch.float32, 7, p)
    args = dict(
        v0=v0.requires_grad_(),
        v1=v1_.requires_grad_() if v1 else None,
        x1=x1,
        eps=eps,
        x_hat=x_hat,
        coef=fo.path_coefficients(p, t0, t1),
        path_kind=0,
        active=(k > 0).float(),
        fc_delta=None,
        lambda_adr=10.0,
        lambda_fc=1.0,
        direction=True,
        per_channel=False,
        fc_filter="gaussian",
        fc_sigma=1.0,
        fc_size=5,
        fc_cutoff=0.25,
        norm_eps=1e-6,
        norm_floor=0.1,
    )
    args.update(over)
    if args["path_kind"] == 1:  # linear, computed in the kernel from (t0, t1)
        args["coef"] = torch.stack([t0, t1], dim=1)
    return tuple(z.to(DEV) if isinstance(z, torch.Tensor) else z for z in args.values())


@pytest.mark.parametrize(
    "over",
    [{}, dict(v1=False, per_channel=True), dict(direction=False, fc_filter="fft", path_kind=1)],
)
def test_opcheck_passes(over):
    torch.library.opcheck(fo.fused_objective_op, _op_args(**over))


def test_compiled_training_step_has_no_graph_break_and_matches_eager():
    """fullgraph=True fails on any graph break. On CPU the backend is aot_eager (Inductor's
    CPU codegen cannot launch Triton kernels; the op is an opaque custom_op under the
    interpreter); on CUDA Inductor traces the triton_op."""
    p = get_path("linear")
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1).to(DEV)
    (_, _, x1, eps, x_hat), t0, t1, k = _data((2, 3, 6, 5), torch.float32, 3, p)
    x1, eps, x_hat, t0, t1, k = (z.to(DEV) for z in (x1, eps, x_hat, t0, t1, k))

    def step(x1, eps, x_hat, t0, t1, k):
        v = net(torch.cat([ref.interpolate(p, x1, eps, t0), x_hat]))
        out = fo.fused_objective(
            p, v0=v[:2], v1=v[2:], x1=x1, eps=eps, x_hat=x_hat, t0=t0, t1=t1, k=k
        )
        return out["loss"]

    backend = "inductor" if DEV == "cuda" else "aot_eager"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss_c = compiled(x1, eps, x_hat, t0, t1, k)
    loss_c.backward()
    grad_c = net.weight.grad.clone()
    net.zero_grad()
    loss_e = step(x1, eps, x_hat, t0, t1, k)
    loss_e.backward()
    assert torch.allclose(loss_c, loss_e, rtol=1e-5)
    assert torch.allclose(grad_c, net.weight.grad, rtol=1e-4, atol=1e-6)


def test_importing_reflexflow_does_not_import_triton():
    code = "import sys, reflexflow; assert 'triton' not in sys.modules"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and ~45 GB of GPU memory")
def test_offsets_past_2_31_elements_are_64_bit():
    """N > 2^31: the last sample's gradient must equal 2/N (v0 - u0) there (mse, no FC)."""
    shape = (2, 4, 16384, 16400)  # 2.15e9 elements
    p = get_path("linear")
    v0 = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    x1 = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    eps = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    t = torch.full((2,), 0.25, device="cuda")
    v0.requires_grad_()
    out = fo.fused_objective(
        p, v0=v0, v1=None, x1=x1, eps=eps, x_hat=x1, t0=t, t1=t, k=t.long(), lambda_fc=0.0
    )
    out["loss"].backward()
    n = v0.numel()
    tail = (v0[1, -1, -8:].float() - (x1[1, -1, -8:].float() - eps[1, -1, -8:].float())) * 2 / n
    assert torch.allclose(v0.grad[1, -1, -8:].float(), tail, rtol=1e-2)
    want = (v0[1].float() - x1[1].float() + eps[1].float()).square().sum() / n
    head = (v0[0].float() - x1[0].float() + eps[0].float()).square().sum() / n
    assert torch.allclose(out["loss"], want + head, rtol=1e-3)
