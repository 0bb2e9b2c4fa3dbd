"""Triton kernels of the fused ReflexFlow objective (the op and its launches: objective.py).

Reference twin: :func:`reflexflow.reference.objective`. A batch of B samples is seen as
(B, C, F, P): C channels, F frames (1 for images, T for video), P = H * W positions of a
frame (P = L with H = 1 for 1-D signals, P = D with C = F = 1 for vectors); FP = F * P and
S = C * FP elements per sample. The FC map has MAP_MODE 0: one row per sample (channel
mean of |delta|), 1: one row per channel (per_channel), 2: the signed map, one row per
channel, normalised over the whole sample. All arithmetic is fp32 (sums of per-sample
terms in fp64 in the finalize kernel); offsets are int64.

Per sample i (fmw, adrw: per-sample weights, W = w or w^2, c1 = lambda_adr or 1):
    fc_i  = fmw_i mean(W (v0 - u0)^2)        G0 = fmw_i 2 / (S B) W (v0 - u0)
    mse:       adr_i = adrw_i mean((v1 - v_adr)^2)   G1 = c1 adrw_i 2 / (S B) (v1 - v_adr)
    direction: adr_i = adrw_i |v1/n - v_adr/n_a|^2  G1 = c1 adrw_i 2 / B (d - p v1) / n
G0 and G1 are the gradients of the loss (for c1 = lambda_adr) at grad_output 1; the
backward only scales them (scale_kernel).

Kernels, their launches and the shared ``@triton.jit`` helpers: kernels/README.md.
"""

from __future__ import annotations

import triton.language as tl

from ._jit import kernel, out_cast


@kernel
def path_coefs(t0, t1, coef, b, bmask, PATH: tl.constexpr):
    """(a'(t0), s'(t0), a(t1), s(t1), a'(t1), s'(t1), r) of samples b, fp32, where
    r = s'(t1) / s(t1), and 0 where s(t1) = 0 (t1 = 1 on the linear path).

    PATH 0: read from coef (B, 7) (any path, computed by torch); 1: linear and 2: GVP,
    computed here from t0, t1 (no torch op before the kernel).
    """
    if PATH == 0:
        base = coef + b * 7
        da0 = tl.load(base, mask=bmask, other=0.0).to(tl.float32)
        ds0 = tl.load(base + 1, mask=bmask, other=0.0).to(tl.float32)
        a1 = tl.load(base + 2, mask=bmask, other=0.0).to(tl.float32)
        s1 = tl.load(base + 3, mask=bmask, other=0.0).to(tl.float32)
        da1 = tl.load(base + 4, mask=bmask, other=0.0).to(tl.float32)
        ds1 = tl.load(base + 5, mask=bmask, other=0.0).to(tl.float32)
        rat = tl.load(base + 6, mask=bmask, other=0.0).to(tl.float32)
    else:
        tt1 = tl.load(t1 + b, mask=bmask, other=0.0).to(tl.float32)
        if PATH == 1:
            da0 = tt1 * 0.0 + 1.0
            ds0 = -da0
            a1 = tt1
            s1 = 1.0 - tt1
            da1 = da0
            ds1 = ds0
        else:
            hp: tl.constexpr = 1.5707963267948966  # pi / 2 (a literal: no global float)
            tt0 = tl.load(t0 + b, mask=bmask, other=0.0).to(tl.float32)
            da0 = hp * tl.cos(hp * tt0)
            ds0 = -hp * tl.sin(hp * tt0)
            # cos(pi t / 2) as sin(pi (1 - t) / 2): exactly 0 at t1 = 1 (fp32 cos(pi / 2)
            # is -4.4e-8, whose s'/s = 3.6e7 would blow any rounding of delta up)
            a1 = tl.cos(hp * (1.0 - tt1))
            s1 = tl.sin(hp * (1.0 - tt1))
            da1 = hp * s1
            ds1 = -hp * a1
        safe = tl.where(s1 != 0.0, s1, 1.0)
        rat = tl.where(s1 != 0.0, ds1 / safe, 0.0)
    return da0, ds0, a1, s1, da1, ds1, rat


@kernel
def active_rows(act, b, bmask, ACT_K: tl.constexpr):
    """FC applies to sample b: k[b] > 0 (ACT_K) or fc_active[b] != 0."""
    a = tl.load(act + b, mask=bmask, other=0)
    if ACT_K:
        return a > 0
    return a != 0


@kernel
def row_weight(ptr, b, bmask, HAS: tl.constexpr):
    """Per-sample loss weight (fm_weight, adr_weight) as fp32, 1 when absent."""
    if HAS:
        return tl.load(ptr + b, mask=bmask, other=0.0).to(tl.float32)
    return tl.where(bmask, 1.0, 0.0)


