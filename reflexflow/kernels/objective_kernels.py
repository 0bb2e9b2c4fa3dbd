"""Triton kernels of the fused ReflexFlow objective (the op lives in objective_op.py).

Forward: objective_kernel makes the one pass over the big tensors; lowpass_axis_kernel
filters the FC map (N / C elements, or N per channel). Backward: objective_grad_kernel
scales what the forward stored by the per-sample factors and the incoming gradient.

Reference twin: :func:`reflexflow.reference.objective`. Every tensor is seen as
(B, C, F, P): B samples, C channels, F frames (1 for images, T for video), P = H * W
positions of one frame (P = L for 1-D signals, P = D with C = F = 1 for vectors).
The FC map is (B, Cm, F, P) with Cm = C per channel, else 1. All arithmetic is fp32;
offsets are int64 so that tensors past 2^31 elements address correctly.

Per-sample path coefficients come in ``coef`` (B, 8) fp32:
[a'(t0), s'(t0), a(t1), s(t1), a'(t1), s'(t1), s'(t1) / s(t1), 0].
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _coef(coef, b, i: tl.constexpr):
    return tl.load(coef + b * 8 + i)


@triton.jit
def lowpass_axis_kernel(
    src,
    taps,
    dst,
    sums,
    P,
    LEN,
    STRIDE,
    NTAPS,
    NBLK,
    HAS_SUM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 2/3: 1-D convolution of every plane along one axis, replicate padding.

    dst[p] = sum_j taps[j] * src[p + (clamp(i + j - R, 0, LEN - 1) - i) * STRIDE], with
    i = (p // STRIDE) % LEN the index along the axis and R = (NTAPS - 1) / 2. With
    HAS_SUM, per program sums of dst go to sums (planes, NBLK). Grid (cdiv(P, BLOCK),
    planes).
    """
    blk = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    p = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    i = (p // STRIDE) % LEN
    base = src + plane * P + p
    radius = (NTAPS - 1) // 2
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(NTAPS):
        tap = tl.load(taps + j)
        k = tl.minimum(tl.maximum(i + j - radius, 0), LEN - 1)
        acc += tap * tl.load(base + (k - i) * STRIDE, mask=mask, other=0.0)
    tl.store(dst + plane * P + p, acc, mask=mask)
    if HAS_SUM:
        tl.store(sums + plane * NBLK + blk, tl.sum(acc, axis=0))


@triton.jit
def objective_kernel(
    v0,
    v1,
    x1,
    eps,
    x_hat,
    fc_delta,
    coef,
    d0,
    r1,
    m_raw,
    e_sq,
    parts,
    C,
    FP,
    NBLK,
    HAS_FC: tl.constexpr,
    HAS_FC_DELTA: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_V1: tl.constexpr,
    DIRECTION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The forward pass: reads v0, v1, x1, eps, x^ once, writes d0 and r1 (+ map fields).

    d0 = v0 - u0, u0 = a'(t0) x1 + s'(t0) eps. delta = x^ - (a(t1) x1 + s(t1) eps) (or
    fc_delta), v_adr = a'(t1) x1 + s'(t1) eps + (s'/s)(t1) delta. r1 = v1 - v_adr (mse)
    or v_adr (direction). FC: m_raw = mean_c |delta| and e_sq = sum_c d0^2 (per element
    when PER_CHANNEL). Partial sums per program into parts (5, B, NBLK): sum d0^2,
    sum (v1 - v_adr)^2, v1.v1, v_adr.v_adr, v_adr.v1. Grid (cdiv(F P, BLOCK), B).
    """
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    nb = tl.num_programs(1).to(tl.int64)
    r = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = r < FP
    da0 = _coef(coef, b, 0)
    ds0 = _coef(coef, b, 1)
    a1 = _coef(coef, b, 2)
    s1 = _coef(coef, b, 3)
    da1 = _coef(coef, b, 4)
    ds1 = _coef(coef, b, 5)
    rat = _coef(coef, b, 6)
    acc_m = tl.zeros([BLOCK], dtype=tl.float32)
    acc_e = tl.zeros([BLOCK], dtype=tl.float32)
    s_adr = tl.zeros([BLOCK], dtype=tl.float32)
    svv = tl.zeros([BLOCK], dtype=tl.float32)
    saa = tl.zeros([BLOCK], dtype=tl.float32)
    sav = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(C):
        off = (b * C + c) * FP + r  # int64, as b is
        x = tl.load(x1 + off, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(eps + off, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v0 + off, mask=mask, other=0.0).to(tl.float32)
        diff = v - (da0 * x + ds0 * e)
        tl.store(d0 + off, diff.to(d0.dtype.element_ty), mask=mask)
        sq = diff * diff
        acc_e += sq
        if HAS_FC or HAS_V1:
            h = tl.load(x_hat + off, mask=mask, other=0.0).to(tl.float32)
            delta = h - (a1 * x + s1 * e)
        if HAS_FC:
            if HAS_FC_DELTA:
                md = tl.abs(tl.load(fc_delta + off, mask=mask, other=0.0).to(tl.float32))
            else:
                md = tl.abs(delta)
            if PER_CHANNEL:
                tl.store(m_raw + off, md, mask=mask)
                tl.store(e_sq + off, sq, mask=mask)
            else:
                acc_m += md
        if HAS_V1:
            y = tl.load(v1 + off, mask=mask, other=0.0).to(tl.float32)
            adr = da1 * x + ds1 * e + rat * delta
            if DIRECTION:
                tl.store(r1 + off, adr.to(r1.dtype.element_ty), mask=mask)
                svv += y * y
                saa += adr * adr
                sav += adr * y
            else:
                dd = y - adr
                tl.store(r1 + off, dd.to(r1.dtype.element_ty), mask=mask)
                s_adr += dd * dd
    if HAS_FC:
        if not PER_CHANNEL:
            tl.store(m_raw + b * FP + r, acc_m / C, mask=mask)
            tl.store(e_sq + b * FP + r, acc_e, mask=mask)
    tl.store(parts + b * NBLK + blk, tl.sum(acc_e, axis=0))
    if HAS_V1:
        if DIRECTION:
            tl.store(parts + (2 * nb + b) * NBLK + blk, tl.sum(svv, axis=0))
            tl.store(parts + (3 * nb + b) * NBLK + blk, tl.sum(saa, axis=0))
            tl.store(parts + (4 * nb + b) * NBLK + blk, tl.sum(sav, axis=0))
        else:
            tl.store(parts + (nb + b) * NBLK + blk, tl.sum(s_adr, axis=0))


@triton.jit
def objective_grad_kernel(
    d0,
    m,
    q,
    v1,
    r1,
    ab,
    scale,
    g0,
    g1,
    S,
    FP,
    CM,
    HAS_FC: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_V1: tl.constexpr,
    DIRECTION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The backward pass: dL/dv0 and dL/dv1 from what the forward stored.

    g0 = scale[0] (1 + q[row] m) d0, q = lambda_fc / (mean m + TINY) on active rows, else 0.
    mse: g1 = scale[1] r1 (r1 = v1 - v_adr); direction: g1 = scale[1] (ab[b, 0] v1 +
    ab[b, 1] r1) (r1 = v_adr). scale holds the incoming gradients times 2 / N or 2 / B.
    Grid (cdiv(S, BLOCK), B) with S = C F P.
    """
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    o = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < S
    off = b * S + o
    dd = tl.load(d0 + off, mask=mask, other=0.0).to(tl.float32)
    s0 = tl.load(scale)
    if HAS_FC:
        if PER_CHANNEL:
            row = b * CM + o // FP
        else:
            row = b + o * 0
        mm = tl.load(m + row * FP + o % FP, mask=mask, other=0.0)
        qq = tl.load(q + row, mask=mask, other=0.0)
        dd = dd * (1.0 + qq * mm)
    tl.store(g0 + off, (s0 * dd).to(g0.dtype.element_ty), mask=mask)
    if HAS_V1:
        s1 = tl.load(scale + 1)
        rr = tl.load(r1 + off, mask=mask, other=0.0).to(tl.float32)
        if DIRECTION:
            y = tl.load(v1 + off, mask=mask, other=0.0).to(tl.float32)
            grad = tl.load(ab + b * 2) * y + tl.load(ab + b * 2 + 1) * rr
        else:
            grad = rr
        tl.store(g1 + off, (s1 * grad).to(g1.dtype.element_ty), mask=mask)
