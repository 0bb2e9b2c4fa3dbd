"""The fused Triton objective against reflexflow.reference.objective.

On CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1);
on CUDA every test here runs (none skips for want of a GPU). Reference: float64 on the
same (already rounded) inputs. Tolerances, as max |error| over max |reference|: w 1e-5;
losses and per_sample (in the inputs' promoted dtype, computed in fp32) fp32 1e-5, fp16
1e-3, bf16 4e-3; gradients (in v's dtype) fp32 1e-5, fp16 4e-3, bf16 3e-2. Kernel buffers
start as NaN (kernels.objective.POISON) so an element a kernel fails to write shows up.
The reference is reflexflow.reference.objective (the same typed signature).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from reflexflow import reference as ref  # noqa: E402
from reflexflow.kernels import fused_objective, layout, triton_usable  # noqa: E402
from reflexflow.kernels import objective as fo  # noqa: E402
from reflexflow.objective import ObjectiveInputs, ObjectiveSpec  # noqa: E402
from reflexflow.paths import get_path  # noqa: E402

from .helpers import one_step_inputs  # noqa: E402
from .kernel_probes import make_spec  # noqa: E402

pytestmark = pytest.mark.skipif(
    not triton_usable("cuda" if torch.cuda.is_available() else "cpu"),
    reason="Triton needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
OUT_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
OUTPUTS = ("loss", "fc_loss", "adr_loss", "per_sample")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(fo, "POISON", True)


def _err(got, want) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape
    assert torch.isfinite(got).all(), "kernel output has NaN (unwritten element?)"
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _inputs(shape, dtype, seed, path, inactive=(0,), state=None, t1_one_rows=()):
    """Fresh random v0, v1, x1, eps, x^ (rounded to their dtypes) as float64, t0, t1, k.

    Rows in t1_one_rows are not rolled out: k = 0, t1 = 1 (compare sets x^ = x_t1)."""
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    x1, eps, v0, v1, noise = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in "abcde")
    t0 = 0.6 * torch.rand(b, generator=g, dtype=torch.float64)
    t1 = t0 + 0.05 + 0.3 * torch.rand(b, generator=g, dtype=torch.float64)
    k = torch.ones(b, dtype=torch.int64)
    k[list(inactive)] = 0
    for i in t1_one_rows:
        t1[i], k[i] = 1.0, 0
    x_hat = ref.interpolate(path, x1, eps, t1) + 0.5 * noise * (1 + torch.rand(shape, generator=g))
    state = state or dtype
    x1, eps = x1.to(state).double(), eps.to(state).double()
    x_hat = x_hat.to(state).double()
    v0, v1 = v0.to(dtype).double(), v1.to(dtype).double()
    return v0, v1, x1, eps, x_hat, t0.float().double(), t1.float().double(), k


def _strided(x: torch.Tensor) -> torch.Tensor:
    """Same values, transposed storage (not contiguous)."""
    y = x.transpose(0, -1).contiguous().transpose(0, -1)
    assert not y.is_contiguous() or x.shape[0] == 1 or x.shape[-1] == 1
    return y


@dataclasses.dataclass
class Case:
    """compare's options beyond the spec: the data, the form of v, the gradients checked."""

    seed: int = 0
    path: str = "linear"
    mode: str = "separate"  # "joint" (v_joint), "shared" (v1 is v0) or "separate"
    grads: dict | None = None  # {output: c}: the gradients of sum_k c_k output_k
    inactive: tuple = (0,)  # rows with k = 0
    noncontig: bool = False
    state: torch.dtype | None = None  # dtype of x1, eps, x^ (default: dtype)
    weights: bool = False
    targets: bool = False
    fc_delta: bool = False
    has_v1: bool = True
    zero_v1_rows: tuple = ()
    small_v1_rows: tuple = ()
    t1_one_rows: tuple = ()
    grad_tol: float | None = None
    backward_twice: bool = False
    fc_active: torch.Tensor | None = None


_CASE_FIELDS = {f.name for f in dataclasses.fields(Case)}


