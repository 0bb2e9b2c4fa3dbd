"""ODE sampling from noise (t = 0) to data (t = 1) with Euler or Heun steps."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .conventions import VelocityModel

__all__ = ["sample", "SOLVERS"]

SOLVERS = ("euler", "heun")


@torch.no_grad()
def sample(
    model: Callable[..., Tensor],
    noise: Tensor,
    steps: int,
    *,
    solver: str = "euler",
    convention: str = "data_at_1",
    model_kwargs: Mapping[str, Any] | None = None,
    timestep_scale: float = 1.0,
    t_start: float = 0.0,
    t_end: float = 1.0,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Integrate dx/dt = v(x, t) from t_start to t_end (canonical) in ``steps`` uniform steps.

    euler: x += h v(x, t). heun: x~ = x + h v(x, t); x += h/2 (v(x, t) + v(x~, t + h)).
    The model is called in its own ``convention`` (noise_at_1: sigma = 1 - t, v = -output).
    The state is float32 (float64 stays float64); the model sees noise's dtype.
    Returns x at t_end (and the list of states, start included, if return_trajectory).
    """
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError("noise must be a floating-point tensor")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"need 0 <= t_start < t_end <= 1, got {t_start}, {t_end}")
    velocity = VelocityModel(
        model, convention, input_dtype=noise.dtype, timestep_scale=timestep_scale
    )
    dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    x = noise.to(dtype).clone()
    batch = x.shape[0]
    grid = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    trajectory = [x.clone()] if return_trajectory else []
    for i in range(steps):
        t = torch.full((batch,), float(grid[i]), dtype=dtype, device=x.device)
        h = float(grid[i + 1] - grid[i])
        v = velocity(x, t, model_kwargs)
        if solver == "euler":
            x = x + h * v
        else:
            x_pred = x + h * v
            t_next = torch.full_like(t, float(grid[i + 1]))
            x = x + 0.5 * h * (v + velocity(x_pred, t_next, model_kwargs))
        if return_trajectory:
            trajectory.append(x.clone())
    return (x, trajectory) if return_trajectory else x
