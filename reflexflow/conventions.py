"""The two time conventions and the boundary where the user's model is made canonical.

============  ======================  ==========================  ==================
convention    data / noise            path (linear)               model predicts
============  ======================  ==========================  ==================
data_at_1     data t = 1, noise t = 0  x_t = t x1 + (1 - t) eps    u = x1 - eps
noise_at_1    data s = 0, noise s = 1  x = (1 - s) x0 + s eps      eps - x0
============  ======================  ==========================  ==================

noise_at_1 (diffusers, SD3, Flux) maps onto the canonical one by t = 1 - sigma and
v = -v_model. The conversion happens once, here; inside, everything is canonical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .batching import unwrap_kwargs
from .model_state import rollout_mode

__all__ = [
    "CONVENTIONS",
    "check_convention",
    "to_canonical_time",
    "from_canonical_time",
    "VelocityModel",
]

CONVENTIONS = ("data_at_1", "noise_at_1")


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    return convention


def to_canonical_time(t: Tensor, convention: str) -> Tensor:
    """t (data_at_1) or 1 - sigma (noise_at_1)."""
    return t if convention == "data_at_1" else 1 - t


def from_canonical_time(t: Tensor, convention: str) -> Tensor:
    """Inverse of :func:`to_canonical_time` (the map is an involution)."""
    return to_canonical_time(t, convention)


class VelocityModel:
    """Wraps ``model(x, t, **kwargs)`` in the user's convention as a canonical velocity.

    __call__(x, t, kwargs) takes the state x (float32/64) and canonical times t (B,);
    the model sees x cast to ``input_dtype``, and times in its own convention times
    ``timestep_scale`` (e.g. 1000 for SD3-style timesteps); its output must have x's
    shape and is returned in the state's dtype, negated under noise_at_1.
    ``mode="eval"`` runs each call with the model in eval mode (its submodules' own flags
    restored after the call): how the loss's no-grad rollout calls the model.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        convention: str = "data_at_1",
        *,
        input_dtype: torch.dtype | None = None,
        timestep_scale: float = 1.0,
        mode: str = "train",
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.model = model
        self.convention = check_convention(convention)
        self.input_dtype = input_dtype
        self.timestep_scale = float(timestep_scale)
        self.mode = mode
        self.calls = 0  # model invocations
        self.sample_forwards = 0  # samples passed through the model, summed over calls

    def with_mode(self, mode: str) -> VelocityModel:
        """This velocity, calling the model in ``mode`` ("eval" or "train", as it is)."""
        return VelocityModel(
            self.model,
            self.convention,
            input_dtype=self.input_dtype,
            timestep_scale=self.timestep_scale,
            mode=mode,
        )

    def model_time(self, t: Tensor) -> Tensor:
        tm = from_canonical_time(t, self.convention)
        return tm * self.timestep_scale if self.timestep_scale != 1.0 else tm

    def __call__(
        self, x: Tensor, t: Tensor, kwargs: Any = None, *, model_input: Tensor | None = None
    ) -> Tensor:
        """v(x, t); ``model_input``: x already cast to input_dtype (the fused Euler update
        writes it), passed to the model instead of casting x again."""
        if model_input is not None:
            inp = model_input
        else:
            inp = x if self.input_dtype is None else x.to(self.input_dtype)
        with rollout_mode(self.model, self.mode):
            out = self.model(inp, self.model_time(t), **unwrap_kwargs(kwargs))
        self.calls += 1
        self.sample_forwards += x.shape[0]
        if not isinstance(out, Tensor):
            raise TypeError(f"model must return a tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(
                f"model returned shape {tuple(out.shape)}, expected the input's shape "
                f"{tuple(x.shape)}"
            )
        v = out.to(x.dtype)
        return -v if self.convention == "noise_at_1" else v
