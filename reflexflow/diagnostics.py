"""Measuring exposure bias (docs/method.md section 7).

From clean x_t0 on held-out data, roll the model k Euler steps of the inference step
h = 1/N and compare with the path: delta = x^_t1 - x_t1 (same x1 and eps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from . import reference as ref
from .batching import map_batched
from .checks import check_number
from .config_checks import check_batch_tensor, check_generator, check_model_kwargs
from .conventions import VelocityModel, check_convention
from .model_state import modules_of
from .paths import PathLike, get_path
from .rollout import euler_rollout

__all__ = ["ExposureBias", "exposure_bias"]


@dataclasses.dataclass
class ExposureBias:
    """t0 (T,) canonical start times; mse (T,) E[mean over elements (x^_t1 - x_t1)^2];
    low_freq_share (T,) mean share of delta's power at radius <= cutoff * Nyquist (NaN for
    vectors); k and h the rollout used."""

    t0: Tensor
    mse: Tensor
    low_freq_share: Tensor
    k: int
    h: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "t0": self.t0.tolist(),
            "mse": self.mse.tolist(),
            "low_freq_share": self.low_freq_share.tolist(),
            "k": self.k,
            "h": self.h,
        }


@torch.no_grad()
def exposure_bias(
    model: Callable[..., Tensor],
    x1: Tensor,
    *,
    num_sampling_steps: int = 50,
    k: int = 1,
    t0: Tensor | None = None,
    num_times: int = 10,
    path: str | PathLike = "linear",
    convention: str = "data_at_1",
    timestep_scale: float = 1.0,
    t_eps: float = 1e-3,
    cutoff: float = 0.25,
    model_kwargs: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> ExposureBias:
    """Exposure-bias curve: E||x^_t1 - x_t1||^2 per t0, and delta's low-frequency share.

    For each start time t0 (default: num_times points evenly in [0, 1 - t_eps - k h]),
    x_t0 = a x1 + s eps, x^_t1 = k Euler steps of h = 1/num_sampling_steps of the model,
    x_t1 = a(t1) x1 + s(t1) eps with t1 = t0 + k h. One noise draw per sample, shared
    across t0. Times are canonical (data at t = 1) whatever ``convention``, which says
    only how the model reads t. The model runs in eval mode, as at inference (the modules
    it reaches, found as the loss's rollout finds them; their flags are restored; a
    callable that reaches no module is called as it is).
    ``batch_size`` (an int >= 1) splits x1 to bound memory. Inputs are checked
    as the loss checks its own (x1 (B, ...) with B >= 1, model_kwargs batch-shaped,
    devices); bind kwargs that are not batch-shaped (Flux's img_ids) into the model, e.g.
    ``lambda x, t, **kw: model(x, t, img_ids=ids, **kw)``.
    """
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    check_batch_tensor("x1", x1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if (
        isinstance(num_sampling_steps, bool)
        or not isinstance(num_sampling_steps, int)
        or num_sampling_steps < 1
    ):
        raise ValueError(f"num_sampling_steps must be an int >= 1, got {num_sampling_steps!r}")
    if t0 is None:
        check_number("num_times", num_times, low=1, integer=True)
    check_number("t_eps", t_eps, low=0, high=0.5, low_open=True)
    check_number("cutoff", cutoff, low=0, high=1, low_open=True)
    check_number("timestep_scale", timestep_scale, low=0, low_open=True)
    check_convention(convention)
    if batch_size is not None:
        check_number("batch_size", batch_size, low=1, integer=True)
    check_generator(generator, x1)
    model_kwargs = check_model_kwargs(model_kwargs, x1.shape[0], ())
    h = 1.0 / num_sampling_steps
    t_hi = 1.0 - t_eps - k * h
    if t_hi < 0:
        raise ValueError(f"k={k} steps of h={h:.4g} do not fit before 1 - t_eps")
    if t0 is None:
        t0 = torch.linspace(0.0, t_hi, num_times, dtype=torch.float64)
    t0 = _start_times(t0)
    if t0.numel() == 0:
        raise ValueError("t0 must hold at least one start time, got an empty tensor")
    if bool(((t0 < 0) | (t0 > t_hi + 1e-9) | t0.isnan()).any()):
        raise ValueError(f"t0 must lie in [0, {t_hi:.6g}] for k={k}, h={h:.4g}")
    path = get_path(path)
    dtype = torch.float64 if x1.dtype == torch.float64 else torch.float32
    mode = "eval" if modules_of(model) else "train"  # "train": call it as it is
    velocity = VelocityModel(
        model, convention, input_dtype=x1.dtype, timestep_scale=timestep_scale, mode=mode
    )
    batch = x1.shape[0]
    eps = torch.randn(x1.shape, device=x1.device, generator=generator, dtype=dtype)
    data = x1.to(dtype)
    bs = batch if batch_size is None else int(batch_size)
    mse, share = [], []
    for t_val in t0.tolist():
        sq, lf = [], []
        for lo in range(0, batch, bs):
            sl = slice(lo, lo + bs)
            n = data[sl].shape[0]
            kw = None
            if model_kwargs is not None:
                kw = map_batched(model_kwargs, batch, lambda x, s=sl: x[s])
            ts = torch.full((n,), t_val, dtype=dtype, device=x1.device)
            x_t0 = ref.interpolate(path, data[sl], eps[sl], ts)
            kk = torch.full((n,), k, dtype=torch.int64, device=x1.device)
            x_hat = euler_rollout(velocity, x_t0, ts, kk, torch.full_like(ts, h), kw)
            delta = x_hat - ref.interpolate(path, data[sl], eps[sl], ts + k * h)
            sq.append(delta.square().flatten(1).mean(1))
            lf.append(ref.low_frequency_share(delta, cutoff))
        mse.append(torch.cat(sq).mean())
        share.append(torch.cat(lf).mean())
    return ExposureBias(
        t0=t0, mse=torch.stack(mse).cpu(), low_freq_share=torch.stack(share).cpu(), k=k, h=h
    )


def _start_times(t0: Any) -> Tensor:
    """t0 as a 1-D float64 CPU tensor (a number is one time); TypeError / ValueError naming
    t0 for complex or bool values, non-numbers, or more than one dimension."""
    if isinstance(t0, Tensor):
        if t0.is_complex() or t0.dtype == torch.bool:
            raise TypeError(f"t0 must hold real times, got a {t0.dtype} tensor")
        values = t0
    else:
        try:
            values = torch.as_tensor(t0)
            if not (values.is_complex() or values.dtype == torch.bool):
                values = torch.as_tensor(t0, dtype=torch.float64)  # Python floats exactly
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"t0 must be a 1-D tensor or sequence of times, got {t0!r:.80}"
            ) from err
        if values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"t0 must hold real times, got {t0!r:.80}")
    if values.dim() > 1:
        raise ValueError(f"t0 must be 1-D (one start time each), got shape {tuple(values.shape)}")
    return values.detach().to("cpu", torch.float64).reshape(-1)
