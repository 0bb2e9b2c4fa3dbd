"""Training-time samplers: draw u in [0, 1] per sample.

The loss scales the draw into the range that leaves room for the rollout:
t0 = u * t_max_i with t_max_i = 1 - t_eps - k_i h (canonical convention).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .checks import CONVENTIONS, check_number

__all__ = [
    "TimeSampler",
    "UniformTime",
    "LogitNormalTime",
    "ShiftedLogitNormalTime",
    "get_time_sampler",
]

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
        check_number("logit_mean", mean)
        check_number("logit_std", std, low=0, low_open=True)
        self.mean = float(mean)
        self.std = float(std)

    def __call__(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        z = torch.randn(batch, device=device, generator=generator, dtype=torch.float64)
        return torch.sigmoid(self.mean + self.std * z)

    def __repr__(self) -> str:
        return f"LogitNormalTime(mean={self.mean}, std={self.std})"


class ShiftedLogitNormalTime:
    """u = clamp(shift b / (1 + (shift - 1) b), low, high),  b = sigmoid(mean + std z).

    A logit-normal draw through the SD3 time shift, then clamped. With shift 0.6, low 0.05,
    high 0.95 it is takenoko's ReflexFlow re-noise time (ReflexFlowHelper.
    _sample_shifted_logit_normal, seruva19/takenoko@72c42ad; there a noise-ward sigma); with
    low 0, high 1 and SimpleTuner's flow_schedule_shift it is SimpleTuner's flow sigma
    (sample_flow_sigmas + apply_flow_schedule_shift, bghira/SimpleTuner@bc8e6ab). The value
    is in the user's convention like every time sampler's, unless ``convention`` names
    its own ("noise_at_1": the value is a sigma = 1 - t, whatever the loss's convention:
    a preset's sampler says so, since presets do not fix the convention).
    """

    def __init__(
        self,
        shift: float = 1.0,
        low: float = 0.0,
        high: float = 1.0,
        mean: float = 0.0,
        std: float = 1.0,
        convention: str | None = None,
    ) -> None:
        if convention is not None and convention not in CONVENTIONS:
            raise ValueError(
                f"convention must be None, 'data_at_1' or 'noise_at_1', got {convention!r}"
            )
        self.convention = convention
        for name, value in (("shift", shift), ("low", low), ("high", high), ("mean", mean)):
            check_number(name, value)
        check_number("std", std, low=0, low_open=True)
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if not 0 <= low < high <= 1:
            raise ValueError(f"low and high must satisfy 0 <= low < high <= 1, got {low}, {high}")
        self.shift, self.low, self.high = float(shift), float(low), float(high)
        self.mean, self.std = float(mean), float(std)

    def __call__(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        z = torch.randn(batch, device=device, generator=generator, dtype=torch.float64)
        return self.transform(z)

    def transform(self, z: Tensor) -> Tensor:
        """The deterministic part: standard normal z to the clamped shifted value."""
        b = torch.sigmoid(self.mean + self.std * z)
        shifted = self.shift * b / (1.0 + (self.shift - 1.0) * b)
        return shifted.clamp(self.low, self.high)

    def __repr__(self) -> str:
        return (
            f"ShiftedLogitNormalTime(shift={self.shift}, low={self.low}, high={self.high}, "
            f"mean={self.mean}, std={self.std}"
            + ("" if self.convention is None else f", convention={self.convention!r}")
            + ")"
        )


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
