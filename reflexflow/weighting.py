"""Per-sample loss weighting of the flow-matching term (the SD3 / Flux scripts' schemes).

A weighting maps each sample's time to a weight w_i, and the FM term becomes
mean_i w_i mean ||v_i - u_i||^2 (what diffusers' SD3 and Flux training scripts compute).
Named schemes are functions of sigma = 1 - t (canonical t; sigma is the diffusers time):

    "none"        w = 1
    "sigma_sqrt"  w = sigma^-2          (sigma clamped to >= sigma_min)
    "cosmap"      w = 2 / (pi (1 - 2 sigma + 2 sigma^2))

A callable receives the times in the loss's own convention (t for data_at_1, sigma for
noise_at_1; not multiplied by timestep_scale), float64 of shape (B,), and returns (B,)
non-negative weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .checks import check_own_convention
from .conventions import from_canonical_time

__all__ = ["WEIGHTINGS", "check_loss_weighting", "loss_weights"]

WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
SIGMA_MIN = 1e-3  # sigma_sqrt's weight is finite at sigma = 0 only through this clamp


def check_loss_weighting(weighting: Any) -> Any:
    """None, a name of :data:`WEIGHTINGS` or a callable; "none" is returned as None."""
    if weighting is None or weighting == "none":
        return None
    if isinstance(weighting, str):
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"loss_weighting must be None, one of {WEIGHTINGS} or a callable, got {weighting!r}"
            )
        return weighting
    if callable(weighting):
        check_own_convention("loss_weighting", weighting)
        if not torch.compiler.is_compiling():
            _probe(weighting)
        return weighting
    raise TypeError(
        f"loss_weighting must be None, one of {WEIGHTINGS} or a callable, got "
        f"{type(weighting).__name__}"
    )


def _named(name: str, sigma: Tensor) -> Tensor:
    if name == "sigma_sqrt":
        return sigma.clamp_min(SIGMA_MIN) ** -2.0
    bot = 1 - 2 * sigma + 2 * sigma**2
    return 2 / (math.pi * bot)


def loss_weights(
    weighting: str | Callable[[Tensor], Tensor] | None, t: Tensor, convention: str
) -> Tensor | None:
    """(B,) weights for canonical times t, or None (no weighting). Detached.

    A callable is given the times in its own ``convention`` attribute where it has one
    (e.g. :class:`~reflexflow.adapters.DiffusersLossWeighting` takes sigmas), else in the
    loss's ``convention``."""
    if weighting is None:
        return None
    if isinstance(weighting, str):
        return _named(weighting, 1 - t.to(torch.float64)).detach()
    own = getattr(weighting, "convention", None) or convention
    w = weighting(from_canonical_time(t.to(torch.float64), own))
    if not isinstance(w, Tensor) or w.shape != t.shape:
        raise ValueError(
            f"loss_weighting must return a tensor of shape {tuple(t.shape)}, got "
            f"{getattr(w, 'shape', type(w).__name__)}"
        )
    if not w.is_floating_point():
        raise TypeError(f"loss_weighting must return floating-point weights, got {w.dtype}")
    if not torch.compiler.is_compiling() and bool(((w < 0) | ~torch.isfinite(w)).any()):
        raise ValueError(  # one host sync per step, user callables only
            "loss_weighting must return finite, non-negative weights; got min "
            f"{float(w.min()):.4g}, max {float(w.max()):.4g}"
        )
    return w.detach().to(torch.float64)


def _probe(weighting: Callable[[Tensor], Tensor]) -> None:
    """TypeError unless ``weighting(t)`` can be called with a (2,) float64 tensor of times."""
    try:
        with torch.no_grad():
            weighting(torch.tensor([0.25, 0.5], dtype=torch.float64))
    except TypeError as err:
        raise TypeError(
            "loss_weighting must be callable as loss_weighting(t) with t a (B,) float64 "
            "tensor of times (its own convention, else the loss's), returning (B,) weights; "
            f"calling it with a (2,) tensor raised TypeError: {err}"
        ) from err
    except Exception:  # noqa: BLE001 - its output is checked on the real batch
        return
