"""Affine probability paths x_t = a(t) * x1 + s(t) * eps, canonical convention (data at t = 1).

Each path carries a(t), s(t) and their time derivatives da(t), ds(t); all take and
return tensors of per-sample times, shape (B,). ``path.coefficients(t)`` returns the four
together (:class:`PathCoefficients`, as flow_matching's schedulers return a
SchedulerOutput), computing what they share once; it is bit-identical to the four
separate calls. Any object with the four callables is accepted where a path is expected:
:func:`get_path` gives it ``coefficients`` (:class:`UserPath`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .checks import check_number

__all__ = [
    "PathCoefficients",
    "AffinePath",
    "LinearPath",
    "GVPPath",
    "VPPath",
    "UserPath",
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


@dataclasses.dataclass(frozen=True)
class PathCoefficients:
    """The path's coefficients at per-sample times t, each of t's shape (B,).

    a: the data coefficient a(t) (1 at t = 1 for the built-in paths).
    s: the noise scale s(t) (0 at t = 1).
    da: a'(t), the time derivative of a.
    ds: s'(t), the time derivative of s.
    So x_t = a x1 + s eps and u_t = da x1 + ds eps (canonical convention).
    """

    a: Tensor
    s: Tensor
    da: Tensor
    ds: Tensor

    def to(self, dtype: torch.dtype) -> PathCoefficients:
        """The four coefficients cast to ``dtype``."""
        return PathCoefficients(
            self.a.to(dtype), self.s.to(dtype), self.da.to(dtype), self.ds.to(dtype)
        )


class AffinePath:
    """Base class: x_t = a(t) x1 + s(t) eps and u_t = a'(t) x1 + s'(t) eps."""

    name = "affine"

    def coefficients(self, t: Tensor) -> PathCoefficients:
        """(a(t), s(t), a'(t), s'(t)) in one call; this default makes the four calls."""
        return PathCoefficients(self.a(t), self.s(t), self.da(t), self.ds(t))

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

    def coefficients(self, t: Tensor) -> PathCoefficients:
        """(t, 1 - t, 1, -1)."""
        one = torch.ones_like(t)
        return PathCoefficients(t, 1 - t, one, -one)


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

    def coefficients(self, t: Tensor) -> PathCoefficients:
        """(sin, cos, pi/2 cos, -pi/2 sin) of pi t / 2, each sine computed once."""
        a = torch.sin(0.5 * math.pi * t)
        s = torch.sin(0.5 * math.pi * (1 - t))
        return PathCoefficients(a, s, 0.5 * math.pi * s, -0.5 * math.pi * a)


class VPPath(AffinePath):
    """SiT's VP path (VPCPlan), beta from beta_min to beta_max.

    With l(t) = -0.25 (1 - t)^2 (beta_max - beta_min) - 0.5 (1 - t) beta_min:
    a = exp(l), s = sqrt(1 - exp(2 l)), a' = a l', s' = -l' exp(2 l) / s.

    s(1) = 0, and s' -> -inf as t -> 1 (s ~ sqrt(beta_min (1 - t))). At s = 0 (t = 1
    exactly, which a float32 t of 1 - 1e-8 rounds to) s' is taken as 0: eps has no weight
    in x_t there, so u_1 = a'(1) x1 (the marginal velocity at s = 0, as
    :func:`reflexflow.reference.adr_ratio` takes s'/s = 0 there) instead of an infinite
    target that would make the loss and every parameter after one step non-finite.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        check_number("beta_min", beta_min)
        check_number("beta_max", beta_max)
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
        return _vp_ds(lm, self._dlog_mean(t), self.s(t))

    def coefficients(self, t: Tensor) -> PathCoefficients:
        """(a, s, a', s') with l(t), l'(t) and s computed once."""
        lm, dlm = self._log_mean(t), self._dlog_mean(t)
        a = torch.exp(lm)
        s = torch.sqrt(-torch.expm1(2 * lm))
        return PathCoefficients(a, s, a * dlm, _vp_ds(lm, dlm, s))

    def __repr__(self) -> str:
        return f"VPPath(beta_min={self.beta_min}, beta_max={self.beta_max})"


def _vp_ds(lm: Tensor, dlm: Tensor, s: Tensor) -> Tensor:
    """s' = -l' exp(2 l) / s where s > 0, and 0 where s = 0 (t = 1)."""
    live = s > 0
    safe = torch.where(live, s, torch.ones_like(s))
    return torch.where(live, -dlm * torch.exp(2 * lm) / safe, torch.zeros_like(s))


class UserPath(AffinePath):
    """A user object with a, s, da, ds (and no ``coefficients``) as an AffinePath: the
    four calls are delegated, ``coefficients`` is the default (the four calls), and any
    other attribute is read from the object (``wrapped``)."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped
        self.name = getattr(wrapped, "name", type(wrapped).__name__)

    def a(self, t: Tensor) -> Tensor:
        return self.wrapped.a(t)

    def s(self, t: Tensor) -> Tensor:
        return self.wrapped.s(t)

    def da(self, t: Tensor) -> Tensor:
        return self.wrapped.da(t)

    def ds(self, t: Tensor) -> Tensor:
        return self.wrapped.ds(t)

    def __getattr__(self, name: str) -> Any:
        if name == "wrapped":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def __repr__(self) -> str:
        return repr(self.wrapped)


PATHS = {"linear": LinearPath, "gvp": GVPPath, "vp": VPPath}


def get_path(path: str | PathLike) -> PathLike:
    """Return a path object from a name ("linear", "gvp", "vp") or a user object.

    A user object must have callables a, s, da, ds (of a (B,) time tensor); one without a
    callable ``coefficients`` is returned wrapped in :class:`UserPath`, so every path
    returned here has ``coefficients(t)``.
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
    return path if callable(getattr(path, "coefficients", None)) else UserPath(path)