@kernel
def gauss_total(NT: tl.constexpr, SIGMA: tl.constexpr):
    """Sum of the unnormalised gaussian taps exp(-o^2 / (2 sigma^2)), |o| <= (NT-1)/2."""
    rad: tl.constexpr = (NT - 1) // 2
    tot = tl.full([], 0.0, tl.float32)
    for j in tl.static_range(NT):
        tot += tl.exp(tl.full([], -0.5 * ((j - rad) / SIGMA) * ((j - rad) / SIGMA), tl.float32))
    return tot


@kernel
def tap(j: tl.constexpr, tot, FILT: tl.constexpr, NT: tl.constexpr, SIGMA: tl.constexpr):
    """Tap j of the 1-D filter: gaussian (FILT 1, normalised by tot) or box (FILT 2)."""
    rad: tl.constexpr = (NT - 1) // 2
    if FILT == 1:
        return (
            tl.exp(tl.full([], -0.5 * ((j - rad) / SIGMA) * ((j - rad) / SIGMA), tl.float32)) / tot
        )
    return tl.full([], 1.0 / NT, tl.float32)


@kernel
def load_tile(ptr, mask, MASKED: tl.constexpr):
    """fp32 load of a tile; MASKED False when the tile exactly covers the data."""
    if MASKED:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    return tl.load(ptr).to(tl.float32)