def compare(shape, dtype=torch.float32, **options):
    """Run reference (float64, CPU) and fused (dtype, on DEV) objectives on the same
    inputs; compare every output, then the gradients of sum_k c_k * output_k (grads:
    {output: c}, c a float or a (B,) weight for per_sample). options: Case's fields,
    the rest are make_spec's knobs. Returns the fused terms."""
    case = Case(**{k: v for k, v in options.items() if k in _CASE_FIELDS})
    spec = make_spec(**{k: v for k, v in options.items() if k not in _CASE_FIELDS})
    p = get_path(case.path)
    state = case.state or dtype
    v0, v1, x1, eps, x_hat, t0, t1, k = _inputs(
        shape, dtype, case.seed, p, case.inactive, state, case.t1_one_rows
    )
    b = shape[0]
    g = torch.Generator().manual_seed(case.seed + 100)
    if case.zero_v1_rows:
        v1[list(case.zero_v1_rows)] = 0
    if case.small_v1_rows:  # |v1| below norm_floor |v_adr| but far above norm_eps
        v1[list(case.small_v1_rows)] *= 1e-4
    samples = dict(x1=x1, eps=eps, x_hat=x_hat)
    rows = dict(t0=t0, t1=t1)
    if case.weights:
        rows["fm_weight"] = torch.rand(b, generator=g, dtype=torch.float64) + 0.5
        rows["adr_weight"] = torch.rand(b, generator=g, dtype=torch.float64) + 0.5
    if case.targets:
        samples["u0"] = torch.randn(shape, generator=g, dtype=torch.float64)
        samples["v_adr"] = torch.randn(shape, generator=g, dtype=torch.float64)
    if case.fc_delta:
        samples["fc_delta"] = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    samples = {n: x.to(state).double() for n, x in samples.items()}  # rounded once
    rows = {n: x.float().double() for n, x in rows.items()}
    if case.t1_one_rows:  # x^ = x_t1 as the reference computes it: its delta is exactly 0
        idx = list(case.t1_one_rows)
        x_t1 = ref.interpolate(p, samples["x1"], samples["eps"], rows["t1"])
        samples["x_hat"][idx] = x_t1[idx]
    grads = case.grads or {"loss": 1.0}

    def inputs(device, cast_v, cast_state, cast_rows, strided):
        if case.mode == "joint":
            vj = _leaf(cast_v(torch.cat([v0, v1])).to(device))
            vs, leaves = dict(v_joint=vj, v0=None, v1=None), [vj]
        else:
            a = _leaf(strided(cast_v(v0).to(device)))
            if case.mode == "shared":
                vs, leaves = dict(v0=a, v1=a), [a]
            elif not case.has_v1:
                vs, leaves = dict(v0=a, v1=None), [a]
            else:
                c = _leaf(strided(cast_v(v1).to(device)))
                vs, leaves = dict(v0=a, v1=c), [a, c]
        kw = {n: strided(cast_state(x).to(device)) for n, x in samples.items()}
        kw.update({n: cast_rows(x).to(device) for n, x in rows.items()})
        kw["k"] = k.to(device)
        if case.fc_active is not None:
            kw["fc_active"] = case.fc_active.to(device)
        return ObjectiveInputs(**vs, **kw), leaves

    want_in, lead = inputs("cpu", _double, _double, _double, lambda x: x)
    got_in, dev_leaves = inputs(
        DEV,
        lambda x: x.to(dtype),
        lambda x: x.to(state),
        lambda x: x.float(),
        _strided if case.noncontig else (lambda x: x),
    )
    want = ref.objective(p, spec, want_in)
    got = fused_objective(p, spec, got_in)

    for key in (*OUTPUTS, "w"):
        a, b = getattr(got, key), getattr(want, key)
        if b is None:
            assert a is None, key
        else:
            assert _err(a, b) < OUT_TOL[a.dtype], key

    def total(out, device):
        acc = 0
        for key, c in grads.items():
            term = getattr(out, key)
            if term is None:
                continue
            c = c.to(device, term.dtype) if isinstance(c, torch.Tensor) else c
            acc = acc + (c * term).sum()
        return acc

    rounds = 2 if case.backward_twice else 1
    for r in range(rounds):
        keep = r + 1 < rounds
        total(want, "cpu").backward(retain_graph=keep)
        total(got, DEV).backward(retain_graph=keep)
        tol = case.grad_tol or GRAD_TOL[dtype]
        for a, c in zip(dev_leaves, lead, strict=True):
            if c.grad is None:
                assert a.grad is None or not a.grad.any()
                continue
            assert a.grad.dtype == dtype and a.grad.shape == a.shape
            assert _err(a.grad, c.grad) < tol
    return got


