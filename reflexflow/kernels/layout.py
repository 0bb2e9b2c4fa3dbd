"""How the fused objective sees a batch and launches on it (host side, no launch here
but :func:`launch`): the (B, C, F, P) view of a batch, the one-program plan, the plan of
one call (:class:`Plan`), and every kernel argument by name (:func:`kernel_values`).

Reference layout rules (reflexflow.reference, module docstring): (B, D) vectors, no
filter; (B, C, L) filter over L; (B, C, H, W) filter over (H, W); (B, C, T, H, W) (or
more middle axes) filter over (H, W) of each frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.library import wrap_triton

from .. import reference as ref
from ..paths import GVPPath, LinearPath

if TYPE_CHECKING:
    from .objective import OpArgs, OpOut

__all__ = [
    "Layout",
    "layout_of",
    "next_pow2",
    "sample_plan",
    "SamplePlan",
    "Plan",
    "plan_of",
    "kernel_values",
    "launch",
    "unused",
    "writes_g1",
    "V_SEPARATE",
    "V_JOINT",
    "V_SHARED",
    "FILTER_CODE",
    "FLOATS",
    "validate",
    "path_kind",
    "path_coefficients",
    "TablePath",
    "path_of",
]

V_SEPARATE, V_JOINT, V_SHARED = 0, 1, 2  # v0, v1 apart; v0 the joint (2B, ...); v1 is v0
FILTER_CODE = {"none": 0, "gaussian": 1, "box": 2, "fft": 3}
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# A sample runs in one program when its (channels x positions) tile, padded to powers of
# 2, has at most SMALL_TILE_MAX elements and covers the sample exactly (SiT/DiT latents
# 4x32x32 = 4096, 4x64x64 = 16384), or at most SMALL_TILE_MAX // 4 when it needs masks
# (masked tiles cost about twice the registers: ptxas at sm_90, see compile_check).
# Larger samples take the three-kernel path. Tune on the GPU (benchmarks/README.md).
SMALL_TILE_MAX = 16384
# Elements of one program's tile when several small samples share it (vectors, signals).
SAMPLES_TILE = 2048


def next_pow2(n: int) -> int:
    """Smallest power of 2 >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclass(frozen=True)
class Layout:
    """(C, F, H, W) of one sample and the number of filtered axes (0, 1 or 2)."""

    channels: int
    frames: int
    height: int
    width: int
    n_axes: int

    @property
    def plane(self) -> int:
        """P = H * W positions of one frame."""
        return self.height * self.width

    @property
    def positions(self) -> int:
        """F * P positions of one channel."""
        return self.frames * self.plane

    @property
    def sample(self) -> int:
        """S = C * F * P elements of one sample."""
        return self.channels * self.positions


def layout_of(sample_shape: tuple[int, ...]) -> Layout:
    """Layout of samples of shape ``sample_shape`` (the shape without the batch axis)."""
    if len(sample_shape) == 1:
        return Layout(1, 1, 1, int(sample_shape[0]), 0)
    if len(sample_shape) == 2:
        return Layout(int(sample_shape[0]), 1, 1, int(sample_shape[1]), 1)
    frames = math.prod(int(d) for d in sample_shape[1:-2])
    return Layout(int(sample_shape[0]), frames, int(sample_shape[-2]), int(sample_shape[-1]), 2)


@dataclass(frozen=True)
class SamplePlan:
    """sample_kernel's tile: R samples x CB channels x SB positions, num_warps."""

    rows: int
    cb: int
    sb: int
    num_warps: int


