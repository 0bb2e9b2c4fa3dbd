"""Training-time samplers: draw u in [0, 1] per sample.

The loss scales the draw into the range that leaves room for the rollout:
t0 = u * t_max_i with t_max_i = 1 - t_eps - k_i h (canonical convention).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TimeSampler", "UniformTime", "LogitNormalTime", "get_time_sampler"]

TimeSampler = Callable[[int, torch.device, "torch.Generator | None"], Tensor]


class UniformTime:
    """u ~ U(0, 1)."""

    def __call__(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        return torch.rand(batch, device=device, generator=generator, dtype=torch.float64)

    def __repr__(self) -> str:
        return "UniformTime()"


class LogitNormalTime:
    """u = sigmoid(mean + std * z), z ~ N(0, 1) (SD3's logit-normal sampling)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if std <= 0:
            raise ValueError(f"logit_std must be > 0, got {std}")
        self.mean = float(mean)
        self.std = float(std)

    def __call__(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        z = torch.randn(batch, device=device, generator=generator, dtype=torch.float64)
        return torch.sigmoid(self.mean + self.std * z)

    def __repr__(self) -> str:
        return f"LogitNormalTime(mean={self.mean}, std={self.std})"


def get_time_sampler(
    time_sampler: str | TimeSampler, *, logit_mean: float = 0.0, logit_std: float = 1.0
) -> TimeSampler:
    """ "uniform", "logit_normal", or a callable (batch, device, generator) -> (B,) in [0, 1]."""
    if time_sampler == "uniform":
        return UniformTime()
    if time_sampler == "logit_normal":
        return LogitNormalTime(logit_mean, logit_std)
    if callable(time_sampler):
        return time_sampler
    raise ValueError(
        f"time_sampler must be 'uniform', 'logit_normal' or a callable, got {time_sampler!r}"
    )
