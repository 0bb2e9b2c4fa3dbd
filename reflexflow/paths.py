"""Affine probability paths x_t = a(t) * x1 + s(t) * eps, canonical convention (data at t = 1).

Each path carries a(t), s(t) and their time derivatives da(t), ds(t); all take and
return tensors of per-sample times, shape (B,). Any object with these four callables
is accepted where a path is expected (see :func:`get_path`).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "AffinePath",
    "LinearPath",
    "GVPPath",
    "VPPath",
    "PathLike",
    "get_path",
    "PATHS",
]


@runtime_checkable
class PathLike(Protocol):
    """Anything with a, s, da, ds as functions of t (canonical convention)."""

    def a(self, t: Tensor) -> Tensor: ...
    def s(self, t: Tensor) -> Tensor: ...
    def da(self, t: Tensor) -> Tensor: ...
    def ds(self, t: Tensor) -> Tensor: ...


class AffinePath:
    """Base class: x_t = a(t) x1 + s(t) eps and u_t = a'(t) x1 + s'(t) eps."""

    name = "affine"

    def a(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def s(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def da(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def ds(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearPath(AffinePath):
    """Rectified flow / CondOT: a = t, s = 1 - t, so u_t = x1 - eps."""

    name = "linear"

    def a(self, t: Tensor) -> Tensor:
        return t

    def s(self, t: Tensor) -> Tensor:
        return 1 - t

    def da(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def ds(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)


class GVPPath(AffinePath):
    """SiT's GVP: a = sin(pi t / 2), s = cos(pi t / 2).

    s and a' are evaluated as sin(pi (1 - t) / 2), so that s(1) is exactly 0 in every
    dtype (cos(pi / 2) rounds to -4.4e-8 in float32, and s'/s to 3.6e7).
    """

    name = "gvp"

    def a(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def s(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * (1 - t))

    def da(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * (1 - t))

    def ds(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class VPPath(AffinePath):
    """SiT's VP path (VPCPlan), beta from beta_min to beta_max.

    With l(t) = -0.25 (1 - t)^2 (beta_max - beta_min) - 0.5 (1 - t) beta_min:
    a = exp(l), s = sqrt(1 - exp(2 l)), a' = a l', s' = -l' exp(2 l) / s.
    s(1) = 0: keep t <= 1 - t_eps (the loss does).
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not (0 <= beta_min < beta_max):
            raise ValueError(
                f"beta_min and beta_max must satisfy 0 <= beta_min < beta_max, "
                f"got {beta_min}, {beta_max}"
            )
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def _log_mean(self, t: Tensor) -> Tensor:
        r = 1 - t
        return -0.25 * r * r * (self.beta_max - self.beta_min) - 0.5 * r * self.beta_min

    def _dlog_mean(self, t: Tensor) -> Tensor:
        return 0.5 * (1 - t) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min

    def a(self, t: Tensor) -> Tensor:
        return torch.exp(self._log_mean(t))

    def s(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2 * self._log_mean(t)))

    def da(self, t: Tensor) -> Tensor:
        return self.a(t) * self._dlog_mean(t)

    def ds(self, t: Tensor) -> Tensor:
        lm = self._log_mean(t)
        return -self._dlog_mean(t) * torch.exp(2 * lm) / torch.sqrt(-torch.expm1(2 * lm))

    def __repr__(self) -> str:
        return f"VPPath(beta_min={self.beta_min}, beta_max={self.beta_max})"


PATHS = {"linear": LinearPath, "gvp": GVPPath, "vp": VPPath}


def get_path(path: str | PathLike) -> PathLike:
    """Return a path object from a name ("linear", "gvp", "vp") or a user object.

    A user object must have callables a, s, da, ds (of a (B,) time tensor).
    """
    if isinstance(path, str):
        if path not in PATHS:
            raise ValueError(f"path must be one of {sorted(PATHS)} or a path object, got {path!r}")
        return PATHS[path]()
    missing = [n for n in ("a", "s", "da", "ds") if not callable(getattr(path, n, None))]
    if missing:
        raise TypeError(
            f"path must be a name or an object with callables a, s, da, ds; "
            f"{type(path).__name__} lacks {missing}"
        )
    return path
