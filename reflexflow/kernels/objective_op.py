"""The op ``reflexflow::fused_objective``: the whole ReflexFlow objective in Triton.

Reference twin: :func:`reflexflow.reference.objective` (same inputs, outputs and
gradients). L = L_FC + lambda_adr * L_ADR with

    L_FC  = mean(w (v0 - u_t0)^2),  w = 1 + lambda_fc LP(|delta|) / (mean + TINY)
    L_ADR = mean (v1 - v_adr)^2  (mse)  or  mean_b ||v1/|v1| - v_adr/|v_adr| ||^2

Passes over memory (N = elements of v0, N/C the FC map; see benchmarks/README.md):

1. fc_map_kernel, only when FC or the direction loss is on: reads x1, eps, x^ (and v1
   for the direction loss, or fc_delta), writes the raw map m (N/C) and per-sample sums.
2. lowpass_axis_kernel along W, then along H (gaussian/box): map-sized traffic only.
   fft runs on the torch path (torch.fft of the map, clamped >= 0; reference._fft_lowpass).
3. objective_kernel: reads v0, v1, x1, eps, x^ and the map, writes dL/dv0 and dL/dv1.

The gradients are computed in the forward and returned as extra outputs; the autograd
formula only scales them by the incoming (scalar) gradients. Registered with
``torch.library.triton_op`` so torch.compile traces through it without a graph break.
"""

from __future__ import annotations

import math
import os

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .. import reference as ref
from .objective_kernels import fc_map_kernel, lowpass_axis_kernel, objective_kernel

__all__ = ["fused_objective", "fused_objective_op", "path_coefficients"]

_BLOCK_MAP = 512
_BLOCK_FILTER = 1024
_BLOCK_MAIN = 1024
_OP = "reflexflow::fused_objective"
POISON = False  # tests set True: buffers start as NaN so an unwritten element shows


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _layout(shape: torch.Size) -> tuple[int, int, int, int, int]:
    """(C, F, H, W, n_axes) of a (B, *S) shape, as reference._spatial_ndim reads it."""
    if len(shape) == 2:
        return 1, 1, 1, shape[1], 0
    if len(shape) == 3:
        return shape[1], 1, 1, shape[2], 1
    frames = math.prod(shape[2:-2])
    return shape[1], frames, shape[-2], shape[-1], 2


def _taps(kind: str, sigma: float, size: int, device: torch.device) -> Tensor | None:
    """The 1-D filter taps of reference.lowpass in fp32, or None when no filter runs."""
    if kind == "gaussian":
        if sigma <= 0:
            return None
        return ref._gaussian_taps(sigma, torch.float32, device)
    if kind == "box":
        return torch.full((size,), 1.0 / size, dtype=torch.float32, device=device)
    return None


def _filter(m_raw: Tensor, taps: Tensor, planes: int, h: int, w: int, n_axes: int) -> Tensor:
    """Separable filter of (planes, h * w) maps; returns the map and per-plane sums."""
    p = h * w
    nblk = triton.cdiv(p, _BLOCK_FILTER)
    grid = (nblk, planes)
    tmp = _alloc(m_raw.shape, torch.float32, m_raw.device)
    sums = _alloc((planes, nblk), torch.float32, m_raw.device)
    last = n_axes == 1 or h == 1
    wrap_triton(lowpass_axis_kernel)[grid](
        m_raw, taps, tmp, sums, p, w, 1, taps.numel(), nblk, HAS_SUM=last, BLOCK=_BLOCK_FILTER
    )
    if last:
        return tmp, sums
    out = _alloc(m_raw.shape, torch.float32, m_raw.device)
    wrap_triton(lowpass_axis_kernel)[grid](
        tmp, taps, out, sums, p, h, w, taps.numel(), nblk, HAS_SUM=True, BLOCK=_BLOCK_FILTER
    )
    return out, sums


