"""The ops ``reflexflow::fused_objective`` (+ its backward): the ReflexFlow objective in Triton.

Reference twin: :func:`reflexflow.reference.objective` (same inputs, outputs and
gradients). L = L_FC + lambda_adr * L_ADR with

    L_FC  = mean(w (v0 - u_t0)^2),  w = 1 + lambda_fc LP(|delta|) / (mean + TINY)
    L_ADR = mean (v1 - v_adr)^2  (mse)  or  mean_b ||v1/|v1| - v_adr/|v_adr| ||^2

Passes over memory (N = elements of v0; the map has N / C elements, N per channel):

1. objective_kernel: reads v0, v1, x1, eps, x^ once (5 N), writes d0 = v0 - u0 and
   r1 = v1 - v_adr (mse) or v_adr (direction) (2 N), the raw map mean_c |delta| and
   e = sum_c d0^2 (2 N / C), and per-program partial sums.
2. lowpass_axis_kernel along W, then H (gaussian / box) on the map only (4 N / C).
   fft runs on the torch path (reference._fft_lowpass on the map: torch.fft, clamped >= 0).
3. finalize_kernel (one program): per-sample scalars (map mean, norms of the direction
   loss) and the losses from the partial sums: L_FC = (sum d0^2 + sum_rows q sum m e) / N,
   q = lambda_fc / (mean + TINY).
Backward, objective_grad_kernel: dL/dv0 = g 2/N (1 + q m) d0, dL/dv1 = g' 2/N r1 (mse)
or g' (alpha v1 + beta v_adr) (direction): reads 2 N (3 N direction), writes 2 N.

The forward cannot write the final gradients in its single pass: they need the per-sample
map mean and norms, known only after the pass. So it stores d0 and r1, the per-sample
factors fold in at backward, where the incoming gradient has to be applied anyway.
Registered with ``torch.library.triton_op`` (``custom_op`` + fake under the interpreter)
so torch.compile traces it without a graph break.
"""

from __future__ import annotations

import math
import os

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .. import reference as ref
from ..paths import GVPPath, LinearPath
from .objective_kernels import (
    finalize_kernel,
    lowpass_axis_kernel,
    objective_grad_kernel,
    objective_kernel,
)

__all__ = [
    "fused_objective",
    "fused_objective_op",
    "fused_objective_backward_op",
    "path_coefficients",
]

