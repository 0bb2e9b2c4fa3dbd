"""torchcfm's ConditionalFlowMatcher family as reflexflow paths (:func:`torchcfm_path`,
:class:`LipmanOTPath`); torchcfm is not imported."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..paths import AffinePath, GVPPath, LinearPath, PathLike


class LipmanOTPath(AffinePath):
    """Lipman et al.'s OT path (torchcfm's TargetConditionalFlowMatcher).

    a = t, s = 1 - (1 - sigma_min) t, a' = 1, s' = -(1 - sigma_min).
    """

    name = "lipman_ot"

    def __init__(self, sigma_min: float = 0.0) -> None:
        if not 0.0 <= float(sigma_min) < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = float(sigma_min)

    def a(self, t: Tensor) -> Tensor:
        return t

    def s(self, t: Tensor) -> Tensor:
        return 1 - (1 - self.sigma_min) * t

    def da(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def ds(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -(1 - self.sigma_min))

    def __repr__(self) -> str:
        return f"LipmanOTPath(sigma_min={self.sigma_min})"


def torchcfm_path(matcher: Any) -> PathLike:
    """The reflexflow path of a torchcfm matcher (by class name; torchcfm is not imported).

    torchcfm pairs a source x0 (the noise) with data x1 at t = 1, as reflexflow does:
    pass x1 as the data and x0 as ``noise=``.

    * ConditionalFlowMatcher / ExactOptimalTransportConditionalFlowMatcher, sigma = 0:
      x_t = t x1 + (1 - t) x0, u = x1 - x0: "linear";
    * VariancePreservingConditionalFlowMatcher, sigma = 0: x_t = cos(pi t/2) x0 +
      sin(pi t/2) x1: "gvp";
    * TargetConditionalFlowMatcher(sigma): x_t = t x1 + (1 - (1 - sigma) t) eps:
      :class:`LipmanOTPath` (its eps is torchcfm's fresh noise, not x0: pass that as
      ``noise=``, e.g. from ``return_noise=True``).

    ExactOptimalTransportConditionalFlowMatcher re-draws both sides: its
    ``ot_sampler.sample_plan(x0, x1)`` samples index pairs (i, j) from the OT plan, so
    it returns new x0 *and* new x1 (rows repeat or drop). Train on both, and re-index
    labels with ``sample_plan_with_labels``::

        x0, x1, _, y1 = matcher.ot_sampler.sample_plan_with_labels(x0, x1, y1=y)
        out = loss_fn(model, x1, noise=x0, model_kwargs={"y": y1})

    sigma > 0 on the others adds a second, independent noise with target x1 - x0: not an
    affine path of one noise, so it is refused (use method="ip" for input perturbation);
    SchrodingerBridgeConditionalFlowMatcher is refused for the same reason.
    """
    names = [cls.__name__ for cls in type(matcher).__mro__]
    sigma = float(getattr(matcher, "sigma", 0.0))
    if "SchrodingerBridgeConditionalFlowMatcher" in names:
        raise ValueError(
            "SchrodingerBridgeConditionalFlowMatcher has no affine-path equivalent "
            "(its noise scale sigma sqrt(t (1 - t)) adds a second noise)"
        )
    if "TargetConditionalFlowMatcher" in names:
        return LipmanOTPath(sigma)
    known = {
        "VariancePreservingConditionalFlowMatcher": GVPPath,
        "ConditionalFlowMatcher": LinearPath,
    }
    for name, path in known.items():
        if name in names:
            if sigma != 0.0:
                raise ValueError(
                    f"{type(matcher).__name__} with sigma = {sigma} adds an independent noise "
                    "sigma * eps to x_t with target x1 - x0: not an affine path of one noise; "
                    "use sigma = 0 (and method='ip' for input perturbation)"
                )
            return path()
    raise TypeError(f"matcher must be a torchcfm ConditionalFlowMatcher, got {names[0]}")
