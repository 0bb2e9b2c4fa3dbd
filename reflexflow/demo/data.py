"""Data of the demo: scikit-learn's handwritten digits (real, embedded) and 2-D toys.

Digits: 1,797 grey 8x8 images with values 0..16, scaled to [-1, 1] by x / 8 - 1, split
once with a fixed seed into train / validation / held-out test parts (stratified by
label), optionally upsampled to 16x16 (bilinear). Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .deps import require

__all__ = ["DigitsSplit", "load_digits_split", "checkerboard", "eight_gaussians", "TOYS"]

SPLIT_SEED = 20251122  # the one fixed seed of the train / validation / test split


@dataclasses.dataclass
class DigitsSplit:
    """Images (N, 1, S, S) in [-1, 1] and int64 labels (N,) of each part."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    size: int

    def sizes(self) -> dict[str, int]:
        return {
            "train": int(self.train_x.shape[0]),
            "val": int(self.val_x.shape[0]),
            "test": int(self.test_x.shape[0]),
        }


def _stratified_parts(
    labels: Tensor, fractions: tuple[float, float], generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Indices of (train, val, test): per class, a shuffled split with the given fractions."""
    parts: list[list[Tensor]] = [[], [], []]
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n_test = round(fractions[1] * idx.numel())
        n_val = round(fractions[0] * idx.numel())
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test : n_test + n_val])
        parts[0].append(idx[n_test + n_val :])
    return tuple(torch.cat(p).sort().values for p in parts)  # type: ignore[return-value]


def load_digits_split(
    size: int = 8, val_fraction: float = 0.1, test_fraction: float = 0.3
) -> DigitsSplit:
    """Digits split into train / val / test with SPLIT_SEED; pixels x / 8 - 1 in [-1, 1].

    size 8 keeps the original images; 16 upsamples them bilinearly (align_corners=False).
    """
    if size not in (8, 16):
        raise ValueError(f"size must be 8 or 16, got {size!r}")
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction and test_fraction must be fractions summing below 1, got "
            f"{val_fraction} and {test_fraction}"
        )
    datasets = require("sklearn.datasets", "scikit-learn")
    digits = datasets.load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    tr, va, te = _stratified_parts(y, (val_fraction, test_fraction), gen)
    return DigitsSplit(x[tr], y[tr], x[va], y[va], x[te], y[te], size)


def checkerboard(n: int, generator: torch.Generator) -> Tensor:
    """n points uniform on the black squares of a 4x4 checkerboard on [-2, 2]^2."""
    u = torch.rand(n, 2, generator=generator) * 4 - 2
    cell = torch.floor(u[:, 0] + 2) + torch.floor(u[:, 1] + 2)
    flip = (cell % 2 == 1).to(u.dtype)  # move points on white squares one cell right
    u[:, 0] = torch.where(flip > 0, (u[:, 0] + 2 + 1) % 4 - 2, u[:, 0])
    return u


def eight_gaussians(n: int, generator: torch.Generator) -> Tensor:
    """n points from 8 gaussians (std 0.1) on a circle of radius 2."""
    idx = torch.randint(0, 8, (n,), generator=generator)
    angle = idx.to(torch.float32) * (2 * math.pi / 8)
    centers = 2.0 * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centers + 0.1 * torch.randn(n, 2, generator=generator)


TOYS = {"checkerboard": checkerboard, "8gaussians": eight_gaussians}