_BLOCK_FILTER = 1024
_OP = "reflexflow::fused_objective"
_OP_BACKWARD = "reflexflow::fused_objective_backward"
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
POISON = False  # tests set True: buffers start as NaN so an unwritten element shows


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _block(items: int, batch: int) -> tuple[int, int]:
    """(BLOCK, num_warps): the largest block leaving >= 1024 programs, 128 at least."""
    block = 1024
    while block > 128 and batch * triton.cdiv(items, block) < 1024:
        block //= 2
    return block, max(1, min(4, block // 256))


def _layout(shape: torch.Size) -> tuple[int, int, int, int, int]:
    """(C, F, H, W, n_axes) of a (B, *S) shape, as reference._spatial_ndim reads it."""
    if len(shape) == 2:
        return 1, 1, 1, shape[1], 0
    if len(shape) == 3:
        return shape[1], 1, 1, shape[2], 1
    frames = math.prod(shape[2:-2])
    return shape[1], frames, shape[-2], shape[-1], 2


def _taps(kind: str, sigma: float, size: int, device: torch.device) -> Tensor | None:
    """The 1-D filter taps of reference.lowpass in fp32 (computed on the host: one small
    copy, no launches), or None when no filter runs."""
    if kind == "gaussian":
        if sigma <= 0:
            return None
        radius = max(1, math.ceil(3.0 * sigma))
        taps = [math.exp(-0.5 * (o / sigma) ** 2) for o in range(-radius, radius + 1)]
        return torch.tensor([t / math.fsum(taps) for t in taps], dtype=torch.float32, device=device)
    if kind == "box":
        return torch.full((size,), 1.0 / size, dtype=torch.float32, device=device)
    return None


def _filter(
    m_raw: Tensor, e_sq: Tensor, taps: Tensor, planes: int, h: int, w: int, n_axes: int
) -> tuple[Tensor, Tensor]:
    """Separable filter of (planes, h * w) maps; returns the map and (2, planes, nblk)
    partial sums of m and m * e_sq."""
    p = h * w
    nblk = triton.cdiv(p, _BLOCK_FILTER)
    grid = (nblk, planes)
    tmp = _alloc(tuple(m_raw.shape), torch.float32, m_raw.device)
    sums = _alloc((2, planes, nblk), torch.float32, m_raw.device)
    last = n_axes == 1 or h == 1
    ntaps = taps.numel()
    wrap_triton(lowpass_axis_kernel)[grid](
        m_raw, taps, tmp, e_sq, sums, p, w, 1, ntaps, nblk, HAS_SUM=last, BLOCK=_BLOCK_FILTER
    )
    if last:
        return tmp, sums
    out = _alloc(tuple(m_raw.shape), torch.float32, m_raw.device)
    wrap_triton(lowpass_axis_kernel)[grid](
        tmp, taps, out, e_sq, sums, p, h, w, ntaps, nblk, HAS_SUM=True, BLOCK=_BLOCK_FILTER
    )
    return out, sums


def _forward(
    v0: Tensor,
    v1: Tensor | None,
    x1: Tensor,
    eps: Tensor,
    x_hat: Tensor,
    coef: Tensor,
    path_kind: int,
    active: Tensor,
    fc_delta: Tensor | None,
    lambda_adr: float,
    lambda_fc: float,
    direction: bool,
    per_channel: bool,
    fc_filter: str,
    fc_sigma: float,
    fc_size: int,
    fc_cutoff: float,
    norm_eps: float,
    norm_floor: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, fc_loss, adr_loss, w, d0, r1, m, q, ab); losses fp32 0-dim.

    Inputs contiguous, same shape (B, *S); coef (B, 8) fp32 from :func:`path_coefficients`
    (path_kind 0) or (B, 2) fp32 (t0, t1) for the linear (1) and GVP (2) paths; active
    (B,) fp32 (0: w = 1). w (B, Cm, *S[1:]) fp32 (empty when lambda_fc = 0).
    Kept for backward: d0 = v0 - u0, r1 (v1 - v_adr or v_adr), the filtered map m
    (B Cm, F P), q (B Cm,) and ab (B, 2), the direction loss's alpha, beta.
    """
    batch, numel = v0.shape[0], v0.numel()
    c, frames, h, w, n_axes = _layout(v0.shape)
    fp = frames * h * w
    dev = v0.device
    has_fc = lambda_fc != 0
    has_v1 = v1 is not None
    cm = c if per_channel and v0.dim() > 2 else 1
    f32 = torch.float32

    def empty() -> Tensor:
        return torch.empty(0, dtype=f32, device=dev)

    # pass 1: the one pass over the big tensors
    block, warps = _block(fp, batch)
    nblk = triton.cdiv(fp, block)
    parts = _alloc((5, batch, nblk), f32, dev)
    # stored in the dtype the reference computes them in (e.g. fp32 for bf16 v, fp32 x1)
    d0 = _alloc(tuple(v0.shape), torch.promote_types(v0.dtype, x1.dtype), dev)
    r1 = (
        _alloc(tuple(v1.shape), torch.promote_types(v1.dtype, x1.dtype), dev)
        if has_v1
        else v0.new_empty((0,))
    )
    m_raw = _alloc((batch * cm, fp), f32, dev) if has_fc else empty()
    e_sq = _alloc((batch * cm, fp), f32, dev) if has_fc else empty()
    wrap_triton(objective_kernel)[(nblk, batch)](
        v0,
        v1 if has_v1 else v0,
        x1,
        eps,
        x_hat,
        fc_delta if fc_delta is not None else x1,
        coef,
        d0,
        r1 if has_v1 else d0,
        m_raw,
        e_sq,
        parts,
        c,
        fp,
        nblk,
        PATH=path_kind,
        HAS_FC=has_fc,
        HAS_FC_DELTA=fc_delta is not None,
        PER_CHANNEL=cm > 1,
        HAS_V1=has_v1,
        DIRECTION=direction,
        BLOCK=block,
        num_warps=warps,
    )

    # pass 2: low-pass of the map with its sums (sum m, sum m e per row)
    m, msums, w_out = empty(), empty(), empty()
    q = _alloc((batch * cm,), f32, dev) if has_fc else empty()
    if has_fc:
        taps = _taps(fc_filter, fc_sigma, fc_size, dev) if n_axes else None
        if taps is not None:
            m, msums = _filter(m_raw, e_sq, taps, batch * cm * frames, h, w, n_axes)
        else:
            m = m_raw
            if n_axes and fc_filter == "fft":
                sizes = (frames, h, w) if n_axes == 2 else (w,)
                m = ref._fft_lowpass(m_raw.view(batch * cm, *sizes), fc_cutoff, n_axes)
                m = m.reshape(batch * cm, fp).contiguous()
            msums = torch.stack([m.sum(dim=1), (m * e_sq).sum(dim=1)]).contiguous()

    # pass 3: per-sample factors and the losses, one program
    ab = _alloc((batch, 2), f32, dev) if has_v1 and direction else empty()
    loss, fc_loss, adr_loss = (_alloc((), f32, dev) for _ in range(3))
    wrap_triton(finalize_kernel)[(1,)](
        parts,
        nblk,
        msums if has_fc else parts,
        msums.numel() // (2 * batch * cm) if has_fc else 1,
        active,
        q if has_fc else parts,
        ab if has_v1 and direction else parts,
        loss,
        fc_loss,
        adr_loss,
        batch,
        cm,
        fp,
        1.0 / numel,
        float(lambda_fc),
        float(lambda_adr),
        float(norm_eps),
        float(norm_floor),
        ref.TINY,
        HAS_FC=has_fc,
        HAS_V1=has_v1,
        DIRECTION=direction,
        BB=64,
        BN=64,
    )
    if has_fc:
        w_rows = m.mul(q[:, None]).add_(1)
        w_out = w_rows.view(batch, cm, *v0.shape[2:]) if v0.dim() > 2 else w_rows.view(batch, -1)
    return loss, fc_loss, adr_loss, w_out, d0, r1, m, q, ab


def _forward_fake(v0: Tensor, v1: Tensor | None, x1: Tensor, *args) -> tuple[Tensor, ...]:
    """Shapes and dtypes of the outputs, for tracing (the interpreter's custom_op)."""
    lambda_fc, direction, per_channel = args[7], args[8], args[9]
    c, frames, h, w, _ = _layout(v0.shape)
    cm = c if per_channel and v0.dim() > 2 else 1
    has_fc, b = lambda_fc != 0, v0.shape[0]
    w_shape = (b, cm, *v0.shape[2:]) if v0.dim() > 2 else tuple(v0.shape)
    f32 = dict(dtype=torch.float32)
    return (
        v0.new_empty((), **f32),
        v0.new_empty((), **f32),
        v0.new_empty((), **f32),
        v0.new_empty(w_shape if has_fc else (0,), **f32),
        torch.empty_like(v0, dtype=torch.promote_types(v0.dtype, x1.dtype)),
        torch.empty_like(v1, dtype=torch.promote_types(v1.dtype, x1.dtype))
        if v1 is not None
        else v0.new_empty((0,)),
        v0.new_empty((b * cm, frames * h * w) if has_fc else (0,), **f32),
        v0.new_empty((b * cm,) if has_fc else (0,), **f32),
        v0.new_empty((b, 2) if v1 is not None and direction else (0,), **f32),
    )


def _backward_impl(
    v0_dtype: torch.dtype,
    v1_dtype: torch.dtype,
    d0: Tensor,
    m: Tensor,
    q: Tensor,
    v1: Tensor | None,
    r1: Tensor | None,
    ab: Tensor,
    g_loss: Tensor | None,
    g_fc: Tensor | None,
    g_adr: Tensor | None,
    lambda_adr: float,
    direction: bool,
) -> tuple[Tensor, Tensor]:
    """dL/dv0 = (g_loss + g_fc) 2/N (1 + q m) d0; dL/dv1 = (lambda_adr g_loss + g_adr) 2/N
    r1 (mse) or (lambda_adr g_loss + g_adr) 2/B (ab0 v1 + ab1 r1) (direction); absent
    incoming gradients count as 0."""
    batch = d0.shape[0]
    s = d0.numel() // batch
    has_fc, has_v1 = m.numel() > 0, r1 is not None
    cm = q.numel() // batch if has_fc else 1
    fp = m.shape[1] if has_fc else s
    block, warps = _block(s, batch)
    g0 = _alloc(tuple(d0.shape), v0_dtype, d0.device)
    g1 = _alloc(tuple(r1.shape), v1_dtype, d0.device) if has_v1 else d0.new_empty((0,))
    wrap_triton(objective_grad_kernel)[(triton.cdiv(s, block), batch)](
        d0,
        m if has_fc else d0,
        q if has_fc else d0,
        v1 if v1 is not None else d0,
        r1 if has_v1 else d0,
        ab if ab.numel() else d0,
        g_loss if g_loss is not None else d0,
        g_fc if g_fc is not None else d0,
        g_adr if g_adr is not None else d0,
        g0,
        g1 if has_v1 else g0,
        s,
        fp,
        cm,
        float(lambda_adr),
        2.0 / d0.numel(),
        2.0 / (batch if direction else d0.numel()),
        HAS_FC=has_fc,
        PER_CHANNEL=cm > 1,
        HAS_V1=has_v1,
        DIRECTION=direction,
        HAS_GL=g_loss is not None,
        HAS_GF=g_fc is not None,
        HAS_GA=g_adr is not None,
        BLOCK=block,
        num_warps=warps,
    )
    return g0, g1


def _backward_fake(v0_dtype, v1_dtype, d0, m, q, v1, r1, ab, gl, gf, ga, lambda_adr, direction):
    g1 = torch.empty_like(r1, dtype=v1_dtype) if r1 is not None else d0.new_empty((0,))
    return torch.empty_like(d0, dtype=v0_dtype), g1


if _INTERPRET:
    # Under Triton's CPU interpreter wrap_triton cannot trace the kernels (it hands back
    # the raw InterpretedFunction), so the ops are opaque custom_ops with fake kernels.
    fused_objective_op = torch.library.custom_op(_OP, mutates_args=())(_forward)
    fused_objective_op.register_fake(_forward_fake)
    fused_objective_backward_op = torch.library.custom_op(_OP_BACKWARD, mutates_args=())(
        _backward_impl
    )
    fused_objective_backward_op.register_fake(_backward_fake)
else:
    # triton_op: torch.compile traces through the bodies and sees each kernel launch.
    fused_objective_op = triton_op(_OP, mutates_args=())(_forward)
    fused_objective_backward_op = triton_op(_OP_BACKWARD, mutates_args=())(_backward_impl)


def _setup_context(ctx, inputs, output) -> None:
    v1, direction = inputs[1], inputs[11]
    has_v1 = v1 is not None
    ctx.save_for_backward(*output[4:9], v1 if has_v1 and direction else None)
    ctx.set_materialize_grads(False)  # no N-sized zero gradients for d0, r1, ...
    ctx.mark_non_differentiable(*output[3:9])
    ctx.has_v1, ctx.direction, ctx.lambda_adr = has_v1, direction, inputs[9]
    ctx.dtypes = (inputs[0].dtype, v1.dtype if has_v1 else inputs[0].dtype)


def _scalar_grad(g: Tensor | None) -> Tensor | None:
    """An incoming gradient of a 0-dim loss as a contiguous fp32 0-dim tensor (any
    strides, including an expanded one), or None when that output was not used."""
    return None if g is None else g.reshape(()).to(torch.float32).contiguous()


def _backward(ctx, g_loss, g_fc, g_adr, *_unused):
    """Gradients for v0 and v1 from dL/dloss, dL/dfc_loss, dL/dadr_loss."""
    d0, r1, m, q, ab, v1 = ctx.saved_tensors
    if g_loss is None and g_fc is None and g_adr is None:
        return (None,) * 19
    g0, g1 = fused_objective_backward_op(
        *ctx.dtypes,
        d0,
        m,
        q,
        v1,
        r1 if ctx.has_v1 else None,
        ab,
        _scalar_grad(g_loss),
        _scalar_grad(g_fc),
        _scalar_grad(g_adr),
        ctx.lambda_adr,
        ctx.direction,
    )
    return (g0, g1 if ctx.has_v1 else None) + (None,) * 17


fused_objective_op.register_autograd(_backward, setup_context=_setup_context)


def path_coefficients(path: ref.PathLike, t0: Tensor, t1: Tensor) -> Tensor:
    """(B, 8) fp32: [a'(t0), s'(t0), a(t1), s(t1), a'(t1), s'(t1), s'(t1)/s(t1), 0]."""
    ratio = path.ds(t1) / path.s(t1)
    cols = [path.da(t0), path.ds(t0), path.a(t1), path.s(t1), path.da(t1), path.ds(t1), ratio]
    cols = [torch.as_tensor(x, device=t0.device).to(torch.float32) for x in cols]
    cols.append(torch.zeros_like(cols[0]))
    return torch.stack(cols, dim=1).contiguous()


def _coefficients(path: ref.PathLike, t0: Tensor, t1: Tensor) -> tuple[Tensor, int]:
    """(coef, path_kind): (t0, t1) for the paths the kernel knows, else the (B, 8) table."""
    kind = {LinearPath: 1, GVPPath: 2}.get(type(path), 0)
    if kind:
        return torch.stack([t0, t1], dim=1).to(torch.float32).contiguous(), kind
    return path_coefficients(path, t0, t1), 0


def fused_objective(
    path: ref.PathLike,
    *,
    v0: Tensor,
    v1: Tensor | None,
    x1: Tensor,
    eps: Tensor,
    x_hat: Tensor,
    t0: Tensor,
    t1: Tensor,
    k: Tensor,
    lambda_adr: float = 10.0,
    lambda_fc: float = 1.0,
    adr_loss: str = "direction",
    fc_active: Tensor | None = None,
    fc_delta: Tensor | None = None,
    per_channel: bool = False,
    fc_filter: str = "gaussian",
    fc_sigma: float = 2.0,
    fc_size: int = 5,
    fc_cutoff: float = 0.25,
    norm_eps: float = ref.NORM_EPS,
    norm_floor: float = ref.NORM_FLOOR,
) -> dict[str, Tensor | None]:
    """Triton twin of :func:`reflexflow.reference.objective`, same signature and keys.

    L = L_FC + lambda_adr * L_ADR. delta and v_adr stay in registers: the returned
    dict has them as None (the reference returns them); w is fp32. Any strides are
    accepted (non-contiguous inputs are copied once); compute is fp32.
    """
    if adr_loss not in ("direction", "mse"):
        raise ValueError(f"adr_loss must be 'direction' or 'mse', got {adr_loss!r}")
    if fc_filter not in ref.FILTERS:
        raise ValueError(f"fc_filter must be one of {ref.FILTERS}, got {fc_filter!r}")
    shape = v0.shape
    for name, x in (("v1", v1), ("x1", x1), ("eps", eps), ("x_hat", x_hat), ("fc_delta", fc_delta)):
        if x is not None and x.shape != shape:
            raise ValueError(f"{name} must have v0's shape {tuple(shape)}, got {tuple(x.shape)}")
    for name, x in (("x1", x1), ("eps", eps), ("x_hat", x_hat)):
        if x.requires_grad:
            raise ValueError(
                f"{name} requires grad: the fused objective differentiates v0 and v1 only "
                "(use backend='torch')"
            )
    if v0.dim() < 2:
        raise ValueError(f"v0 must have shape (B, ...) with ndim >= 2, got {tuple(shape)}")
    active = (k > 0) if fc_active is None else fc_active
    loss, fc, adr, w, *_ = fused_objective_op(
        v0.contiguous(),
        None if v1 is None else v1.contiguous(),
        x1.contiguous(),
        eps.contiguous(),
        x_hat.contiguous(),
        *_coefficients(path, t0, t1),
        active.to(torch.float32).contiguous(),
        None if fc_delta is None else fc_delta.detach().contiguous(),
        float(lambda_adr),
        float(lambda_fc),
        adr_loss == "direction",
        bool(per_channel),
        fc_filter,
        float(fc_sigma),
        int(fc_size),
        float(fc_cutoff),
        float(norm_eps),
        float(norm_floor),
    )
    dtype = torch.promote_types(v0.dtype, x1.dtype)
    return {
        "loss": loss.to(dtype),
        "fc_loss": fc.to(dtype),
        "adr_loss": None if v1 is None else adr.to(dtype),
        "w": w if lambda_fc != 0 else None,
        "v_adr": None,
        "delta": None,
    }
