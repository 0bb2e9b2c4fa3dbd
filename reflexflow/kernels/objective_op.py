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

Autograd (registered at the end of this module): objective_autograd.py.
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


# autograd last: objective_autograd uses the ops and helpers above
from .objective_autograd import backward as _backward  # noqa: E402
from .objective_autograd import setup_context as _setup_context  # noqa: E402

fused_objective_op.register_autograd(_backward, setup_context=_setup_context)
