"""Meta's flow_matching: its ``scheduler(t) -> alpha_t, sigma_t, d_alpha_t, d_sigma_t``
as a reflexflow path (:func:`path_from_scheduler`, :class:`FunctionPath`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from ..paths import AffinePath


class FunctionPath(AffinePath):
    """An affine path from four callables of t: a(t), s(t) and their derivatives."""

    name = "function"

    def __init__(
        self,
        a: Callable[[Tensor], Tensor],
        s: Callable[[Tensor], Tensor],
        da: Callable[[Tensor], Tensor],
        ds: Callable[[Tensor], Tensor],
    ) -> None:
        for name, fn in (("a", a), ("s", s), ("da", da), ("ds", ds)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        self._a, self._s, self._da, self._ds = a, s, da, ds

    def a(self, t: Tensor) -> Tensor:
        return self._a(t)

    def s(self, t: Tensor) -> Tensor:
        return self._s(t)

    def da(self, t: Tensor) -> Tensor:
        return self._da(t)

    def ds(self, t: Tensor) -> Tensor:
        return self._ds(t)


_SCHEDULER_FIELDS = ("alpha_t", "sigma_t", "d_alpha_t", "d_sigma_t")


def _field(out: Any, name: str) -> Tensor:
    value = out[name] if isinstance(out, Mapping) else getattr(out, name, None)
    if not isinstance(value, Tensor):
        raise TypeError(
            f"the scheduler's output must carry tensors {_SCHEDULER_FIELDS}; "
            f"{name} is {type(value).__name__}"
        )
    return value


def path_from_scheduler(scheduler: Callable[[Tensor], Any]) -> FunctionPath:
    """A reflexflow path from a flow_matching-style scheduler (``flow_matching.path.scheduler``).

    ``scheduler(t)`` returns an object (or dict) with alpha_t, sigma_t, d_alpha_t, d_sigma_t.
    flow_matching's affine path is x_t = sigma_t x_0 + alpha_t x_1 with x_0 the noise and
    x_1 the data, t in [0, 1]: reflexflow's canonical convention, so
    a = alpha_t, s = sigma_t, a' = d_alpha_t, s' = d_sigma_t (CondOTScheduler is "linear",
    CosineScheduler is "gvp", VPScheduler(0.1, 20) is "vp").
    """
    if not callable(scheduler):
        raise TypeError(f"scheduler must be callable, got {type(scheduler).__name__}")
    return FunctionPath(
        a=lambda t: _field(scheduler(t), "alpha_t"),
        s=lambda t: _field(scheduler(t), "sigma_t"),
        da=lambda t: _field(scheduler(t), "d_alpha_t"),
        ds=lambda t: _field(scheduler(t), "d_sigma_t"),
    )