def _double(x):
    return x.double()


def _leaf(x):
    """A fresh leaf that requires grad, with x's values and strides."""
    return x.detach().clone(memory_format=torch.preserve_format).requires_grad_()


# ---------------------------------------------------------------------------- accuracy

SHAPES = [(3, 1, 7, 9), (3, 3, 12, 10), (2, 4, 5, 11), (2, 16, 6, 6)]
FILTERS = ["gaussian", "box", "fft", "none"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("adr_loss", ["direction", "mse"])
@pytest.mark.parametrize("fc_filter", FILTERS)
def test_images_match_reference_for_every_dtype_filter_and_adr_loss(dtype, adr_loss, fc_filter):
    i = FILTERS.index(fc_filter) + 4 * (adr_loss == "mse")
    compare(
        SHAPES[i % 4],
        dtype,
        seed=i,
        adr_loss=adr_loss,
        fc_filter=fc_filter,
        fc_sigma=1.3,
        fc_size=3,
        fc_per_channel=i % 2 == 1,
        mode=("separate", "joint")[i % 2],
    )


@pytest.mark.parametrize(
    "shape", [(3, 10), (3, 2, 13), (2, 3, 2, 5, 7), (2, 2, 2, 2, 3, 5)], ids=str
)
@pytest.mark.parametrize("adr_loss", ["direction", "mse"])
def test_vectors_signals_and_video_match_reference(shape, adr_loss):
    compare(shape, adr_loss=adr_loss, fc_per_channel=adr_loss == "mse", path="gvp", mode="joint")
    compare(shape, adr_loss=adr_loss, fc_signed=True, fc_form="squared", path="vp", seed=1)


@pytest.mark.parametrize("mode", ["joint", "shared", "separate"])
@pytest.mark.parametrize("adr_loss", ["direction", "mse"])
def test_joint_output_and_shared_v_match_reference(mode, adr_loss):
    """v_joint: one (2B, ...) output and its gradient in that layout; shared: v0 = v1 is
    one tensor (fm_input="biased"), one gradient G0 + G1."""
    got = compare((3, 2, 6, 5), mode=mode, adr_loss=adr_loss, weights=True)
    assert got.adr_loss is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sample_weights_and_explicit_targets_match_reference(dtype):
    compare((3, 2, 6, 5), dtype, weights=True, targets=True, mode="joint")
    compare((3, 2, 6, 5), dtype, weights=True, targets=True, adr_loss="mse", seed=2)


@pytest.mark.parametrize("fc_filter", ["gaussian", "box", "none", "fft"])
@pytest.mark.parametrize("fc_form", ["weight", "squared"])
def test_signed_and_squared_fc_match_reference(fc_filter, fc_form):
    compare(
        (3, 3, 7, 6),
        fc_signed=True,
        fc_form=fc_form,
        fc_filter=fc_filter,
        fc_size=3,
        fc_sigma=0.8,
        lambda_fc=2.0,
    )
    compare((3, 3, 7, 6), fc_form=fc_form, fc_filter=fc_filter, fc_per_channel=True, seed=3)


@pytest.mark.parametrize("path", ["linear", "gvp"])
@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_rows_not_rolled_out_with_t1_one_match_reference(mode, path):
    """k = 0, t1 = 1: s(t1) = 0, the ADR coefficient s'/s is taken as 0 (delta is 0).
    GVP: the kernels' s(t1) is exactly 0 at t1 = 1 (fp32 cos(pi / 2) is not)."""
    got = compare((4, 2, 6, 5), t1_one_rows=(0, 2), inactive=(), mode=mode, path=path)
    got = compare((4, 2, 6, 5), t1_one_rows=(1,), adr_loss="mse", mode=mode, seed=4, path=path)
    assert torch.isfinite(got.per_sample).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_non_contiguous_inputs_match_reference(dtype):
    compare((3, 3, 6, 5), dtype, noncontig=True, weights=True, targets=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("adr_loss", ["direction", "mse"])
def test_half_model_outputs_with_fp32_state_round_only_once(dtype, adr_loss):
    """As ReflexFlowLoss calls it: v in half precision, x1, eps, x^ in fp32."""
    tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    compare((3, 4, 6, 5), dtype, state=torch.float32, adr_loss=adr_loss, grad_tol=tol, mode="joint")


@pytest.mark.parametrize(
    "case",
    [
        dict(inactive=(0, 1, 2)),  # every row k = 0: w = 1
        dict(inactive=(), path="vp", fc_filter="box", fc_size=1),
        dict(lambda_fc=0.0, adr_loss="mse"),
        dict(lambda_adr=0.0),
        dict(lambda_adr=0.0, mode="joint", grads={"loss": 1.0, "adr_loss": 0.7}),
        dict(has_v1=False, fc_per_channel=True),
        dict(fc_delta=True, fc_sigma=0.0),
        dict(fc_active=torch.tensor([True, False, True]), lambda_fc=2.5, lambda_adr=3.0),
        # an FC-active row whose bias is exactly 0 (x^ = x_t1): its map and mean are 0
        dict(t1_one_rows=(1,), fc_active=torch.tensor([True, True, False])),
        dict(t1_one_rows=(1,), fc_active=torch.tensor([True, True, False]), fc_form="squared"),
        dict(zero_v1_rows=(1,)),  # |v1| < norm_eps: the clamp's gradient
        dict(small_v1_rows=(0, 2)),  # |v1| < norm_floor |v_adr|: the relative floor
        dict(small_v1_rows=(0,), norm_floor=0.0),  # floor off: only norm_eps bounds |v1|
    ],
    ids=[
        "all_k0",
        "vp_box1",
        "no_fc",
        "no_adr",
        "no_adr_joint_adr_grad",
        "no_v1",
        "fc_delta",
        "fc_active",
        "fc_active_zero_bias",
        "fc_active_zero_bias_squared",
        "zero_v1",
        "small_v1",
        "small_v1_no_floor",
    ],
)
def test_special_rows_and_options_match_reference(case):
    compare((3, 2, 9, 7), **case)


@pytest.mark.parametrize("mode", ["separate", "joint", "shared"])
def test_gradients_of_every_output_scale_like_reference(mode):
    """Any mix of dL/dloss, dL/dfc_loss, dL/dadr_loss and a per-sample dL/dper_sample
    (the backward scales the stored gradients by per-sample factors)."""
    b = torch.tensor([0.3, -1.2])
    compare((2, 3, 5, 6), mode=mode, grads={"loss": 2.5, "fc_loss": -1.0, "adr_loss": 0.5})
    compare((2, 3, 5, 6), mode=mode, grads={"fc_loss": 3.0}, adr_loss="mse")
    compare((2, 3, 5, 6), mode=mode, grads={"per_sample": b, "loss": 0.25}, weights=True)
    compare((2, 3, 5, 6), mode=mode, grads={"loss": 0.0})


@pytest.mark.parametrize("mode", ["separate", "joint", "shared"])
def test_second_backward_through_a_retained_graph_matches_reference(mode):
    """The first backward scales the stored gradients in place; a second one (retain_graph)
    recomputes them from the saved inputs."""
    compare((2, 3, 5, 6), mode=mode, grads={"loss": 0.5, "adr_loss": 2.0}, backward_twice=True)


@pytest.mark.parametrize(
    "shape, knobs",
    [
        ((3, 3, 7, 9), {}),
        ((3, 3, 7, 9), dict(adr_loss="mse", fc_per_channel=True, fc_filter="box", fc_size=3)),
        ((3, 3, 7, 9), dict(fc_signed=True, fc_form="squared", fc_filter="none", mode="joint")),
        ((2, 2, 3, 5, 6), dict(mode="shared", weights=True, targets=True)),
        ((2, 2, 3, 5, 6), dict(fc_filter="fft", mode="joint", t1_one_rows=(1,), inactive=())),
        ((3, 2, 40), dict(fc_sigma=3.0, lambda_adr=0.0)),
        ((3, 11), dict(fc_delta=True, has_v1=False)),
    ],
)
def test_large_sample_path_matches_reference(monkeypatch, shape, knobs):
    """Samples too large for one program take stats, plane, grad kernels (forced here by a
    zero tile limit; BLOCK 64 makes samples span several programs)."""
    monkeypatch.setattr(layout, "SMALL_TILE_MAX", 0)
    monkeypatch.setattr(fo, "BLOCK", 64)
    compare(shape, **knobs)
    compare(shape, seed=5, grads={"loss": 0.5, "per_sample": torch.arange(shape[0]) - 1.0}, **knobs)


def test_several_samples_per_program_with_a_partial_last_program():
    """Vectors of 10 elements: 128 samples share one program (R = 2048 / 16)."""
    assert layout.sample_plan(layout.layout_of((10,)), layout.SMALL_TILE_MAX).rows == 128
    compare((300, 10), inactive=(0, 7, 299))
    compare((300, 10), adr_loss="mse", fc_signed=True, seed=1, mode="joint")


def test_outputs_have_the_reference_dtypes():
    """Same dtype promotion as reference.objective run on the same dtypes."""
    p = get_path("linear")
    for vd, sd in [
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
    ]:
        v0, v1 = (torch.randn(2, 2, 4, 4, dtype=vd, device=DEV) for _ in "ab")
        x1, eps, xh = (torch.randn(2, 2, 4, 4, dtype=sd, device=DEV) for _ in "abc")
        t0, t1 = (torch.full((2,), time, device=DEV) for time in (0.2, 0.3))
        inputs = one_step_inputs(x1, eps, xh, t0, t1, v0=v0, v1=v1)
        want = ref.objective(p, ObjectiveSpec(), inputs)
        got = fused_objective(p, ObjectiveSpec(), inputs)
        for key in (*OUTPUTS, "w"):
            assert getattr(got, key).dtype == getattr(want, key).dtype, (key, vd, sd)


# ------------------------------------------------------------------- errors and doors


def test_x1_or_u0_requiring_grad_is_refused():
    p = get_path("linear")
    x = torch.randn(2, 3, device=DEV)
    t = torch.full((2,), 0.3, device=DEV)
    inputs = one_step_inputs(x, x, x, t, t, v0=x, v1=x)
    spec = ObjectiveSpec()
    with pytest.raises(ValueError, match="x1"):
        fused_objective(p, spec, dataclasses.replace(inputs, x1=x.clone().requires_grad_()))
    with pytest.raises(ValueError, match="u0"):
        fused_objective(p, spec, dataclasses.replace(inputs, u0=x.clone().requires_grad_()))


def test_bad_inputs_and_shapes_are_clear_errors():
    p = get_path("linear")
    x = torch.randn(2, 3, device=DEV)
    t = torch.full((2,), 0.3, device=DEV)
    inputs = one_step_inputs(x, x, x, t, t, v0=x, v1=x + 1)
    spec = ObjectiveSpec()
    with pytest.raises(ValueError, match="v_joint"):
        fused_objective(p, spec, dataclasses.replace(inputs, v_joint=torch.cat([x, x])))
    with pytest.raises(ValueError, match="fm_weight"):
        fused_objective(p, spec, dataclasses.replace(inputs, fm_weight=torch.ones(3, device=DEV)))
    with pytest.raises(ValueError, match="v_joint"):
        fused_objective(p, spec, dataclasses.replace(inputs, v0=None, v1=None, v_joint=x))
    with pytest.raises(ValueError, match="x1 must have shape"):
        fused_objective(p, spec, dataclasses.replace(inputs, x1=x[:, 0]))


def _op_args(shape=(2, 3, 5, 4), mode=fo.V_SEPARATE, grad=True, **over) -> fo.OpArgs:
    """The op's arguments for random data (linear path, coefficients in-kernel)."""
    p = get_path("linear")
    v0, v1, x1, eps, x_hat, t0, t1, k = (
        z.float().to(DEV) if z.is_floating_point() else z.to(DEV)
        for z in _inputs(shape, torch.float32, 7, p)
    )
    if mode == fo.V_JOINT:
        v0, v1 = torch.cat([v0, v1]), None
    elif mode == fo.V_SHARED:
        v1 = None
    if grad:
        v0.requires_grad_()
        if v1 is not None:
            v1.requires_grad_()
    args = dict(
        v0=v0,
        v1=v1,
        x1=x1,
        eps=eps,
        x_hat=x_hat,
        u0=None,
        v_adr=None,
        fc_delta=None,
        t0=t0,
        t1=t1,
        coef=None,
        k=k,
        fc_active=None,
        fm_weight=None,
        adr_weight=None,
        v_mode=mode,
        path_kind=1,
        **fo.OpArgs.spec_fields(make_spec(fc_sigma=1.0)),
        need_g0=grad,
        need_g1=grad,
        return_w=True,
        fail_soft=False,
        scale_in_place=False,
    )
    args.update(over)
    return fo.OpArgs(**args)


def test_direct_op_call_with_strided_wrong_device_or_dtype_inputs_is_refused():
    """The op reads raw memory: its host-side checks refuse what it would read wrong."""
    a = _op_args(grad=False)
    with pytest.raises(ValueError, match="x1 must be contiguous"):
        torch.ops.reflexflow.fused_objective(*a._replace(x1=_strided(a.x1)).pack())
    with pytest.raises(TypeError, match="eps must be float"):
        torch.ops.reflexflow.fused_objective(*a._replace(eps=a.eps.to(torch.int32)).pack())
    with pytest.raises(ValueError, match="t0 must have shape"):
        torch.ops.reflexflow.fused_objective(*a._replace(t0=a.t0[:1]).pack())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="x_hat is on cpu"):
            torch.ops.reflexflow.fused_objective(*a._replace(x_hat=a.x_hat.cpu()).pack())


@pytest.mark.parametrize(
    "over",
    [
        {},
        dict(mode=fo.V_JOINT, adr_loss="mse", fc_filter="box", fc_size=3),
        dict(mode=fo.V_SHARED, fc_per_channel=True, fc_form="squared"),
        dict(fc_signed=True, fc_filter="fft", lambda_adr=0.0),
        dict(shape=(4, 6), fc_filter="none"),
        dict(need_g0=False, need_g1=False),
        dict(mode=fo.V_JOINT, need_g0=False),
    ],
    ids=[
        "default",
        "joint_mse_box",
        "shared_per_channel",
        "signed_fft",
        "vectors",
        "recomputed_grads",
        "joint_recomputed",
    ],
)
def test_opcheck_passes_on_the_registration_cuda_uses(over):
    """opcheck (schema, fake tensors, autograd registration, AOT dispatch with dynamic
    shapes) on the triton_op itself: on CPU too, kernels are JITFunctions that
    wrap_triton can trace (kernels._jit). scale_in_place=False: opcheck keeps the
    workspace outputs g0, g1; need_g*=False: backward recomputes them."""
    torch.library.opcheck(fo.fused_objective_op, _op_args(**over).pack())


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
    inputs = ObjectiveInputs(v0=v0, x1=x1, eps=eps, x_hat=x1, t0=t, t1=t, k=t.long())
    out = fused_objective(p, make_spec(lambda_fc=0.0), inputs)
    out.loss.backward()
    n = v0.numel()
    tail = (v0[1, -1, -8:].float() - (x1[1, -1, -8:].float() - eps[1, -1, -8:].float())) * 2 / n
    assert torch.allclose(v0.grad[1, -1, -8:].float(), tail, rtol=1e-2)
    want = (v0[1].float() - x1[1].float() + eps[1].float()).square().sum() / n
    head = (v0[0].float() - x1[0].float() + eps[0].float()).square().sum() / n
    assert torch.allclose(out.loss.float(), want + head, rtol=1e-3)


def test_v_joint_alone_needs_no_v0_v1():
    """As for the reference: v0 and v1 default to None, so the loss passes v_joint only."""
    p = get_path("linear")
    x = torch.randn(2, 3, 4, 4, device=DEV)
    t = torch.full((2,), 0.3, device=DEV)
    v = torch.randn(4, 3, 4, 4, device=DEV, requires_grad=True)
    inputs = one_step_inputs(x, -x, x, t, t + 0.1, v_joint=v)
    got = fused_objective(p, ObjectiveSpec(), inputs)
    want = ref.objective(p, ObjectiveSpec(), inputs)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "changes",
    [{"adr_target_grad": True}, {"fc_normalize": "sum"}, {"fc_adds_fm": True}],
    ids=["adr-target-grad", "fc-sum", "fc-adds-fm"],
)
def test_supports_refuses_specs_the_kernels_do_not_implement(changes):
    x = torch.zeros(2, 3, 4, 4)
    t = torch.full((2,), 0.3)
    inputs = ObjectiveInputs(x1=x, eps=x, x_hat=x, t0=t, t1=t, k=t.long(), v0=x, v1=x.clone())
    assert fo.supports(get_path("linear"), ObjectiveSpec(), inputs)
    spec = ObjectiveSpec().replace(**changes)
    assert spec.reference_only
    assert not fo.supports(get_path("linear"), spec, inputs)
