"""How the fused objective sees a batch: (B, C, F, P) and the launch plan (pure Python).

Reference layout rules (reflexflow.reference, module docstring): (B, D) vectors, no
filter; (B, C, L) filter over L; (B, C, H, W) filter over (H, W); (B, C, T, H, W) (or
more middle axes) filter over (H, W) of each frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Layout", "layout_of", "next_pow2", "sample_plan", "SamplePlan"]

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