@kernel
def store_tile(ptr, value, mask, MASKED: tl.constexpr):
    """Store a tile in ptr's dtype (masked unless the tile exactly covers the data)."""
    if MASKED:
        tl.store(ptr, out_cast(value, ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr, out_cast(value, ptr.dtype.element_ty))


@kernel
def tile_sum(x):
    """Per-sample sums of an (R, CB, SB) tile: (R,)."""
    return tl.sum(tl.sum(x, axis=2), axis=1)


@kernel
def lowpass(
    src, pos, mask, LEN, STRIDE, FILT: tl.constexpr, NT: tl.constexpr, SIGMA: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """One 1-D filter pass along one axis, replicate padding, over loads of a map in memory:
    out = sum_j tap_j src[(clamp(i + j - rad, 0, LEN - 1) - i) STRIDE] with src the
    pointers of the outputs' own elements and i = (pos // STRIDE) % LEN their index along
    the axis (loads from cache: the map is small and was just written)."""
    rad: tl.constexpr = (NT - 1) // 2
    i = (pos // STRIDE) % LEN
    tot = gauss_total(NT, SIGMA) if FILT == 1 else 1.0
    acc = tl.zeros(pos.shape, dtype=tl.float32)
    for j in tl.static_range(NT):
        k = tl.minimum(tl.maximum(i + (j - rad), 0), LEN - 1)
        acc += tap(j, tot, FILT, NT, SIGMA) * load_tile(src + (k - i) * STRIDE, mask, MASKED)
    return acc


@kernel
def lowpass_tile(
    m, scratch, pos, valid, LEN, STRIDE, FILT: tl.constexpr, NT: tl.constexpr,
    SIGMA: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """:func:`lowpass` of a register tile: m goes to the program's own scratch (pointers
    ``scratch``, cache-resident), a barrier, the taps, a second barrier frees the scratch.
    (tl.gather would keep it in registers but costs hundreds of registers per thread.)"""
    store_tile(scratch, m, valid, MASKED)
    tl.debug_barrier()
    acc = lowpass(scratch, pos, valid, LEN, STRIDE, FILT, NT, SIGMA, MASKED)
    tl.debug_barrier()
    return acc


@kernel
def state_terms(
    x1, eps, x_hat, off, mask, a1, s1, MASKED: tl.constexpr, NEED_X: tl.constexpr,
    NEED_DELTA: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """(x1, eps, delta = x^ - (a(t1) x1 + s(t1) eps)) at off, fp32; 0.0 where not needed.
    ROWS: a1, s1 are (R,) rows of an (R, CB, SB) tile, broadcast here, after the loads
    (broadcast before them, sample_kernel took 98 instead of 80 registers at sm_90)."""
    x, e, delta = 0.0, 0.0, 0.0
    if NEED_X:
        x = load_tile(x1 + off, mask, MASKED)
        e = load_tile(eps + off, mask, MASKED)
    if NEED_DELTA:
        h = load_tile(x_hat + off, mask, MASKED)
        if ROWS:
            delta = h - (a1[:, None, None] * x + s1[:, None, None] * e)
        else:
            delta = h - (a1 * x + s1 * e)
    return x, e, delta


@kernel
def target(ptr, off, mask, x, e, da, ds, MASKED: tl.constexpr, GIVEN: tl.constexpr):
    """The FM target: the given u0 at off, or u = a'(t) x1 + s'(t) eps."""
    if GIVEN:  # else-branches: the compiler type-checks every return it generates
        u = load_tile(ptr + off, mask, MASKED)
    else:
        u = da * x + ds * e
    return u


@kernel
def adr_target(va_in, off, mask, x, e, delta, da1, ds1, rat, MASKED: tl.constexpr,
               HAS_VA: tl.constexpr):  # fmt: skip
    """The ADR target: the given v_adr, or u_t1 + (s'/s)(t1) delta."""
    if HAS_VA:
        va = load_tile(va_in + off, mask, MASKED)
    else:
        va = da1 * x + ds1 * e + rat * delta
    return va


@kernel
def map_source(fcd, off, mask, delta, MASKED: tl.constexpr, HAS_FCD: tl.constexpr):
    """What drives the FC map: the given fc_delta, or delta."""
    if HAS_FCD:
        md = load_tile(fcd + off, mask, MASKED)
    else:
        md = delta
    return md


@kernel
def second_output(v1, half2, v, off, mask, MASKED: tl.constexpr, V_MODE: tl.constexpr):
    """v1 at off: v itself (V_MODE 2, shared), the joint output's second half (half2,
    V_MODE 1), or v1 (V_MODE 0). Pointers carry the int64 base, off is the tile's."""
    if V_MODE == 2:
        y = v
    elif V_MODE == 1:
        y = load_tile(half2 + off, mask, MASKED)
    else:
        y = load_tile(v1 + off, mask, MASKED)
    return y


@kernel
def direction_norms(raw, raw_a, norm_eps, norm_floor):
    """(floor, n = max(|v1|, floor), n_a = max(|v_adr|, eps)) from raw = |v1| and
    raw_a = |v_adr|; floor = max(norm_floor |v_adr|, norm_eps). (Callers take each norm
    right after its sum: two reductions in flight cost sample_kernel 90 -> 174 registers
    at sm_90 in compile_check's sit_gvp case.)"""
    flo = tl.maximum(norm_floor * raw_a, norm_eps)
    return flo, tl.maximum(raw, flo), tl.maximum(raw_a, norm_eps)


@kernel
def fc_factor(on, lambda_fc, mean_map, tiny):
    """q of w = 1 + q m: lambda_fc / (mean of the map + tiny) on active rows, else 0."""
    return tl.where(on, lambda_fc / (mean_map + tiny), 0.0)


@kernel
def fc_weight(m, q, w_out, mask, MASKED: tl.constexpr, WRITE_W: tl.constexpr,
              SQUARED: tl.constexpr):  # fmt: skip
    """w = 1 + q m, written to w_out (WRITE_W); returns W = w, or w^2 (SQUARED)."""
    wv = 1.0 + q * m
    if WRITE_W:
        store_tile(w_out, wv, mask, MASKED)
    if SQUARED:
        wv = wv * wv
    return wv


@kernel
def store_g0(g0, off, G, mask, MASKED: tl.constexpr, V_MODE: tl.constexpr,
             WRITE_G0: tl.constexpr):  # fmt: skip
    """The FM term's gradient G0 into g0 (shared v: later, with G1 added)."""
    if V_MODE != 2:
        if WRITE_G0:
            store_tile(g0 + off, G, mask, MASKED)


@kernel
def store_g1(
    g0, g1, half2, off, G, G1, mask, MASKED: tl.constexpr, V_MODE: tl.constexpr,
    HAS_V1: tl.constexpr, WRITE_G0: tl.constexpr, WRITE_G1: tl.constexpr,
):  # fmt: skip
    """The ADR gradient G1: into g1 (V_MODE 0), the joint gradient's second half (half2,
    (1), or G0 + G1 into g0 (2, shared v; G0 alone without an ADR term)."""
    if HAS_V1:
        if V_MODE == 2:
            if WRITE_G0:
                store_tile(g0 + off, G + G1, mask, MASKED)
        elif WRITE_G1:
            if V_MODE == 1:
                store_tile(half2 + off, G1, mask, MASKED)
            else:
                store_tile(g1 + off, G1, mask, MASKED)
    elif V_MODE == 2:
        if WRITE_G0:
            store_tile(g0 + off, G, mask, MASKED)


@kernel
def sample_kernel(
    v0, v1, x1, eps, x_hat, u0, va_in, fcd, t0, t1, coef, act, fmw, adrw,
    g0, g1, w_out, part, scratch,
    B, C, FP, H, W, lambda_fc, c1, norm_eps, norm_floor, tiny,
    PATH: tl.constexpr, V_MODE: tl.constexpr, HAS_V1: tl.constexpr, HAS_U0: tl.constexpr,
    HAS_VA: tl.constexpr, HAS_FCD: tl.constexpr, NEED_X: tl.constexpr,
    NEED_DELTA: tl.constexpr, HAS_FC: tl.constexpr, MAP_MODE: tl.constexpr,
    SQUARED: tl.constexpr, FILT: tl.constexpr, NT: tl.constexpr, SIGMA: tl.constexpr,
    N_AXES: tl.constexpr, ACT_K: tl.constexpr, HAS_FMW: tl.constexpr,
    HAS_ADRW: tl.constexpr, DIRECTION: tl.constexpr, WRITE_G0: tl.constexpr,
    WRITE_G1: tl.constexpr, WRITE_W: tl.constexpr, R: tl.constexpr, CB: tl.constexpr,
    SB: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The whole objective of R samples in one program. Grid (cdiv(B, R),).

    Tiles (R, CB, SB) cover (samples, channels, F P) (powers of 2; MASKED unless R = 1
    and the tile is exact). V_MODE 0: v0, v1 separate; 1: v0 is the joint (2B, ...)
    output (v1 = its second half, G1 into g0's second half); 2: v1 is v0 (one gradient
    G0 + G1 into g0). Writes G0 (g0), G1 (g1), w (w_out, (B, 1 or C, FP)) and part
    (2, B): sum W (v0 - u0)^2 and the ADR sum (sum (v1 - v_adr)^2 or |d|^2). Each input
    is read once; the tiles live in registers from load to gradient; only the map (N / C
    elements) visits a cache-resident fp32 scratch (B, 1 or C, FP) for its filter.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * R + tl.arange(0, R)
    bmask = rows < B
    S = C * FP
    base = pid * R * S  # int64 offset of the program's first sample; tiles add int32
    base2 = base + (B + tl.zeros([], tl.int64)) * S  # the joint output's second half
    c3 = tl.arange(0, CB)[None, :, None]
    s3 = tl.arange(0, SB)[None, None, :]
    loc = (tl.arange(0, R)[:, None, None] * C + c3) * FP + s3
    mask = bmask[:, None, None] & (c3 < C) & (s3 < FP)
    da0, ds0, a1, s1, da1, ds1, rat = path_coefs(t0, t1, coef, rows, bmask, PATH)
    # targets first, so that x1, eps, x_hat die early: u0, v_adr, the raw map
    x, e, delta = state_terms(
        x1 + base, eps + base, x_hat + base, loc, mask, a1, s1, MASKED, NEED_X, NEED_DELTA,
        True,
    )  # fmt: skip
    u = target(u0 + base, loc, mask, x, e, da0[:, None, None], ds0[:, None, None], MASKED, HAS_U0)
    if HAS_V1:
        va = adr_target(
            va_in + base, loc, mask, x, e, delta, da1[:, None, None], ds1[:, None, None],
            rat[:, None, None], MASKED, HAS_VA,
        )  # fmt: skip
    if HAS_FC:
        md = map_source(fcd + base, loc, mask, delta, MASKED, HAS_FCD)
        if MAP_MODE == 2:
            m = md
        elif MAP_MODE == 1:
            m = tl.abs(md)
        else:
            m = tl.sum(tl.abs(md), axis=1, keep_dims=True) / C
    v = load_tile(v0 + base + loc, mask, MASKED)
    d0 = v - u
    bf = B * 1.0
    if HAS_FC:
        if MAP_MODE == 0:
            mvalid = bmask[:, None, None] & (s3 < FP)
            wloc = tl.arange(0, R)[:, None, None] * FP + s3
            wbase = pid * R * FP
        else:
            mvalid = mask
            wloc = loc
            wbase = base
        if FILT != 0:
            pos = tl.broadcast_to(s3, m.shape)
            sc = scratch + wbase + wloc
            if N_AXES >= 1:
                m = lowpass_tile(m, sc, pos, mvalid, W, 1, FILT, NT, SIGMA, MASKED)
            if N_AXES == 2:
                m = lowpass_tile(m, sc, pos, mvalid, H, W, FILT, NT, SIGMA, MASKED)
        if MAP_MODE == 2:  # one normaliser per sample: the mean |m| over its S elements
            am = tl.sum(tl.where(mvalid, tl.abs(m), 0.0), axis=2, keep_dims=True)
            den = tl.sum(am, axis=1, keep_dims=True) / (S * 1.0)
        else:
            den = tl.sum(tl.where(mvalid, m, 0.0), axis=2, keep_dims=True) / (FP * 1.0)
        q = fc_factor(active_rows(act, rows, bmask, ACT_K)[:, None, None], lambda_fc, den, tiny)
        gg0 = fc_weight(m, q, w_out + wbase + wloc, mvalid, MASKED, WRITE_W, SQUARED) * d0
    else:
        gg0 = d0
    tl.store(part + rows, tile_sum(gg0 * d0), mask=bmask)
    G = (row_weight(fmw, rows, bmask, HAS_FMW) * (2.0 / (S * bf)))[:, None, None] * gg0
    store_g0(g0 + base, loc, G, mask, MASKED, V_MODE, WRITE_G0)
    G1 = 0.0
    if HAS_V1:
        y = second_output(v1 + base, v0 + base2, v, loc, mask, MASKED, V_MODE)
        ad = row_weight(adrw, rows, bmask, HAS_ADRW)
        if DIRECTION:
            raw = tl.sqrt(tile_sum(y * y))
            raw_a = tl.sqrt(tile_sum(va * va))
            flo, n, na = direction_norms(raw, raw_a, norm_eps, norm_floor)
            d = y / n[:, None, None] - va / na[:, None, None]
            asum = tile_sum(d * d)
            proj = tl.where(raw >= flo, tile_sum(d * y) / (n * n), 0.0)
            G1 = (c1 * ad * 2.0 / (bf * n))[:, None, None] * (d - proj[:, None, None] * y)
        else:
            r = y - va
            asum = tile_sum(r * r)
            G1 = (c1 * ad * (2.0 / (S * bf)))[:, None, None] * r
        tl.store(part + B + rows, asum, mask=bmask)
    store_g1(g0 + base, g1 + base, g0 + base2, loc, G, G1, mask, MASKED, V_MODE, HAS_V1, WRITE_G0,
             WRITE_G1)  # fmt: skip


@kernel
def stats_kernel(
    v0, v1, x1, eps, x_hat, va_in, fcd, t0, t1, coef, map_raw, part, B, C, FP, NBLK,
    PATH: tl.constexpr, V_MODE: tl.constexpr, HAS_VA: tl.constexpr, HAS_FCD: tl.constexpr,
    NEED_DELTA: tl.constexpr, HAS_FC: tl.constexpr, MAP_MODE: tl.constexpr,
    NORMS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Large samples, pass 1: the raw FC map and the direction loss's sums.

    Program (b, blk) covers positions blk * BLOCK ... of sample b for all channels. Map:
    map_raw (B, 1, FP) channel mean of |delta| (MAP_MODE 0) or (B, C, FP) |delta| / delta.
    NORMS: per program |v1|^2, |v_adr|^2, v_adr . v1 into part (3, B, NBLK).
    Grid (B * NBLK,).
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NBLK
    r = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
    mask = r < FP
    da0, ds0, a1, s1, da1, ds1, rat = path_coefs(t0, t1, coef, b, True, PATH)
    acc_m = tl.zeros([BLOCK], dtype=tl.float32)
    svv = tl.zeros([BLOCK], dtype=tl.float32)
    saa = tl.zeros([BLOCK], dtype=tl.float32)
    sav = tl.zeros([BLOCK], dtype=tl.float32)
    half = (B + tl.zeros([], tl.int64)) * C * FP  # the joint output's second half
    for c in range(C):
        off = (b * C + c) * FP + r
        x, e, delta = state_terms(x1, eps, x_hat, off, mask, a1, s1, True, NEED_DELTA,
                                  NEED_DELTA, False)  # fmt: skip
        if HAS_FC:
            md = map_source(fcd, off, mask, delta, True, HAS_FCD)
            if MAP_MODE == 0:
                acc_m += tl.abs(md)
            elif MAP_MODE == 1:
                tl.store(map_raw + off, tl.abs(md), mask=mask)
            else:
                tl.store(map_raw + off, md, mask=mask)
        if NORMS:
            v = load_tile(v0 + off, mask, True) if V_MODE == 2 else 0.0  # shared: v1 is v0
            y = second_output(v1, v0 + half, v, off, mask, True, V_MODE)
            va = adr_target(va_in, off, mask, x, e, delta, da1, ds1, rat, True, HAS_VA)
            svv += y * y
            saa += va * va
            sav += va * y
    if HAS_FC:
        if MAP_MODE == 0:
            tl.store(map_raw + b * FP + r, acc_m / C, mask=mask)
    if NORMS:
        tl.store(part + pid, tl.sum(svv, axis=0))
        tl.store(part + B * NBLK + pid, tl.sum(saa, axis=0))
        tl.store(part + 2 * B * NBLK + pid, tl.sum(sav, axis=0))


@kernel
def range_sum(ptr, first, count, BN: tl.constexpr):
    """sum(ptr[first : first + count]), BN at a time."""
    acc = tl.zeros([BN], dtype=tl.float32)
    for j0 in range(0, count, BN):
        j = j0 + tl.arange(0, BN)
        acc += tl.load(ptr + first + j, mask=j < count, other=0.0)
    return tl.sum(acc, axis=0)


@kernel
def plane_pass(
    src, dst, P, LEN, STRIDE, FILT: tl.constexpr, NT: tl.constexpr, SIGMA: tl.constexpr,
    SIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Filter one map plane of P positions along one axis (FILT 0: no filter, nothing
    written) into dst; returns its sum (of |m| when SIGNED)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(0, P, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        if FILT == 0:
            mm = tl.load(src + p, mask=p < P, other=0.0)
        else:
            mm = lowpass(src + p, p, p < P, LEN, STRIDE, FILT, NT, SIGMA, True)
            tl.store(dst + p, mm, mask=p < P)
        acc += tl.where(p < P, tl.abs(mm) if SIGNED else mm, 0.0)
    return tl.sum(acc, axis=0)


@kernel
def plane_kernel(
    src, tmp, dst, plane_sum, part, norms, NPLANES, P, H, W, B, NBLK, norm_eps, norm_floor,
    HAS_FC: tl.constexpr, FILT: tl.constexpr, NT: tl.constexpr, SIGMA: tl.constexpr,
    N_AXES: tl.constexpr, SIGNED: tl.constexpr, NORMS: tl.constexpr, BLOCK: tl.constexpr,
    BN: tl.constexpr,
):  # fmt: skip
    """Large samples, pass 2: programs [0, NPLANES) filter one map plane each (P = H W
    positions; along W into tmp, then along H into dst) and write its sum (of |m| when
    SIGNED) to plane_sum; programs NPLANES + b reduce sample b's direction sums into
    norms (B, 3): n = max(|v1|, floor), n_a = max(|v_adr|, eps), p = (d . v1) / n^2
    (0 where the floor binds). Grid (NPLANES + B if NORMS else NPLANES,).
    """
    pid = tl.program_id(0).to(tl.int64)
    if pid < NPLANES:
        if HAS_FC:
            base = pid * P
            if FILT != 0 and N_AXES == 2:
                plane_pass(src + base, tmp + base, P, W, 1, FILT, NT, SIGMA, SIGNED, BLOCK)
                tl.debug_barrier()  # the H pass reads what other threads wrote
                total = plane_pass(tmp + base, dst + base, P, H, W, FILT, NT, SIGMA, SIGNED,
                                   BLOCK)  # fmt: skip
            else:
                total = plane_pass(src + base, dst + base, P, W, 1, FILT, NT, SIGMA, SIGNED,
                                   BLOCK)  # fmt: skip
            tl.store(plane_sum + pid, total)
    else:
        if NORMS:
            b = pid - NPLANES
            vv = range_sum(part, b * NBLK, NBLK, BN)
            aa = range_sum(part, (B + b) * NBLK, NBLK, BN)
            av = range_sum(part, (2 * B + b) * NBLK, NBLK, BN)
            raw = tl.sqrt(vv)
            flo, n, na = direction_norms(raw, tl.sqrt(aa), norm_eps, norm_floor)
            proj = tl.where(raw >= flo, (vv / n - av / na) / (n * n), 0.0)
            tl.store(norms + b * 3, n)
            tl.store(norms + b * 3 + 1, na)
            tl.store(norms + b * 3 + 2, proj)


@kernel
def grad_kernel(
    v0, v1, x1, eps, x_hat, u0, va_in, t0, t1, coef, act, fmw, adrw, mapf, plane_sum,
    norms, g0, g1, w_out, part, B, C, F, FP, NBLK, lambda_fc, c1, tiny,
    PATH: tl.constexpr, V_MODE: tl.constexpr, HAS_V1: tl.constexpr, HAS_U0: tl.constexpr,
    HAS_VA: tl.constexpr, NEED_X: tl.constexpr, NEED_DELTA: tl.constexpr,
    HAS_FC: tl.constexpr, MAP_MODE: tl.constexpr, SQUARED: tl.constexpr,
    ACT_K: tl.constexpr, HAS_FMW: tl.constexpr, HAS_ADRW: tl.constexpr,
    DIRECTION: tl.constexpr, WRITE_G0: tl.constexpr, WRITE_G1: tl.constexpr,
    WRITE_W: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """Large samples, pass 3: G0, G1, w and per-program sums (as sample_kernel) from the
    filtered map, its plane sums and the direction norms. Grid (B * NBLK,); part
    (2, B, NBLK).
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NBLK
    r = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
    mask = r < FP
    S = C * FP
    bf = B * 1.0
    da0, ds0, a1, s1, da1, ds1, rat = path_coefs(t0, t1, coef, b, True, PATH)
    fm = row_weight(fmw, b, True, HAS_FMW)
    ad = row_weight(adrw, b, True, HAS_ADRW)
    if HAS_FC:
        on = active_rows(act, b, True, ACT_K)
        if MAP_MODE == 0:
            q = fc_factor(on, lambda_fc, range_sum(plane_sum, b * F, F, BN) / (FP * 1.0), tiny)
            m0 = load_tile(mapf + b * FP + r, mask, True)
            wv0 = fc_weight(m0, q, w_out + b * FP + r, mask, True, WRITE_W, SQUARED)
        elif MAP_MODE == 2:
            mean = range_sum(plane_sum, b * C * F, C * F, BN) / (S * 1.0)
            q = fc_factor(on, lambda_fc, mean, tiny)
    if HAS_V1:
        if DIRECTION:
            n = tl.load(norms + b * 3)
            na = tl.load(norms + b * 3 + 1)
            proj = tl.load(norms + b * 3 + 2)
            k1 = c1 * ad * 2.0 / (bf * n)
        else:
            k1 = c1 * ad * (2.0 / (S * bf))
    k0 = fm * (2.0 / (S * bf))
    half = (B + tl.zeros([], tl.int64)) * S  # the joint output's second half
    fsum = tl.zeros([BLOCK], dtype=tl.float32)
    asum = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(C):
        off = (b * C + c) * FP + r
        x, e, delta = state_terms(
            x1, eps, x_hat, off, mask, a1, s1, True, NEED_X, NEED_DELTA, False
        )
        u = target(u0, off, mask, x, e, da0, ds0, True, HAS_U0)
        v = load_tile(v0 + off, mask, True)
        d0 = v - u
        if HAS_FC:
            if MAP_MODE == 0:
                wv = wv0
            else:
                if MAP_MODE == 1:
                    mean = range_sum(plane_sum, (b * C + c) * F, F, BN) / (FP * 1.0)
                    qc = fc_factor(on, lambda_fc, mean, tiny)
                else:
                    qc = q
                m = load_tile(mapf + off, mask, True)
                wv = fc_weight(m, qc, w_out + off, mask, True, WRITE_W, SQUARED)
            gg0 = wv * d0
        else:
            gg0 = d0
        fsum += gg0 * d0
        G = k0 * gg0
        store_g0(g0, off, G, mask, True, V_MODE, WRITE_G0)
        G1 = 0.0
        if HAS_V1:
            y = second_output(v1, v0 + half, v, off, mask, True, V_MODE)
            va = adr_target(va_in, off, mask, x, e, delta, da1, ds1, rat, True, HAS_VA)
            dd = y / n - va / na if DIRECTION else y - va
            asum += dd * dd
            G1 = k1 * (dd - proj * y) if DIRECTION else k1 * dd
        store_g1(g0, g1, g0 + half, off, G, G1, mask, True, V_MODE, HAS_V1, WRITE_G0, WRITE_G1)
    tl.store(part + pid, tl.sum(fsum, axis=0))
    tl.store(part + B * NBLK + pid, tl.sum(asum, axis=0))


@kernel
def finalize_kernel(
    part, fmw, adrw, per_sample, loss, fc_loss, adr_loss, B, NBLK, S, lambda_adr,
    HAS_V1: tl.constexpr, HAS_FMW: tl.constexpr, HAS_ADRW: tl.constexpr,
    DIRECTION: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """per_sample and the three losses from the sums part (2, B, NBLK); one program, fp64.

    fc_i = fmw_i sum_blk part[0] / S, adr_i = adrw_i sum_blk part[1] (/ S for mse),
    per_sample_i = fc_i + lambda_adr adr_i, fc_loss = mean fc_i, adr_loss = mean adr_i,
    loss = fc_loss + lambda_adr adr_loss (adr_loss 0 without v1). Outputs in their dtype.
    """
    tot_f = tl.zeros([BB], dtype=tl.float64)
    tot_a = tl.zeros([BB], dtype=tl.float64)
    sf = S * 1.0
    for b0 in range(0, B, BB):
        rows = b0 + tl.arange(0, BB)
        bmask = rows < B
        fs = tl.zeros([BB], dtype=tl.float64)
        sa = tl.zeros([BB], dtype=tl.float64)
        for j0 in range(0, NBLK, BN):
            j = j0 + tl.arange(0, BN)
            m2 = bmask[:, None] & (j[None, :] < NBLK)
            o = rows[:, None].to(tl.int64) * NBLK + j[None, :]
            fs += tl.sum(tl.load(part + o, mask=m2, other=0.0).to(tl.float64), axis=1)
            if HAS_V1:
                sa += tl.sum(
                    tl.load(part + B * NBLK + o, mask=m2, other=0.0).to(tl.float64), axis=1
                )
        fc = fs / sf * row_weight(fmw, rows, bmask, HAS_FMW).to(tl.float64)
        ps = fc
        tot_f += tl.where(bmask, fc, 0.0)
        if HAS_V1:
            adr = sa * row_weight(adrw, rows, bmask, HAS_ADRW).to(tl.float64)
            if not DIRECTION:
                adr = adr / sf
            ps = fc + lambda_adr * adr
            tot_a += tl.where(bmask, adr, 0.0)
        store_tile(per_sample + rows, ps.to(tl.float32), bmask, True)
    fcl = tl.sum(tot_f, axis=0) / B
    tl.store(fc_loss, out_cast(fcl.to(tl.float32), fc_loss.dtype.element_ty))
    if HAS_V1:
        adl = tl.sum(tot_a, axis=0) / B
        tl.store(adr_loss, out_cast(adl.to(tl.float32), adr_loss.dtype.element_ty))
        tl.store(loss, out_cast((fcl + lambda_adr * adl).to(tl.float32), loss.dtype.element_ty))
    else:
        tl.store(adr_loss, tl.zeros([], dtype=adr_loss.dtype.element_ty))
        tl.store(loss, out_cast(fcl.to(tl.float32), loss.dtype.element_ty))


@kernel
def scale_block(src, dst, o, mask, s, IN_PLACE: tl.constexpr):
    """dst[o] = s * src[o]; in place, nothing moves when s is exactly 1."""
    if IN_PLACE:
        if s != 1.0:
            x = tl.load(src + o, mask=mask, other=0.0).to(tl.float32)
            tl.store(dst + o, out_cast(s * x, dst.dtype.element_ty), mask=mask)
    else:
        x = tl.load(src + o, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + o, out_cast(s * x, dst.dtype.element_ty), mask=mask)


@kernel
def scale_kernel(
    src0, src1, dst0, dst1, g_loss, g_term0, g_term1, g_rows, rows_stride, B, S, NBLK,
    a0, f0, p0, a1, f1, p1, HAS_GL: tl.constexpr, HAS_G0: tl.constexpr,
    HAS_G1: tl.constexpr, HAS_GR: tl.constexpr, TWO: tl.constexpr, JOINT: tl.constexpr,
    IN_PLACE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Backward: dst = s * src for the stored gradients of v0 (region 0) and v1 (region 1).

    Sample b's factor: s = a gl + f g_term + p B g_rows[b] with gl = dL/dloss, g_term =
    dL/dfc_loss (region 0) or dL/dadr_loss (region 1), g_rows = dL/dper_sample (any
    stride, e.g. 0 for an expanded gradient); absent gradients count 0. IN_PLACE (dst is
    src) skips every block whose factor is exactly 1: a plain loss.backward() moves no
    gradient bytes. JOINT: region 1 is the second half of src0 / dst0 (the joint output's
    gradient). Programs stride over the (region, sample, block) items.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    gl = tl.load(g_loss).to(tl.float32) if HAS_GL else 0.0
    gt0 = tl.load(g_term0).to(tl.float32) if HAS_G0 else 0.0
    gt1 = tl.load(g_term1).to(tl.float32) if HAS_G1 else 0.0
    bf = B * 1.0
    per_region = B * NBLK
    total = per_region * 2 if TWO else per_region
    for i in range(pid, total, nprog):
        region = i // per_region
        rest = i - region * per_region
        b = rest // NBLK
        r = (rest - b * NBLK) * BLOCK + tl.arange(0, BLOCK)
        gr = tl.load(g_rows + b.to(tl.int64) * rows_stride).to(tl.float32) if HAS_GR else 0.0
        o = b.to(tl.int64) * S + r
        if region == 0:
            scale_block(src0, dst0, o, r < S, a0 * gl + f0 * gt0 + p0 * bf * gr, IN_PLACE)
        elif JOINT:
            o1 = (b.to(tl.int64) + B) * S + r
            scale_block(src0, dst0, o1, r < S, a1 * gl + f1 * gt1 + p1 * bf * gr, IN_PLACE)
        else:
            scale_block(src1, dst1, o, r < S, a1 * gl + f1 * gt1 + p1 * bf * gr, IN_PLACE)