def sample_plan(lay: Layout, tile_max: int) -> SamplePlan | None:
    """The one-program-per-sample plan, or None when a sample does not fit (see
    SMALL_TILE_MAX). Warps: 16 elements per thread and tile for an exact tile, 8 for a
    masked one (at most 16 warps). R (samples per program) depends on the sample shape
    only, never on the batch size, so torch.compile(dynamic=True) keeps it symbolic.
    """
    cb, sb = next_pow2(lay.channels), max(next_pow2(lay.positions), 2)
    tile = cb * sb
    exact = cb == lay.channels and sb == lay.positions
    if tile > (tile_max if exact else tile_max // 4):
        return None
    rows = max(1, SAMPLES_TILE // tile)
    per_thread = 16 if exact and rows == 1 else 8
    warps = max(1, min(16, rows * tile // (32 * per_thread)))
    return SamplePlan(rows, cb, sb, next_pow2(warps))


# ------------------------------------------------------------------ one call's plan


@dataclass(frozen=True)
class Plan:
    """What the launches need beyond the op's arguments (host side, metadata only)."""

    lay: Layout
    batch: int
    has_v1: bool
    has_fc: bool
    map_channels: int  # rows of the FC map per sample: 1 (channel mean) or C
    filt: int  # 0 none, 1 gaussian, 2 box, 3 fft
    ntaps: int
    sigma: float
    out_dtype: torch.dtype
    w_dtype: torch.dtype


def _out_dtypes(a: OpArgs, has_fc: bool, has_v1: bool) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the losses and per_sample, dtype of w), as reference.objective promotes."""
    pt = torch.promote_types
    state = pt(a.x1.dtype, a.eps.dtype)
    out = pt(a.v0.dtype, a.u0.dtype if a.u0 is not None else state)
    w_dtype = a.fc_delta.dtype if a.fc_delta is not None else pt(a.x_hat.dtype, state)
    if has_fc:
        out = pt(out, w_dtype)
    if has_v1:
        v1 = a.v1 if a.v1 is not None else a.v0
        target = a.v_adr.dtype if a.v_adr is not None else pt(state, a.x_hat.dtype)
        out = pt(out, pt(v1.dtype, target))
    return out, w_dtype


def _filter_code(a: OpArgs, n_axes: int) -> tuple[int, int, float]:
    """(FILT, NT, SIGMA): 0 none, 1 gaussian (NT = 2 ceil(3 sigma) + 1 taps), 2 box, 3 fft."""
    code = FILTER_CODE[a.fc_filter]
    if n_axes == 0 or (code == 1 and a.fc_sigma <= 0):
        return 0, 1, 1.0
    if code == 1:
        return 1, 2 * max(1, math.ceil(3.0 * a.fc_sigma)) + 1, float(a.fc_sigma)
    if code == 2:
        return 2, int(a.fc_size), 1.0
    return code, 1, 1.0


def plan_of(a: OpArgs) -> Plan:
    """The launch plan of one call (metadata only)."""
    lay = layout_of(tuple(a.x1.shape[1:]))
    has_fc = a.fc_lambda_fc != 0
    has_v1 = a.v1 is not None or a.v_mode != V_SEPARATE
    out_dtype, w_dtype = _out_dtypes(a, has_fc, has_v1)
    per_map = a.fc_signed or a.fc_per_channel
    filt, ntaps, sigma = _filter_code(a, lay.n_axes)
    return Plan(
        lay, a.x1.shape[0], has_v1, has_fc, lay.channels if per_map else 1,
        filt, ntaps, sigma, out_dtype, w_dtype,
    )  # fmt: skip


def unused(device: torch.device) -> Tensor:
    """A distinct placeholder for a pointer argument a kernel never touches. Never alias
    a real output: traced launches (wrap_triton) may treat every pointer as written."""
    return torch.empty(1, dtype=torch.float32, device=device)


def writes_g1(a: OpArgs) -> bool:
    return a.need_g1 and a.v_mode == V_SEPARATE and a.v1 is not None


def kernel_values(a: OpArgs, p: Plan, out: OpOut) -> dict[str, Any]:
    """Every runtime value and constexpr the forward kernels take, by their parameter
    names (each launch picks its own, see :func:`launch`)."""
    dev, lay = a.x1.device, p.lay
    has_u0, has_va, has_fcd = a.u0 is not None, a.v_adr is not None, a.fc_delta is not None
    need_delta = (p.has_fc and not has_fcd) or (p.has_v1 and not has_va)
    write_w = p.has_fc and a.return_w

    def given(x: Tensor | None, placeholder: Tensor) -> Tensor:
        return x if x is not None else placeholder

    return dict(
        # inputs (absent ones: a read-only placeholder the kernel never reads)
        v0=a.v0,
        v1=given(a.v1, a.x1),
        x1=a.x1,
        eps=a.eps,
        x_hat=a.x_hat,
        u0=given(a.u0, a.x1),
        va_in=given(a.v_adr, a.x1),
        fcd=given(a.fc_delta, a.x1),
        t0=a.t0,
        t1=a.t1,
        coef=given(a.coef, a.t1),
        act=given(a.fc_active, a.k),
        fmw=given(a.fm_weight, a.t1),
        adrw=given(a.adr_weight, a.t1),
        # outputs
        g0=out.g0 if a.need_g0 else unused(dev),
        g1=out.g1 if writes_g1(a) else unused(dev),
        w_out=out.w if write_w else unused(dev),
        per_sample=out.per_sample,
        loss=out.loss,
        fc_loss=out.fc_loss,
        adr_loss=out.adr_loss,
        # sizes and scalars
        B=p.batch,
        C=lay.channels,
        F=lay.frames,
        FP=lay.positions,
        P=lay.plane,
        H=lay.height,
        W=lay.width,
        S=lay.sample,
        lambda_adr=float(a.lambda_adr),
        lambda_fc=float(a.fc_lambda_fc),
        c1=float(a.lambda_adr) if a.v_mode == V_SHARED or a.lambda_adr != 0 else 1.0,
        norm_eps=float(a.norm_eps),
        norm_floor=float(a.norm_floor),
        tiny=ref.TINY,
        # constexprs
        PATH=a.path_kind,
        V_MODE=a.v_mode,
        HAS_V1=p.has_v1,
        HAS_U0=has_u0,
        HAS_VA=has_va,
        HAS_FCD=has_fcd,
        NEED_X=need_delta or not has_u0,
        NEED_DELTA=need_delta,
        HAS_FC=p.has_fc,
        MAP_MODE=2 if a.fc_signed else (1 if a.fc_per_channel else 0),
        SIGNED=a.fc_signed,
        SQUARED=a.fc_form == "squared",
        FILT=p.filt,
        NT=p.ntaps,
        SIGMA=p.sigma,
        N_AXES=lay.n_axes,
        ACT_K=a.fc_active is None,
        HAS_FMW=a.fm_weight is not None,
        HAS_ADRW=a.adr_weight is not None,
        DIRECTION=a.adr_loss == "direction",
        WRITE_G0=a.need_g0,
        WRITE_G1=writes_g1(a) or (a.v_mode == V_JOINT and a.need_g0),
        WRITE_W=write_w,
    )


def launch(kernel, grid: tuple[int, ...], values: dict[str, Any], **options: Any) -> None:
    """Launch ``kernel`` with its parameters taken by name from values (runtime ones by
    position, constexprs by keyword) and ``options`` (num_warps, traced=False for an
    eager launch outside the op)."""
    runtime = [values[p.name] for p in kernel.params if not p.is_constexpr]
    constexprs = {p.name: values[p.name] for p in kernel.params if p.is_constexpr}
    launcher = wrap_triton(kernel) if options.pop("traced", True) else kernel
    launcher[grid](*runtime, **constexprs, **options)


# ------------------------------------------------------------- checks and paths


def _check_input(name: str, x: Tensor | None, device: torch.device, shape, floats=True) -> None:
    """Host-side checks of one op input (metadata only: no launch, no sync)."""
    if x is None:
        return
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (the device of x1)")
    if floats and x.dtype not in FLOATS:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous: the op reads raw memory (call "
            "reflexflow.kernels.fused_objective, which copies strided inputs once)"
        )


def validate(a: OpArgs, tensor_fields: tuple[str, ...]) -> None:
    """The op's inputs (tensor_fields of a): on x1's device, of their shapes, contiguous
    (ValueError / TypeError naming the input)."""
    x1 = a.x1
    if x1.dim() < 2 or x1.shape[0] == 0:
        raise ValueError(f"x1 must have shape (B, ...) with B >= 1, got {tuple(x1.shape)}")
    if a.v_mode not in (V_SEPARATE, V_JOINT, V_SHARED):
        raise ValueError(f"v_mode must be 0, 1 or 2, got {a.v_mode}")
    if a.fc_filter not in FILTER_CODE:
        raise ValueError(f"fc_filter must be one of {tuple(FILTER_CODE)}, got {a.fc_filter!r}")
    if a.v_mode != V_SEPARATE and a.v1 is not None:
        raise ValueError("v1 must be None when v0 is the joint output or shared (v_mode 1, 2)")
    if a.path_kind == 0 and a.coef is None:
        raise ValueError("path_kind 0 needs the coefficient table coef")
    batch, shape = x1.shape[0], tuple(x1.shape)
    sample_shapes = dict(v0=(2 * batch, *shape[1:]) if a.v_mode == V_JOINT else shape)
    rows = ("t0", "t1", "fm_weight", "adr_weight", "k", "fc_active")
    for name in tensor_fields:
        want = (batch,) if name in rows else (batch, 7) if name == "coef" else shape
        want = sample_shapes.get(name, want)
        _check_input(name, getattr(a, name), x1.device, want, floats=name not in ("k", "fc_active"))


def path_kind(path: Any) -> int:
    """1 for the linear path, 2 for GVP (coefficients computed in the kernels), else 0."""
    return {LinearPath: 1, GVPPath: 2}.get(type(path), 0)


def path_coefficients(path: Any, t0: Tensor, t1: Tensor) -> Tensor:
    """(B, 7) fp32: [a'(t0), s'(t0), a(t1), s(t1), a'(t1), s'(t1), s'(t1)/s(t1)], the last
    0 where s(t1) = 0 (reference.adr_ratio)."""
    cols = [path.da(t0), path.ds(t0), path.a(t1), path.s(t1), path.da(t1), path.ds(t1)]
    cols.append(ref.adr_ratio(path, t1))
    cols = [
        torch.as_tensor(x, device=t0.device).to(torch.float32).expand(t0.shape[0]) for x in cols
    ]
    return torch.stack(cols, dim=1).contiguous()


class TablePath:
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


def path_of(kind: int, t0: Tensor, t1: Tensor, coef: Tensor | None) -> Any:
    """The path of the op's path_kind (and coefficient table), for the reference."""
    return {1: LinearPath(), 2: GVPPath()}.get(kind) or TablePath(t0, t1, coef)
