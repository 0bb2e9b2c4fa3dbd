"""Triton kernels of the fused ReflexFlow objective (the op lives in objective_op.py).

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
def fc_map_kernel(
    x1,
    eps,
    x_hat,
    fc_delta,
    v1,
    coef,
    m_raw,
    stats,
    C,
    FP,
    NBLK,
    HAS_FC: tl.constexpr,
    HAS_FC_DELTA: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_STATS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 1: m_raw = mean_c |delta| (or |delta| per channel) and direction-loss sums.

    delta = x^ - (a(t1) x1 + s(t1) eps) (or fc_delta), v_adr = a'(t1) x1 + s'(t1) eps
    + (s'/s)(t1) delta; per program partial sums of v1.v1, v_adr.v_adr, v_adr.v1 go to
    stats (3, B, NBLK). Grid (cdiv(F P, BLOCK), B).
    """
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    r = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = r < FP
    base = b * C * FP
    a1 = _coef(coef, b, 2)
    s1 = _coef(coef, b, 3)
    da1 = _coef(coef, b, 4)
    ds1 = _coef(coef, b, 5)
    rat = _coef(coef, b, 6)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    svv = tl.zeros([BLOCK], dtype=tl.float32)
    saa = tl.zeros([BLOCK], dtype=tl.float32)
    sav = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(C):
        off = base + c * FP + r
        x = tl.load(x1 + off, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(eps + off, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(x_hat + off, mask=mask, other=0.0).to(tl.float32)
        delta = h - (a1 * x + s1 * e)
        if HAS_FC:
            if HAS_FC_DELTA:
                md = tl.abs(tl.load(fc_delta + off, mask=mask, other=0.0).to(tl.float32))
            else:
                md = tl.abs(delta)
            if PER_CHANNEL:
                tl.store(m_raw + off, md, mask=mask)
            else:
                acc += md
        if HAS_STATS:
            v = tl.load(v1 + off, mask=mask, other=0.0).to(tl.float32)
            adr = da1 * x + ds1 * e + rat * delta
            svv += v * v
            saa += adr * adr
            sav += adr * v
    if HAS_FC:
        if not PER_CHANNEL:
            tl.store(m_raw + b * FP + r, acc / C, mask=mask)
    if HAS_STATS:
        nb = tl.num_programs(1).to(tl.int64)
        tl.store(stats + b * NBLK + blk, tl.sum(svv, axis=0))
        tl.store(stats + (nb + b) * NBLK + blk, tl.sum(saa, axis=0))
        tl.store(stats + (2 * nb + b) * NBLK + blk, tl.sum(sav, axis=0))


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
    coef,
    active,
    m,
    m_den,
    dirs,
    g0,
    g1,
    parts,
    S,
    FP,
    CM,
    NBLK,
    lambda_fc,
    scale_fc,
    scale_adr,
    HAS_FC: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_V1: tl.constexpr,
    DIRECTION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Main pass: losses and both gradients, reading v0, v1, x1, eps, x^ once.

    u0 = a'(t0) x1 + s'(t0) eps; w = 1 + lambda_fc m / m_den (1 on inactive rows);
    g0 = scale_fc * w (v0 - u0) with scale_fc = 2 / N, partial sums of w (v0 - u0)^2.
    mse: g1 = scale_adr (v1 - v_adr), scale_adr = 2 / N; direction: with dirs (B, 3) =
    (n, n_adr, c) per sample, d = v1 / n - v_adr / n_adr, g1 = scale_adr (d - c v1) / n,
    scale_adr = 2 / B, c = (d . v1) / n^2 (0 where the norm clamp is active); partial sums
    of d^2. Partials go to parts (2, B, NBLK). Grid (cdiv(S, BLOCK), B).
    """
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    nb = tl.num_programs(1).to(tl.int64)
    o = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < S
    off = b * S + o
    x = tl.load(x1 + off, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(eps + off, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v0 + off, mask=mask, other=0.0).to(tl.float32)
    diff0 = v - (_coef(coef, b, 0) * x + _coef(coef, b, 1) * e)
    if HAS_FC:
        if PER_CHANNEL:
            row = b * CM + o // FP
        else:
            row = b + o * 0
        mm = tl.load(m + row * FP + o % FP, mask=mask, other=0.0)
        den = tl.load(m_den + row, mask=mask, other=1.0)
        act = tl.load(active + b)
        w = tl.where(act != 0, 1.0 + lambda_fc * (mm / den), 1.0)
        wd = w * diff0
    else:
        wd = diff0
    wd = tl.where(mask, wd, 0.0)
    tl.store(g0 + off, (scale_fc * wd).to(g0.dtype.element_ty), mask=mask)
    tl.store(parts + b * NBLK + blk, tl.sum(wd * diff0, axis=0))
    if HAS_V1:
        h = tl.load(x_hat + off, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(v1 + off, mask=mask, other=0.0).to(tl.float32)
        delta = h - (_coef(coef, b, 2) * x + _coef(coef, b, 3) * e)
        adr = _coef(coef, b, 4) * x + _coef(coef, b, 5) * e + _coef(coef, b, 6) * delta
        if DIRECTION:
            n = tl.load(dirs + b * 3)
            na = tl.load(dirs + b * 3 + 1)
            c = tl.load(dirs + b * 3 + 2)
            d = tl.where(mask, y / n - adr / na, 0.0)
            grad = (d - c * y) / n
            part = tl.sum(d * d, axis=0)
        else:
            d = tl.where(mask, y - adr, 0.0)
            grad = d
            part = tl.sum(d * d, axis=0)
        tl.store(g1 + off, (scale_adr * grad).to(g1.dtype.element_ty), mask=mask)
        tl.store(parts + (nb + b) * NBLK + blk, part)
