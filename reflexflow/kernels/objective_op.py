"""The ops ``reflexflow::fused_objective`` and ``reflexflow::fused_objective_backward``.

Reference twin: :func:`reflexflow.reference.objective` (the public door with its
signature is :func:`reflexflow.kernels.objective.fused_objective`). The forward op
returns (loss, fc_loss, adr_loss, per_sample, w, g0, g1): g0, g1 are the gradients of
``loss`` for grad_output 1 (see objective_kernels), written by the forward's single pass
over the inputs and kept for backward, which only scales them.

Launches (N elements, linear/GVP path, no torch op between them, no host sync):

* a sample fits one program (layout.SMALL_TILE_MAX): sample_kernel + finalize_kernel
  forward, scale_kernel backward: 3 launches; in eager the backward scales the stored
  gradients in place and moves no bytes when the factor is 1 (plain loss.backward()).
* larger samples: stats_kernel (when FC or the direction loss needs it), plane_kernel,
  grad_kernel, finalize_kernel forward, scale_kernel backward: at most 5 launches.
* fc_filter="fft": the larger-sample kernels, with the filter of the map done by torch
  (reference._fft_lowpass on the N / C map and its plane sums: a handful of launches).

Backward in eager (plain tensors): the stored gradients are scaled in place and returned;
a second backward through the same graph (retain_graph=True) or a shared-v gradient that
needs the two terms apart recomputes them with the forward op from the saved inputs.
Traced by torch.compile (fake / functional tensors): the backward op is functional
(out = s * g) so AOTAutograd and Inductor see pure ops. With create_graph=True the
gradients come from the reference (differentiable). Under backend="auto" (fail_soft) a
failing backward kernel is replaced by the reference's gradients from the saved inputs
(one warning; the reference from then on); out-of-memory errors always propagate.
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .. import reference as ref
from ..paths import GVPPath, LinearPath
from . import layout as plans
from ._jit import INTERPRET
from .layout import layout_of, next_pow2, sample_plan
from .objective_kernels import (
    finalize_kernel,
    grad_kernel,
    plane_kernel,
    sample_kernel,
    scale_kernel,
    stats_kernel,
)

__all__ = [
    "fused_objective_op",
    "fused_objective_backward_op",
    "path_coefficients",
    "path_kind",
    "V_SEPARATE",
    "V_JOINT",
    "V_SHARED",
    "N_OP_ARGS",
]

_OP = "reflexflow::fused_objective"
_OP_BACKWARD = "reflexflow::fused_objective_backward"
POISON = False  # tests set True: buffers start as NaN so an unwritten element shows
BLOCK = 1024  # positions per program of the larger-sample kernels
SCALE_BLOCK = 1024
SCALE_PROGRAMS = 64 if INTERPRET else 2048
V_SEPARATE, V_JOINT, V_SHARED = 0, 1, 2
FILTER_CODE = {"none": 0, "gaussian": 1, "box": 2, "fft": 3}
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
N_OP_ARGS = 34


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    if POISON:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def _unused(device: torch.device) -> Tensor:
    """A distinct placeholder for a pointer argument a kernel never touches. Never alias
    a real output: traced launches (wrap_triton) may treat every pointer as written."""
    return torch.empty(1, dtype=torch.float32, device=device)


def _check(name: str, x: Tensor | None, device: torch.device, shape=None, floats=True) -> None:
    """Host-side checks of one op input (metadata only: no launch, no sync)."""
    if x is None:
        return
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (the device of x1)")
    if floats and x.dtype not in FLOATS:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous: the op reads raw memory (call "
            "reflexflow.kernels.fused_objective, which copies strided inputs once)"
        )


def _out_dtypes(v0, v1, x1, eps, x_hat, u0, v_adr, fc_delta, has_fc, has_v1):
    """(dtype of the losses and per_sample, dtype of w), as reference.objective promotes."""
    pt = torch.promote_types
    state = pt(x1.dtype, eps.dtype)
    out = pt(v0.dtype, u0.dtype if u0 is not None else state)
    w_dtype = fc_delta.dtype if fc_delta is not None else pt(x_hat.dtype, state)
    if has_fc:
        out = pt(out, w_dtype)
    if has_v1:
        out = pt(
            out,
            pt(
                (v1 if v1 is not None else v0).dtype,
                v_adr.dtype if v_adr is not None else pt(state, x_hat.dtype),
            ),
        )
    return out, w_dtype


def _filter_code(
    fc_filter: str, fc_sigma: float, fc_size: int, n_axes: int
) -> tuple[int, int, float]:
    """(FILT, NT, SIGMA): 0 none, 1 gaussian (NT = 2 ceil(3 sigma) + 1 taps), 2 box, 3 fft."""
    code = FILTER_CODE[fc_filter]
    if n_axes == 0 or (code == 1 and fc_sigma <= 0):
        return 0, 1, 1.0
    if code == 1:
        return 1, 2 * max(1, math.ceil(3.0 * fc_sigma)) + 1, float(fc_sigma)
    if code == 2:
        return 2, int(fc_size), 1.0
    return code, 1, 1.0


def _forward(
    v0: Tensor,
    v1: Tensor | None,
    x1: Tensor,
    eps: Tensor,
    x_hat: Tensor,
    u0: Tensor | None,
    v_adr: Tensor | None,
    fc_delta: Tensor | None,
    t0: Tensor,
    t1: Tensor,
    coef: Tensor | None,
    k: Tensor,
    fc_active: Tensor | None,
    fm_weight: Tensor | None,
    adr_weight: Tensor | None,
    v_mode: int,
    path_kind: int,
    lambda_adr: float,
    lambda_fc: float,
    direction: bool,
    per_channel: bool,
    fc_signed: bool,
    fc_squared: bool,
    fc_filter: str,
    fc_sigma: float,
    fc_size: int,
    fc_cutoff: float,
    norm_eps: float,
    norm_floor: float,
    need_g0: bool,
    need_g1: bool,
    return_w: bool,
    fail_soft: bool,
    scale_in_place: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward of the fused objective (the op body; see the module docstring).

    v_mode 0: v0, v1 (or None) separate; 1: v0 is the joint (2B, ...) output, v1 None;
    2: v1 is v0 (v1 None). path_kind 1 linear, 2 GVP (coefficients in the kernel from
    t0, t1), 0 the (B, 7) table ``coef`` of :func:`path_coefficients`. All tensors
    contiguous on one device (checked here; ValueError / TypeError otherwise).
    need_g0 / need_g1: write the gradient workspace g0 / g1 (outputs 5, 6); backward
    recomputes whatever it needs and finds missing. fail_soft: backend="auto" (a failing
    backward falls back to the reference). scale_in_place: backward may scale g0, g1 in
    place (the public wrapper drops them; a direct caller keeping them passes False).
    """
    dev = x1.device
    if x1.dim() < 2 or x1.shape[0] == 0:
        raise ValueError(f"x1 must have shape (B, ...) with B >= 1, got {tuple(x1.shape)}")
    if v_mode not in (V_SEPARATE, V_JOINT, V_SHARED):
        raise ValueError(f"v_mode must be 0, 1 or 2, got {v_mode}")
    if fc_filter not in FILTER_CODE:
        raise ValueError(f"fc_filter must be one of {tuple(FILTER_CODE)}, got {fc_filter!r}")
    batch, sample_shape = x1.shape[0], tuple(x1.shape[1:])
    shape = tuple(x1.shape)
    v_shape = (2 * batch, *sample_shape) if v_mode == V_JOINT else shape
    if v_mode != V_SEPARATE and v1 is not None:
        raise ValueError("v1 must be None when v0 is the joint output or shared (v_mode 1, 2)")
    for name, x, s in (
        ("v0", v0, v_shape),
        ("v1", v1, shape),
        ("x1", x1, shape),
        ("eps", eps, shape),
        ("x_hat", x_hat, shape),
        ("u0", u0, shape),
        ("v_adr", v_adr, shape),
        ("fc_delta", fc_delta, shape),
        ("t0", t0, (batch,)),
        ("t1", t1, (batch,)),
        ("coef", coef, (batch, 7)),
        ("fm_weight", fm_weight, (batch,)),
        ("adr_weight", adr_weight, (batch,)),
    ):
        _check(name, x, dev, s)
    _check("k", k, dev, (batch,), floats=False)
    _check("fc_active", fc_active, dev, (batch,), floats=False)
    if path_kind == 0 and coef is None:
        raise ValueError("path_kind 0 needs the coefficient table coef")

    lay = layout_of(sample_shape)
    has_fc = lambda_fc != 0
    has_v1 = v1 is not None or v_mode != V_SEPARATE
    out_dtype, w_dtype = _out_dtypes(v0, v1, x1, eps, x_hat, u0, v_adr, fc_delta, has_fc, has_v1)
    map_mode = 2 if fc_signed else (1 if per_channel else 0)
    cm = 1 if map_mode == 0 else lay.channels
    filt, ntaps, sigma = _filter_code(fc_filter, fc_sigma, fc_size, lay.n_axes)
    c1 = float(lambda_adr) if v_mode == V_SHARED or lambda_adr != 0 else 1.0
    f32 = torch.float32

    per_sample = _alloc((batch,), out_dtype, dev)
    loss, fc_loss, adr_loss = (_alloc((), out_dtype, dev) for _ in range(3))
    g0 = _alloc(v0.shape, v0.dtype, dev) if need_g0 else v0.new_empty((0,))
    write_g1 = need_g1 and v_mode == V_SEPARATE and v1 is not None
    g1 = _alloc(v1.shape, v1.dtype, dev) if write_g1 else v0.new_empty((0,))
    write_w = has_fc and return_w
    w_shape = (batch, cm, *sample_shape[1:]) if len(sample_shape) > 1 else shape
    w = _alloc(w_shape, w_dtype, dev) if write_w else x1.new_empty((0,), dtype=w_dtype)

    dummy_in = x1  # read-only placeholder for absent inputs
    has_u0, has_va, has_fcd = u0 is not None, v_adr is not None, fc_delta is not None
    need_delta = (has_fc and not has_fcd) or (has_v1 and not has_va)
    flags = dict(
        PATH=path_kind,
        V_MODE=v_mode,
        HAS_V1=has_v1,
        HAS_U0=has_u0,
        HAS_VA=has_va,
        NEED_X=need_delta or not has_u0,
        NEED_DELTA=need_delta,
        HAS_FC=has_fc,
        MAP_MODE=map_mode,
        SQUARED=fc_squared,
        ACT_K=fc_active is None,
        HAS_FMW=fm_weight is not None,
        HAS_ADRW=adr_weight is not None,
        DIRECTION=direction,
        WRITE_G0=need_g0,
        WRITE_G1=write_g1 or (v_mode == V_JOINT and need_g0),
        WRITE_W=write_w,
    )
    ins = (
        v0,
        v1 if v1 is not None else dummy_in,
        x1,
        eps,
        x_hat,
        u0 if has_u0 else dummy_in,
        v_adr if has_va else dummy_in,
        fc_delta if has_fcd else dummy_in,
        t0,
        t1,
        coef if coef is not None else t1,
        k if fc_active is None else fc_active,
        fm_weight if fm_weight is not None else t1,
        adr_weight if adr_weight is not None else t1,
    )
    outs = tuple(
        x if use else _unused(dev) for x, use in ((g0, need_g0), (g1, write_g1), (w, write_w))
    )
    plan = sample_plan(lay, plans.SMALL_TILE_MAX) if filt != 3 else None
    if plan is not None:
        nblk = 1
        part = _alloc((2, batch, 1), f32, dev)
        filtered = has_fc and filt != 0
        scratch = _alloc((batch * cm * lay.positions,), f32, dev) if filtered else _unused(dev)
        wrap_triton(sample_kernel)[(triton.cdiv(batch, plan.rows),)](
            *ins,
            *outs,
            part,
            scratch,
            batch,
            lay.channels,
            lay.positions,
            lay.height,
            lay.width,
            float(lambda_fc),
            c1,
            float(norm_eps),
            float(norm_floor),
            ref.TINY,
            **flags,
            HAS_FCD=has_fcd,
            FILT=filt,
            NT=ntaps,
            SIGMA=sigma,
            N_AXES=lay.n_axes,
            R=plan.rows,
            CB=plan.cb,
            SB=plan.sb,
            MASKED=not (plan.rows == 1 and plan.cb == lay.channels and plan.sb == lay.positions),
            num_warps=plan.num_warps,
        )
    else:
        nblk = triton.cdiv(lay.positions, BLOCK)
        part = _large_path(
            ins,
            outs,
            batch,
            lay,
            flags,
            cm,
            filt,
            ntaps,
            sigma,
            fc_cutoff,
            fc_signed,
            lambda_fc,
            c1,
            norm_eps,
            norm_floor,
            has_fcd,
        )
    wrap_triton(finalize_kernel)[(1,)](
        part,
        ins[12],
        ins[13],
        per_sample,
        loss,
        fc_loss,
        adr_loss,
        batch,
        nblk,
        lay.sample,
        float(lambda_adr),
        HAS_V1=has_v1,
        HAS_FMW=fm_weight is not None,
        HAS_ADRW=adr_weight is not None,
        DIRECTION=direction,
        BB=max(1, 1024 // min(64, next_pow2(nblk))),
        BN=min(64, next_pow2(nblk)),
    )
    return loss, fc_loss, adr_loss, per_sample, w, g0, g1


def _large_path(
    ins,
    outs,
    batch,
    lay,
    flags,
    cm,
    filt,
    ntaps,
    sigma,
    fc_cutoff,
    fc_signed,
    lambda_fc,
    c1,
    norm_eps,
    norm_floor,
    has_fcd,
) -> Tensor:
    """stats_kernel, plane_kernel (or the torch fft of the map), grad_kernel for samples
    that do not fit one program; returns the per-program sums part (2, B, NBLK)."""
    v0, v1, x1, eps, x_hat, u0, v_adr, fcd, t0, t1, coef, act, fmw, adrw = ins
    dev, f32 = x1.device, torch.float32
    fp, nblk = lay.positions, triton.cdiv(lay.positions, BLOCK)
    has_fc, has_va = flags["HAS_FC"], flags["HAS_VA"]
    norms_needed = flags["HAS_V1"] and flags["DIRECTION"]
    nplanes = batch * cm * lay.frames
    map_raw = _alloc((batch * cm, fp), f32, dev) if has_fc else _unused(dev)
    part3 = _alloc((3, batch, nblk), f32, dev) if norms_needed else _unused(dev)
    if has_fc or norms_needed:
        wrap_triton(stats_kernel)[(batch * nblk,)](
            v0,
            v1,
            x1,
            eps,
            x_hat,
            v_adr,
            fcd,
            t0,
            t1,
            coef,
            map_raw,
            part3,
            batch,
            lay.channels,
            fp,
            nblk,
            PATH=flags["PATH"],
            V_MODE=flags["V_MODE"],
            HAS_VA=has_va,
            HAS_FCD=has_fcd,
            NEED_DELTA=(has_fc and not has_fcd) or (norms_needed and not has_va),
            HAS_FC=has_fc,
            MAP_MODE=flags["MAP_MODE"],
            NORMS=norms_needed,
            BLOCK=BLOCK,
        )
    norms = _alloc((batch, 3), f32, dev) if norms_needed else _unused(dev)
    mapf, plane_sum = _unused(dev), _unused(dev)
    if has_fc:
        plane_sum = _alloc((nplanes,), f32, dev)
    if has_fc and filt == 3:  # fft: torch on the map (N / C elements), then the norms
        sizes = (lay.height, lay.width) if lay.n_axes == 2 else (lay.width,)
        m = ref._fft_lowpass(map_raw.view(nplanes, *sizes), fc_cutoff, lay.n_axes, not fc_signed)
        mapf = m.reshape(batch * cm, fp).contiguous()
        plane_sum = (m.abs() if fc_signed else m).reshape(nplanes, -1).sum(dim=1)
    run_planes = has_fc and filt != 3
    if run_planes or norms_needed:
        filtered = run_planes and filt != 0
        if filtered:
            mapf = _alloc((batch * cm, fp), f32, dev)
        elif run_planes:
            mapf = map_raw
        tmp = _alloc((batch * cm, fp), f32, dev) if filtered and lay.n_axes == 2 else _unused(dev)
        n_launch = nplanes if run_planes else 0
        wrap_triton(plane_kernel)[(n_launch + (batch if norms_needed else 0),)](
            map_raw,
            tmp,
            mapf,
            plane_sum,
            part3,
            norms,
            n_launch,
            lay.plane,
            lay.height,
            lay.width,
            batch,
            nblk,
            float(norm_eps),
            float(norm_floor),
            HAS_FC=run_planes,
            FILT=filt if filtered else 0,
            NT=ntaps,
            SIGMA=sigma,
            N_AXES=lay.n_axes,
            SIGNED=fc_signed,
            NORMS=norms_needed,
            BLOCK=BLOCK,
            BN=min(256, next_pow2(nblk)),
        )
    part = _alloc((2, batch, nblk), f32, dev)
    need_delta = flags["HAS_V1"] and not has_va
    grad_flags = dict(flags, NEED_DELTA=need_delta, NEED_X=need_delta or not flags["HAS_U0"])
    wrap_triton(grad_kernel)[(batch * nblk,)](
        v0,
        v1,
        x1,
        eps,
        x_hat,
        u0,
        v_adr,
        t0,
        t1,
        coef,
        act,
        fmw,
        adrw,
        mapf,
        plane_sum,
        norms,
        *outs,
        part,
        batch,
        lay.channels,
        lay.frames,
        fp,
        nblk,
        float(lambda_fc),
        c1,
        ref.TINY,
        **grad_flags,
        BLOCK=BLOCK,
        BN=min(64, next_pow2(lay.channels * lay.frames)),
    )
    return part


def _backward_impl(
    src0: Tensor,
    src1: Tensor | None,
    g_loss: Tensor | None,
    g_term0: Tensor | None,
    g_term1: Tensor | None,
    g_rows: Tensor | None,
    batch: int,
    joint: bool,
    a0: float,
    f0: float,
    p0: float,
    a1: float,
    f1: float,
    p1: float,
) -> tuple[Tensor, Tensor]:
    """Functional backward (traced graphs): (s0 src0, s1 src1), per-sample factors
    s = a g_loss + f g_term + p B g_rows[b] (scale_kernel). joint: src0 is the (2B, ...)
    gradient, its halves scale with s0 and s1 (src1 None)."""
    out0 = torch.empty_like(src0)
    out1 = torch.empty_like(src1) if src1 is not None else src0.new_empty((0,))
    _scale(
        src0,
        src1,
        out0,
        out1 if src1 is not None else None,
        g_loss,
        g_term0,
        g_term1,
        g_rows,
        batch,
        joint,
        (a0, f0, p0, a1, f1, p1),
        in_place=False,
        traced=True,
    )
    return out0, out1


def _scale(
    src0,
    src1,
    dst0,
    dst1,
    g_loss,
    g_term0,
    g_term1,
    g_rows,
    batch,
    joint,
    factors,
    in_place: bool,
    traced: bool,
) -> None:
    """Launch scale_kernel over one or two stored gradients (see its docstring)."""
    two = joint or src1 is not None
    per_sample = src0.numel() // (2 * batch if joint else batch)
    nblk = triton.cdiv(per_sample, SCALE_BLOCK)
    items = (2 if two else 1) * batch * nblk
    launch = wrap_triton(scale_kernel) if traced else scale_kernel
    dev = src0.device
    launch[(min(items, SCALE_PROGRAMS),)](
        src0,
        src1 if src1 is not None else _unused(dev),
        dst0,
        dst1 if dst1 is not None else _unused(dev),
        g_loss if g_loss is not None else _unused(dev),
        g_term0 if g_term0 is not None else _unused(dev),
        g_term1 if g_term1 is not None else _unused(dev),
        g_rows if g_rows is not None else _unused(dev),
        g_rows.stride(0) if g_rows is not None else 0,
        batch,
        per_sample,
        nblk,
        *factors,
        HAS_GL=g_loss is not None,
        HAS_G0=g_term0 is not None,
        HAS_G1=g_term1 is not None,
        HAS_GR=g_rows is not None,
        TWO=two,
        JOINT=joint,
        IN_PLACE=in_place,
        BLOCK=SCALE_BLOCK,
    )


fused_objective_op = triton_op(_OP, mutates_args=())(_forward)
fused_objective_backward_op = triton_op(_OP_BACKWARD, mutates_args=())(_backward_impl)


def _is_traced(t: Tensor) -> bool:
    """True for the fake / functional tensors of torch.compile and make_fx tracing."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[5], output[6], *(x for x in inputs if isinstance(x, Tensor)))
    ctx.slots = tuple(i for i, x in enumerate(inputs) if isinstance(x, Tensor))
    ctx.args = list(inputs)  # non-tensor arguments read from here; tensors from saved
    for i in ctx.slots:
        ctx.args[i] = None
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[4], output[5], output[6])
    ctx.consumed = False


def _saved_args(ctx) -> tuple[Tensor, Tensor, list]:
    saved = ctx.saved_tensors
    args = list(ctx.args)
    for i, x in zip(ctx.slots, saved[2:], strict=True):
        args[i] = x
    return saved[0], saved[1], args


def _scale_factors(v_mode: int, lambda_adr: float, regions: list[int]) -> tuple[float, ...]:
    """(a0, f0, p0, a1, f1, p1) for the stored gradients of ``regions`` (0: v0, 1: v1).

    v0: d loss/d v0 = g0 (g_loss + g_fc + B g_rows). v1 (stored with c1 = lambda_adr, or
    1 when lambda_adr = 0): g1 (g_loss + g_adr / lambda + B g_rows), or g1 g_adr when
    lambda_adr = 0. Shared (one buffer, G0 + lambda G1): g (g_loss + B g_rows).
    """
    if v_mode == V_SHARED:
        table = {0: (1.0, 0.0, 1.0)}
    elif lambda_adr != 0:
        table = {0: (1.0, 1.0, 1.0), 1: (1.0, 1.0 / lambda_adr, 1.0)}
    else:
        table = {0: (1.0, 1.0, 1.0), 1: (0.0, 1.0, 0.0)}
    first = table[regions[0]]
    second = table[regions[1]] if len(regions) > 1 else (0.0, 0.0, 0.0)
    return (*first, *second)


def _fast_backward(ctx, g0, g1, args, grads) -> tuple[Tensor | None, Tensor | None]:
    """Scale the stored gradients (recomputing them first when spent or missing)."""
    g_loss, g_fc, g_adr, g_rows = grads
    v_mode, lambda_adr = args[15], args[17]
    batch = args[2].shape[0]
    traced = _is_traced(args[2])
    need0, need1 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    missing = (need0 and g0.numel() == 0) or (need1 and g1.numel() == 0)
    if v_mode == V_JOINT and need0 and g0.numel() == 0:
        missing = True
    shared_split = v_mode == V_SHARED and (g_fc is not None or g_adr is not None)
    recompute = ctx.consumed or shared_split or missing
    if recompute:
        a = list(args)
        if shared_split:
            a[1], a[15] = a[0], V_SEPARATE
        a[29] = a[30] = True
        a[31] = False
        out = fused_objective_op(*a)
        g0, g1, v_mode = out[5], out[6], a[15]
    joint = v_mode == V_JOINT
    bufs = [(g, r) for g, r in ((g0, 0), (g1, 1)) if g.numel() > 0]
    if not bufs:
        return None, None
    regions = [0, 1] if joint else [r for _, r in bufs]
    terms = {0: g_fc, 1: g_adr}
    factors = _scale_factors(v_mode, lambda_adr, regions)
    src0 = bufs[0][0]
    src1 = bufs[1][0] if len(bufs) > 1 else None
    t0, t1 = terms[regions[0]], terms[regions[1]] if len(regions) > 1 else None
    if traced:
        dst0, out1 = fused_objective_backward_op(
            src0, src1, g_loss, t0, t1, g_rows, batch, joint, *factors
        )
        dst1 = out1 if src1 is not None else None
    elif recompute or args[33]:  # the buffers are ours: scale in place, skip factors of 1
        _scale(
            src0,
            src1,
            src0,
            src1,
            g_loss,
            t0,
            t1,
            g_rows,
            batch,
            joint,
            factors,
            in_place=True,
            traced=False,
        )
        dst0, dst1 = src0, src1
        if not recompute:
            ctx.consumed = True
    else:  # a direct caller holds them: scale into new tensors
        dst0 = torch.empty_like(src0)
        dst1 = torch.empty_like(src1) if src1 is not None else None
        _scale(
            src0,
            src1,
            dst0,
            dst1,
            g_loss,
            t0,
            t1,
            g_rows,
            batch,
            joint,
            factors,
            in_place=False,
            traced=False,
        )
    scaled = {bufs[0][1]: dst0}
    if dst1 is not None:
        scaled[bufs[1][1]] = dst1
    if shared_split:
        return scaled[0] + scaled[1], None
    return (scaled.get(0) if need0 else None), (scaled.get(1) if need1 else None)


class _TablePath:
    """A path whose coefficients come from the (B, 7) table (reference fallback only)."""

    def __init__(self, t0: Tensor, t1: Tensor, coef: Tensor) -> None:
        self.t0, self.t1, self.coef = t0, t1, coef

    def a(self, t: Tensor) -> Tensor:
        return self.coef[:, 2]

    def s(self, t: Tensor) -> Tensor:
        return self.coef[:, 3]

    def da(self, t: Tensor) -> Tensor:
        return self.coef[:, 0] if t is self.t0 else self.coef[:, 4]

    def ds(self, t: Tensor) -> Tensor:
        return self.coef[:, 1] if t is self.t0 else self.coef[:, 5]


def reference_call(args: list) -> tuple[dict, list[Tensor]]:
    """reference.objective on the op's arguments; returns (its outputs, the v inputs)."""
    (
        v0,
        v1,
        x1,
        eps,
        x_hat,
        u0,
        v_adr,
        fc_delta,
        t0,
        t1,
        coef,
        k,
        fc_active,
        fm_weight,
        adr_weight,
        v_mode,
        kind,
        lambda_adr,
        lambda_fc,
        direction,
        per_channel,
        fc_signed,
        fc_squared,
        fc_filter,
        fc_sigma,
        fc_size,
        fc_cutoff,
        norm_eps,
        norm_floor,
    ) = args[:29]
    path = {1: LinearPath(), 2: GVPPath()}.get(kind) or _TablePath(t0, t1, coef)
    if v_mode == V_JOINT:
        vs, leaves = dict(v_joint=v0, v0=None, v1=None), [v0]
    elif v_mode == V_SHARED:
        vs, leaves = dict(v0=v0, v1=v0), [v0]
    else:
        vs, leaves = dict(v0=v0, v1=v1), [v0] + ([v1] if v1 is not None else [])
    out = ref.objective(
        path,
        x1=x1,
        eps=eps,
        x_hat=x_hat,
        t0=t0,
        t1=t1,
        k=k,
        lambda_adr=lambda_adr,
        lambda_fc=lambda_fc,
        adr_loss="direction" if direction else "mse",
        fc_active=fc_active,
        fc_delta=fc_delta,
        per_channel=per_channel,
        fc_signed=fc_signed,
        fc_form="squared" if fc_squared else "weight",
        fc_filter=fc_filter,
        fc_sigma=fc_sigma,
        fc_size=fc_size,
        fc_cutoff=fc_cutoff,
        fm_weight=fm_weight,
        adr_weight=adr_weight,
        u0=u0,
        v_adr=v_adr,
        norm_eps=norm_eps,
        norm_floor=norm_floor,
        **vs,
    )
    return out, leaves


def _reference_backward(args, grads, create_graph: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients for v0, v1 from reference.objective re-run on the saved inputs."""
    with torch.enable_grad():
        out, leaves = reference_call(args)
        pairs = [
            (out[key], g)
            for key, g in zip(("loss", "fc_loss", "adr_loss", "per_sample"), grads, strict=True)
            if g is not None and out[key] is not None
        ]
        wanted = [x for x in leaves if x.requires_grad]
        got = (
            torch.autograd.grad(
                [o for o, _ in pairs],
                wanted,
                [g for _, g in pairs],
                allow_unused=True,
                create_graph=create_graph,
            )
            if pairs and wanted
            else [None] * len(wanted)
        )
    by_leaf = dict(zip(map(id, wanted), got, strict=True))
    res = [by_leaf.get(id(x)) for x in leaves]
    if args[15] == V_SEPARATE:
        return res[0], res[1] if len(res) > 1 else None
    return res[0], None


def _backward(ctx, g_loss, g_fc, g_adr, g_rows, *_unused):
    """Gradients for v0 and v1 from those of loss, fc_loss, adr_loss, per_sample."""
    grads = (g_loss, g_fc, g_adr, g_rows)
    if all(g is None for g in grads):
        return (None,) * N_OP_ARGS
    g0, g1, args = _saved_args(ctx)
    if torch.is_grad_enabled() and not _is_traced(args[2]):  # create_graph=True
        dv0, dv1 = _reference_backward(args, grads, create_graph=True)
    elif _is_traced(args[2]) or not args[32]:
        dv0, dv1 = _fast_backward(ctx, g0, g1, args, grads)
    else:  # backend="auto": a failing kernel falls back to the reference, once for all
        try:
            dv0, dv1 = _fast_backward(ctx, g0, g1, args, grads)
        except Exception as err:
            from . import is_out_of_memory, note_failure

            if is_out_of_memory(err):
                raise
            note_failure(err, stacklevel=4)
            dv0, dv1 = _reference_backward(args, grads, create_graph=False)
    return (dv0, dv1) + (None,) * (N_OP_ARGS - 2)


fused_objective_op.register_autograd(_backward, setup_context=_setup_context)


def path_kind(path: ref.PathLike) -> int:
    """1 for the linear path, 2 for GVP (coefficients computed in the kernels), else 0."""
    return {LinearPath: 1, GVPPath: 2}.get(type(path), 0)


def path_coefficients(path: ref.PathLike, t0: Tensor, t1: Tensor) -> Tensor:
    """(B, 7) fp32: [a'(t0), s'(t0), a(t1), s(t1), a'(t1), s'(t1), s'(t1)/s(t1)], the last
    0 where s(t1) = 0 (reference.adr_ratio)."""
    cols = [path.da(t0), path.ds(t0), path.a(t1), path.s(t1), path.da(t1), path.ds(t1)]
    cols.append(ref.adr_ratio(path, t1))
    cols = [
        torch.as_tensor(x, device=t0.device).to(torch.float32).expand(t0.shape[0]) for x in cols
    ]
    return torch.stack(cols, dim=1).contiguous()