def _forward(
    v0: Tensor,
    v1: Tensor | None,
    x1: Tensor,
    eps: Tensor,
    x_hat: Tensor,
    coef: Tensor,
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, fc_loss, adr_loss, w, dfc/dv0, dadr/dv1), losses fp32 scalars.

    Inputs contiguous, same shape (B, *S); coef (B, 8) fp32 from :func:`path_coefficients`,
    active (B,) fp32 (0 = w is 1). w is (B, Cm, *S[1:]) fp32 (empty when lambda_fc = 0);
    dadr/dv1 is empty when v1 is None. Gradients are of fc_loss and adr_loss (lambda_adr
    is applied in backward).
    """
    batch, numel = v0.shape[0], v0.numel()
    c, frames, h, w, n_axes = _layout(v0.shape)
    fp = frames * h * w
    s = c * fp
    dev = v0.device
    has_fc = lambda_fc != 0
    has_v1 = v1 is not None
    want_stats = has_v1 and direction
    cm = c if per_channel and v0.dim() > 2 else 1
    f32 = torch.float32
    dummy = torch.empty(0, dtype=f32, device=dev)

    # pass 1: raw FC map and direction sums
    nblk1 = triton.cdiv(fp, _BLOCK_MAP)
    m_raw = _alloc((batch * cm, fp), f32, dev) if has_fc else dummy
    stats = _alloc((3, batch, nblk1), f32, dev) if want_stats else dummy
    if has_fc or want_stats:
        wrap_triton(fc_map_kernel)[(nblk1, batch)](
            x1,
            eps,
            x_hat,
            fc_delta if fc_delta is not None else x1,
            v1 if has_v1 else x1,
            coef,
            m_raw,
            stats,
            c,
            fp,
            nblk1,
            HAS_FC=has_fc,
            HAS_FC_DELTA=fc_delta is not None,
            PER_CHANNEL=cm > 1,
            HAS_STATS=want_stats,
            BLOCK=_BLOCK_MAP,
        )

    # pass 2: low-pass and per-sample (per-channel) normalisation
    m, w_out, m_den = dummy, dummy, dummy
    if has_fc:
        taps = _taps(fc_filter, fc_sigma, fc_size, dev) if n_axes else None
        if n_axes and fc_filter == "fft":
            sizes = (frames, h, w) if n_axes == 2 else (w,)
            m = ref._fft_lowpass(m_raw.view(batch * cm, *sizes), fc_cutoff, n_axes)
            m = m.reshape(batch * cm, fp).contiguous()
            sums = m.sum(dim=1, keepdim=True)
        elif taps is not None:
            m, sums = _filter(m_raw, taps, batch * cm * frames, h, w, n_axes)
        else:
            m, sums = m_raw, m_raw.sum(dim=1, keepdim=True)
        m_den = (sums.view(batch * cm, -1).sum(dim=1) / fp + ref.TINY).contiguous()
        w_rows = 1 + lambda_fc * m / m_den[:, None]
        w_rows = torch.where(active.repeat_interleave(cm)[:, None] != 0, w_rows, 1.0)
        w_out = w_rows.view(batch, cm, *v0.shape[2:]) if v0.dim() > 2 else w_rows.view(batch, -1)

    # direction loss: per-sample norms and the projection coefficient
    dirs = dummy
    if want_stats:
        svv, saa, sav = stats.sum(dim=2).unbind(0)
        raw_n = svv.sqrt()
        n = raw_n.clamp_min(norm_eps)
        na = saa.sqrt().clamp_min(norm_eps)
        dot = svv / n - sav / na  # (v1/n - v_adr/n_adr) . v1
        proj = torch.where(raw_n >= norm_eps, dot / (n * n), torch.zeros_like(dot))
        dirs = torch.stack([n, na, proj], dim=1).contiguous()

    # pass 3: losses and gradients
    nblk = triton.cdiv(s, _BLOCK_MAIN)
    parts = (
        _alloc((2, batch, nblk), f32, dev)
        if has_v1
        else torch.zeros((2, batch, nblk), dtype=f32, device=dev)
    )
    g0 = _alloc(tuple(v0.shape), v0.dtype, dev)
    g1 = (
        _alloc(tuple(v1.shape), v1.dtype, dev)
        if has_v1
        else torch.empty(0, dtype=v0.dtype, device=dev)
    )
    wrap_triton(objective_kernel)[(nblk, batch)](
        v0,
        v1 if has_v1 else v0,
        x1,
        eps,
        x_hat,
        coef,
        active,
        m,
        m_den,
        dirs,
        g0,
        g1 if has_v1 else g0,
        parts,
        s,
        fp,
        cm,
        nblk,
        float(lambda_fc),
        2.0 / numel,
        2.0 / (batch if direction else numel),
        HAS_FC=has_fc,
        PER_CHANNEL=cm > 1,
        HAS_V1=has_v1,
        DIRECTION=direction,
        BLOCK=_BLOCK_MAIN,
    )
    totals = parts.sum(dim=2).sum(dim=1)
    fc_loss = totals[0] / numel
    adr_loss = totals[1] / (batch if direction else numel)
    loss = fc_loss + lambda_adr * adr_loss if has_v1 else fc_loss.clone()
    return loss, fc_loss, adr_loss, w_out, g0, g1


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[4], output[5])
    ctx.has_v1 = inputs[1] is not None
    ctx.lambda_adr = inputs[8]


def _scale(g: Tensor | None) -> Tensor:
    return torch.zeros(()) if g is None else g.contiguous()


def _backward(ctx, g_loss, g_fc, g_adr, _gw, _g0, _g1):
    """dL/dv0 = (g_loss + g_fc) dfc/dv0; dL/dv1 = (lambda_adr g_loss + g_adr) dadr/dv1."""
    d0, d1 = ctx.saved_tensors
    gl, gf = _scale(g_loss).to(d0.device), _scale(g_fc).to(d0.device)
    grad_v0 = d0 * (gl + gf).to(d0.dtype)
    grad_v1 = None
    if ctx.has_v1:
        ga = _scale(g_adr).to(d0.device)
        grad_v1 = d1 * (ctx.lambda_adr * gl + ga).to(d1.dtype)
    return (grad_v0, grad_v1) + (None,) * 15


def _fake(v0: Tensor, v1: Tensor | None, x1: Tensor, *args) -> tuple[Tensor, ...]:
    """Shapes and dtypes of the outputs, for tracing (the interpreter's custom_op)."""
    lambda_fc, per_channel = args[6], args[8]
    scalar = v0.new_empty((), dtype=torch.float32)
    cm = v0.shape[1] if per_channel and v0.dim() > 2 else 1
    w_shape = (v0.shape[0], cm, *v0.shape[2:]) if v0.dim() > 2 else tuple(v0.shape)
    w = v0.new_empty(w_shape if lambda_fc != 0 else (0,), dtype=torch.float32)
    g1 = torch.empty_like(v1) if v1 is not None else v0.new_empty((0,))
    return scalar, scalar.clone(), scalar.clone(), w, torch.empty_like(v0), g1


if os.environ.get("TRITON_INTERPRET") == "1":
    # Under Triton's CPU interpreter wrap_triton cannot trace the kernels (it hands back
    # the raw InterpretedFunction), so the op is an opaque custom_op with a fake kernel.
    fused_objective_op = torch.library.custom_op(_OP, mutates_args=())(_forward)
    fused_objective_op.register_fake(_fake)
else:
    # triton_op: torch.compile traces through the body and sees each kernel launch.
    fused_objective_op = triton_op(_OP, mutates_args=())(_forward)
fused_objective_op.register_autograd(_backward, setup_context=_setup_context)


def path_coefficients(path: ref.PathLike, t0: Tensor, t1: Tensor) -> Tensor:
    """(B, 8) fp32: [a'(t0), s'(t0), a(t1), s(t1), a'(t1), s'(t1), s'(t1)/s(t1), 0]."""
    ratio = path.ds(t1) / path.s(t1)
    cols = [path.da(t0), path.ds(t0), path.a(t1), path.s(t1), path.da(t1), path.ds(t1), ratio]
    cols = [torch.as_tensor(x, device=t0.device).to(torch.float32) for x in cols]
    cols.append(torch.zeros_like(cols[0]))
    return torch.stack(cols, dim=1).contiguous()


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
    for name, x in (("x1", x1), ("eps", eps)):
        if x.requires_grad:
            raise ValueError(
                f"{name} requires grad: the fused objective differentiates v0 and v1 only "
                "(use backend='torch')"
            )
    if v0.dim() < 2:
        raise ValueError(f"v0 must have shape (B, ...) with ndim >= 2, got {tuple(shape)}")
    active = (k > 0) if fc_active is None else fc_active
    loss, fc, adr, w, _, _ = fused_objective_op(
        v0.contiguous(),
        None if v1 is None else v1.contiguous(),
        x1.contiguous(),
        eps.contiguous(),
        x_hat.detach().contiguous(),
        path_coefficients(path, t0, t1),
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
