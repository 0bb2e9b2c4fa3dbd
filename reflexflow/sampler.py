"""ODE sampling from noise (t = 0) to data (t = 1) with Euler or Heun steps."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .checks import check_number
from .config_checks import check_batch_tensor, check_model_kwargs
from .conventions import VelocityModel, check_convention

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
    unbatched_kwargs: tuple[str, ...] = (),
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Integrate dx/dt = v(x, t) from t_start to t_end (canonical) in ``steps`` uniform steps.

    euler: x += h v(x, t). heun: x~ = x + h v(x, t); x += h/2 (v(x, t) + v(x~, t + h)).
    The model is called in its own ``convention`` (noise_at_1: sigma = 1 - t, v = -output).
    The state is float32 (float64 stays float64); the model sees noise's dtype.
    Inputs are checked as the loss checks its own: noise (B, ...) floating with B >= 1,
    model_kwargs tensors batch-shaped (first axis B) unless their key is in
    ``unbatched_kwargs``, everything on the model's device.
    Returns x at t_end (and the list of states, start included, if return_trajectory).
    """
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        got = noise.dtype if isinstance(noise, Tensor) else type(noise).__name__
        raise TypeError(f"noise must be a floating-point tensor, got {got}")
    check_batch_tensor("noise", noise)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    check_convention(convention)
    check_number("timestep_scale", timestep_scale, low=0, low_open=True)
    check_number("t_start", t_start)
    check_number("t_end", t_end)
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"need 0 <= t_start < t_end <= 1, got {t_start}, {t_end}")
    if not isinstance(return_trajectory, bool):
        raise TypeError(f"return_trajectory must be a bool, got {return_trajectory!r}")
    model_kwargs = check_model_kwargs(model_kwargs, noise.shape[0], unbatched_kwargs)
    velocity = VelocityModel(
        model,
        convention,
        input_dtype=noise.dtype,
        timestep_scale=timestep_scale,
        input_name="noise",
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
