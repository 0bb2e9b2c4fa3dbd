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
[a'(t0), s'(t0), a(t1), s(t1), a'(t1), s'(t1), s'(t1) / s(t1), 0], or, for the linear
and GVP paths, are computed in the kernel from coef (B, 2) = (t0, t1).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _coef(coef, b, i: tl.constexpr):
    return tl.load(coef + b * 8 + i)


@triton.jit
def _path_coefs(coef, b, PATH: tl.constexpr):
    """(a'(t0), s'(t0), a(t1), s(t1), a'(t1), s'(t1), s'(t1)/s(t1)) of sample b.

    PATH 0: read from coef (B, 8) (any path, computed by torch); 1: linear and 2: GVP,
    computed here from coef (B, 2) = (t0, t1), saving the launches of the torch ops.
    """
    if PATH == 0:
        da0 = _coef(coef, b, 0)
        ds0 = _coef(coef, b, 1)
        a1 = _coef(coef, b, 2)
        s1 = _coef(coef, b, 3)
        da1 = _coef(coef, b, 4)
        ds1 = _coef(coef, b, 5)
        rat = _coef(coef, b, 6)
    else:
        t0 = tl.load(coef + b * 2)
        t1 = tl.load(coef + b * 2 + 1)
        if PATH == 1:
            da0 = t0 * 0.0 + 1.0
            ds0 = t0 * 0.0 - 1.0
            a1 = t1
            s1 = 1.0 - t1
            da1 = da0
            ds1 = ds0
            rat = -1.0 / s1
        else:
            h = 1.5707963267948966  # pi / 2
            da0 = h * tl.cos(h * t0)
            ds0 = -h * tl.sin(h * t0)
            a1 = tl.sin(h * t1)
            s1 = tl.cos(h * t1)
            da1 = h * s1
            ds1 = -h * a1
            rat = ds1 / s1
    return da0, ds0, a1, s1, da1, ds1, rat


@triton.jit
def lowpass_axis_kernel(
    src,
    taps,
    dst,
    e_sq,
    sums,
    P,
    LEN,
    STRIDE,
    NTAPS,
    NBLK,
    HAS_SUM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """FC map filter: 1-D convolution of every plane along one axis, replicate padding.

    dst[p] = sum_j taps[j] * src[p + (clamp(i + j - R, 0, LEN - 1) - i) * STRIDE], with
    i = (p // STRIDE) % LEN the index along the axis and R = (NTAPS - 1) / 2. With
    HAS_SUM, per program sums of dst and of dst * e_sq go to sums (2, planes, NBLK).
    Grid (cdiv(P, BLOCK), planes).
    """
    blk = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    planes = tl.num_programs(1).to(tl.int64)
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
        e = tl.load(e_sq + plane * P + p, mask=mask, other=0.0)
        tl.store(sums + plane * NBLK + blk, tl.sum(acc, axis=0))
        tl.store(sums + (planes + plane) * NBLK + blk, tl.sum(acc * e, axis=0))


@triton.jit
def _row_sums(ptr, rows, mask, NCOL, BN: tl.constexpr):
    """fp64 sums over NCOL columns of the rows ``rows`` of a (., NCOL) fp32 buffer."""
    acc = tl.zeros(rows.shape, dtype=tl.float64)
    for j0 in range(0, NCOL, BN):
        cols = j0 + tl.arange(0, BN)
        tile = tl.load(
            ptr + rows[:, None] * NCOL + cols[None, :],
            mask=mask[:, None] & (cols[None, :] < NCOL),
            other=0.0,
        )
        acc += tl.sum(tile.to(tl.float64), axis=1)
    return acc


@triton.jit
def finalize_kernel(
    parts,
    NBLK,
    msums,
    NS,
    active,
    q,
    ab,
    loss_out,
    fc_out,
    adr_out,
    B,
    CM,
    FP,
    inv_numel,
    lambda_fc,
    lambda_adr,
    norm_eps,
    norm_floor,
    tiny,
    HAS_FC: tl.constexpr,
    HAS_V1: tl.constexpr,
    DIRECTION: tl.constexpr,
    BB: tl.constexpr,
    BN: tl.constexpr,
):
    """Per-sample factors and the losses from the partial sums; one program, fp64.

    Map rows r = (b, c): den = sum m / (F P) + tiny, q = lambda_fc / den (0 if inactive);
    L_FC = (sum d0^2 + sum_r q sum m e) / N. Direction, per sample: n = max(|v1|, floor)
    with floor = max(norm_floor |v_adr|, eps), n_a = max(|v_adr|, eps),
    sum d^2 = |v1|^2/n^2 - 2 v_adr.v1/(n n_a) + |v_adr|^2/n_a^2,
    proj = (d . v1)/n^2 (0 when the clamp is active), ab = (1/n^2 - proj/n, -1/(n n_a));
    L_ADR = mean_b sum d^2. mse: L_ADR = sum (v1 - v_adr)^2 / N. Writes the three 0-dim
    outputs L = L_FC + lambda_adr L_ADR, L_FC, L_ADR (0 without v1).
    """
    fc = tl.zeros([BB], dtype=tl.float64)
    adr = tl.zeros([BB], dtype=tl.float64)
    for b0 in range(0, B, BB):
        rows = b0 + tl.arange(0, BB)
        mask = rows < B
        fc += _row_sums(parts, rows, mask, NBLK, BN)
        if HAS_V1:
            if DIRECTION:
                svv = _row_sums(parts + 2 * B * NBLK, rows, mask, NBLK, BN)
                saa = _row_sums(parts + 3 * B * NBLK, rows, mask, NBLK, BN)
                sav = _row_sums(parts + 4 * B * NBLK, rows, mask, NBLK, BN)
                raw = tl.sqrt(svv)
                raw_a = tl.sqrt(saa)
                floor = tl.maximum(norm_floor * raw_a, norm_eps)
                n = tl.maximum(raw, floor)
                na = tl.maximum(raw_a, norm_eps)
                dsq = svv / (n * n) - 2.0 * sav / (n * na) + saa / (na * na)
                adr += tl.where(mask, dsq, 0.0)
                proj = tl.where(raw >= floor, (svv / n - sav / na) / (n * n), 0.0)
                tl.store(ab + rows * 2, (1.0 / (n * n) - proj / n).to(tl.float32), mask=mask)
                tl.store(ab + rows * 2 + 1, (-1.0 / (n * na)).to(tl.float32), mask=mask)
            else:
                adr += _row_sums(parts + B * NBLK, rows, mask, NBLK, BN)
    if HAS_FC:
        for r0 in range(0, B * CM, BB):
            rows = r0 + tl.arange(0, BB)
            mask = rows < B * CM
            den = _row_sums(msums, rows, mask, NS, BN) / FP + tiny
            me = _row_sums(msums + B * CM * NS, rows, mask, NS, BN)
            act = tl.load(active + rows // CM, mask=mask, other=0.0)
            qq = tl.where(act != 0, lambda_fc / den, 0.0)
            tl.store(q + rows, qq.to(tl.float32), mask=mask)
            fc += tl.where(mask, qq * me, 0.0)
    fc_loss = tl.sum(fc, axis=0) * inv_numel
    tl.store(fc_out, fc_loss.to(tl.float32))
    if HAS_V1:
        if DIRECTION:
            adr_loss = tl.sum(adr, axis=0) / B
        else:
            adr_loss = tl.sum(adr, axis=0) * inv_numel
        tl.store(adr_out, adr_loss.to(tl.float32))
        tl.store(loss_out, (fc_loss + lambda_adr * adr_loss).to(tl.float32))
    else:
        tl.store(adr_out, 0.0)
        tl.store(loss_out, fc_loss.to(tl.float32))


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
    PATH: tl.constexpr,
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
    da0, ds0, a1, s1, da1, ds1, rat = _path_coefs(coef, b, PATH)
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
    g_loss,
    g_fc,
    g_adr,
    g0,
    g1,
    S,
    FP,
    CM,
    lambda_adr,
    scale_fc,
    scale_adr,
    HAS_FC: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_V1: tl.constexpr,
    DIRECTION: tl.constexpr,
    HAS_GL: tl.constexpr,
    HAS_GF: tl.constexpr,
    HAS_GA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The backward pass: dL/dv0 and dL/dv1 from what the forward stored.

    Incoming gradients of loss, fc_loss, adr_loss (0-dim, each absent unless HAS_G*).
    g0 = s0 (1 + q[row] m) d0, s0 = (g_loss + g_fc) scale_fc, q = lambda_fc / (mean m +
    TINY) on active rows, else 0. s1 = (lambda_adr g_loss + g_adr) scale_adr; mse:
    g1 = s1 r1 (r1 = v1 - v_adr); direction: g1 = s1 (ab[b, 0] v1 + ab[b, 1] r1), r1 = v_adr.
    Grid (cdiv(S, BLOCK), B) with S = C F P.
    """
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    o = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < S
    off = b * S + o
    dd = tl.load(d0 + off, mask=mask, other=0.0).to(tl.float32)
    gl = 0.0
    gf = 0.0
    ga = 0.0
    if HAS_GL:
        gl = tl.load(g_loss).to(tl.float32)
    if HAS_GF:
        gf = tl.load(g_fc).to(tl.float32)
    if HAS_GA:
        ga = tl.load(g_adr).to(tl.float32)
    s0 = (gl + gf) * scale_fc
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
        s1 = (lambda_adr * gl + ga) * scale_adr
        rr = tl.load(r1 + off, mask=mask, other=0.0).to(tl.float32)
        if DIRECTION:
            y = tl.load(v1 + off, mask=mask, other=0.0).to(tl.float32)
            grad = tl.load(ab + b * 2) * y + tl.load(ab + b * 2 + 1) * rr
        else:
            grad = rr
        tl.store(g1 + off, (s1 * grad).to(g1.dtype.element_ty), mask=mask)
