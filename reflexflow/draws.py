"""The per-sample random quantities of one training step: noise, rollout lengths, times.

Canonical convention (data at t = 1). For each sample i:

    eps_i ~ N(0, I);  k_i = 0 with probability 1 - ss_prob, else K (k_draw "fixed") or
    U{k_min..K} ("uniform", k_min 1 by default, 0 as SimpleTuner);
    time_draw "start" (default): t0_i = u_i * room_i,  room_i = 1 - t_eps - k_i h  (grid)
    or 1 - t_eps (single step, where t1_i = t0_i + (1 - t_eps - t0_i) U(0, 1));
    time_draw "end" (SimpleTuner, grid only): the drawn u_i is the END time t_e; a sample
    that rolls out ends on the 1/N grid, n_i = floor(N (1 - t_e)) (SimpleTuner's
    int(1000 sigma)), t1_i = 1 - n_i / N, and starts k_i steps earlier, t0_i = t1_i - k_i h,
    with k_i cut to N - 1 - n_i (SimpleTuner clamps its source index to N - 1); a sample
    that does not roll out keeps t0_i = t1_i = t_e.

A user's own times t (their convention) are taken as they are: every t in [0, 1] is
valid for a sample that does not roll out (FM is defined there), and a sample whose t
leaves no room for its drawn rollout (t0 + k h > 1 - t_eps) does not roll out (k_i = 0),
so t from SiT's sampler (uniform on [0, 1)) is always accepted. Explicit k must fit its
explicit t, and k <= rollout_steps. With time_draw "end" the user's t is the end time.
With lambda_adr = lambda_fc = 0 nothing rolls out (k = 0 for every sample,
t0 = u (1 - t_eps)).

biased_input "renoise" (takenoko): no rollout; k_i = 1 (re-noised) with probability
ss_prob, t0_i = u_i in [0, 1] and t1_i = 1 - sigma_i, sigma_i ~
ShiftedLogitNormalTime(renoise_shift, *renoise_range) (noise-ward, independent of t0).

A time sampler with a ``convention`` attribute ("noise_at_1": it draws sigma) is read in
that convention instead of the loss's. An explicit t1 (the user's convention) is taken
for the rolled-out rows of the single-step schedule (t0 <= t1 <= 1 - t_eps) and of
"renoise" (t1 in [0, 1]); rows with k = 0 keep t1 = t0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import ReflexFlowConfig
from .config_checks import raise_at_first
from .conventions import to_canonical_time
from .time_sampling import LogitNormalTime, ShiftedLogitNormalTime, UniformTime

__all__ = ["Draws", "draw", "static_k", "end_grid_times", "T_TOL"]

# samplers whose output is in [0, 1] by construction (no check, no host sync)
_BUILTIN_SAMPLERS = (UniformTime, LogitNormalTime, ShiftedLogitNormalTime)
T_TOL = 1e-6  # slack for explicit times against 1 - t_eps - k h (float rounding)


@dataclass(frozen=True, eq=False)
class Draws:
    """The per-sample random quantities of one step, canonical convention.

    eps (B, *S), k (B,) int64, t0, t1, step (B,) in the state dtype. fixed_k: K when
    every k_i is known to be K (or 0, for a user's t that leaves no room) without reading
    k, so the rollout can run the engine's masked static plan with no host sync; None
    when k must be read.
    """

    eps: Tensor
    k: Tensor
    t0: Tensor
    t1: Tensor
    step: Tensor
    fixed_k: int | None


def state_dtype(x: Tensor) -> torch.dtype:
    """The rollout state's dtype: float64 stays float64, everything else is float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _draw_k(
    cfg: ReflexFlowConfig, batch: int, device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """k_i = 0 with probability 1 - ss_prob, else K (fixed) or U{k_min..K} (uniform)."""
    kmax = cfg.max_rollout_steps
    rolled = torch.rand(batch, device=device, generator=generator) < cfg.ss_prob
    if cfg.k_draw == "fixed" or (kmax == 1 and cfg.k_min == 1):
        lengths = torch.full((batch,), kmax, device=device, dtype=torch.int64)
    else:
        lengths = torch.randint(cfg.k_min, kmax + 1, (batch,), device=device, generator=generator)
    return torch.where(rolled, lengths, torch.zeros_like(lengths))


def static_k(cfg: ReflexFlowConfig) -> int | None:
    """The one rollout length every drawn k_i takes, when the config pins it."""
    kmax = cfg.max_rollout_steps
    if cfg.time_draw == "end":  # k is cut where the start would pass t = 0: read it
        return None
    pinned = cfg.k_draw == "fixed" or (kmax == 1 and cfg.k_min == 1)
    if cfg.rolls_out and cfg.ss_prob == 1.0 and pinned:
        return kmax
    return None


def _check_k(k: Any, cfg: ReflexFlowConfig, batch: int, device: torch.device) -> Tensor:
    if not isinstance(k, Tensor):
        raise TypeError(f"k must be an int64 tensor of shape ({batch},), got {type(k).__name__}")
    if k.dtype != torch.int64:
        raise TypeError(f"k must have dtype torch.int64, got {k.dtype}")
    if k.shape != (batch,):
        raise ValueError(f"k must have shape ({batch},), got {tuple(k.shape)}")
    if k.device != device:
        raise ValueError(f"k is on {k.device}, x1 on {device}")
    if not cfg.uses_rollout:
        if bool((k != 0).any()):
            raise ValueError(f"k must be all zeros for method={cfg.method!r} (no rollout)")
        return k
    if bool((k < 0).any()):
        raise ValueError(f"k must be >= 0, got min {int(k.min())}")
    if cfg.step_schedule == "single" and bool((k > 1).any()):
        raise ValueError("k must be 0 or 1 with step_schedule='single' (one Euler step)")
    if cfg.rollout_grad and bool((k > 1).any()):
        raise ValueError("k must be 0 or 1 with rollout_grad=True")
    if bool((k > cfg.rollout_steps).any()):
        raise ValueError(
            f"k must be <= rollout_steps = {cfg.rollout_steps}, got max {int(k.max())}"
        )
    return k  # k <= rollout_steps fits before 1 - t_eps (the config checks K h)


def _check_sampler_output(u: Any, batch: int, device: torch.device) -> Tensor:
    """A time sampler must return a floating (B,) tensor on x1's device, in [0, 1]."""
    if not isinstance(u, Tensor) or not u.is_floating_point():
        raise TypeError(f"time_sampler must return a floating-point tensor, got {u!r:.80}")
    if u.shape != (batch,):
        raise ValueError(f"time_sampler must return shape ({batch},), got {tuple(u.shape)}")
    if u.device != device:
        raise ValueError(f"time_sampler returned a tensor on {u.device}, x1 is on {device}")
    return u


def _sampled_u(
    cfg: ReflexFlowConfig, batch: int, device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """u = time_sampler(batch, device, generator) in float64; a user sampler's output is
    checked (shape, device; values in [0, 1]: one host sync, user samplers only, and not
    while torch.compile traces the step, which such a sync would break)."""
    u = cfg.sampler(batch, device, generator)
    if not isinstance(cfg.sampler, _BUILTIN_SAMPLERS):
        u = _check_sampler_output(u, batch, device).to(torch.float64)
        if not torch.compiler.is_compiling() and bool(((u < 0) | (u > 1) | u.isnan()).any()):
            raise ValueError("time_sampler must return values in [0, 1]")
    return u.to(torch.float64)


def _check_t(t: Any, batch: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(
            f"t must be a floating-point tensor of shape ({batch},), got {type(t).__name__}"
        )
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor, got dtype {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"t is on {t.device}, x1 on {device}")


def _unit_interval(t: Tensor, convention: str) -> Tensor:
    """t in float64; ValueError unless every t lies in [0, 1] up to T_TOL (NaN is refused;
    one host sync)."""
    tt = t.to(torch.float64)
    raise_at_first(
        ~((tt >= -T_TOL) & (tt <= 1 + T_TOL)),
        lambda i: f"t[{i}] = {float(t[i]):.6g} ({convention}) must lie in [0, 1]",
    )
    return tt


def _user_times(
    cfg: ReflexFlowConfig, t: Tensor, k: Tensor, room: Tensor, k_given: bool
) -> tuple[Tensor, Tensor]:
    """Canonical t0 from the user's t (one host sync), and k with unfitting rollouts dropped.

    Every t must lie in [0, 1] (NaN is refused). A sample whose t0 leaves no room for its
    rollout (t0 > room + tolerance) gets k = 0 when k was drawn; an explicit k must fit.
    """
    t0 = to_canonical_time(_unit_interval(t, cfg.convention), cfg.convention)
    no_room = (k > 0) & (t0 > room + T_TOL)
    if k_given:
        raise_at_first(
            no_room,
            lambda i: (
                f"t[{i}] = {float(t[i]):.6g} ({cfg.convention}) with k[{i}] = {int(k[i])} "
                f"does not fit: canonical t0 + k h must lie in [0, 1 - t_eps = "
                f"{1 - cfg.t_eps:.6g}] with h = {cfg.step:.6g}"
            ),
        )
    else:
        k = torch.where(no_room, torch.zeros_like(k), k)
    room = torch.where(k > 0, room, torch.ones_like(room))
    return t0.clamp(0, None).minimum(room), k


def end_grid_times(
    sigma_end: Tensor, k: Tensor, n: int, t_eps: float, k_given: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """SimpleTuner's end-time draw on the 1/n grid: (t0, t1, k), canonical, float64.

    sigma_end = 1 - t_e is the drawn end in noise-ward form (SimpleTuner's sigma). A sample
    with k > 0 ends at index n_e = floor(n sigma_end) (its ``int(1000 sigma)``), t1 =
    1 - n_e / n, and starts at index min(n_e + k, n - 1) (its source clamp), so k becomes
    min(k, n - 1 - n_e) and t0 = 1 - (n_e + k) / n. A sample with k = 0 keeps t0 = t1 =
    t_e. Rollouts must end at t1 <= 1 - t_eps (n_e >= t_eps n): a drawn k that does not fit
    becomes 0, an explicit one (k_given) that does not fit, or that the clamp would cut, is
    refused. SimpleTuner puts the states on a 1/(n - 1) grid while its model sees t / n; the
    library keeps both on 1/n (docs/peer-readings.md).
    """
    index = torch.floor(n * sigma_end)
    lowest = math.ceil(t_eps * n - 1e-9)  # the smallest end index with t1 <= 1 - t_eps
    room = (n - 1) - index  # steps before the source index reaches n - 1
    fits = (index >= lowest) & (room >= 1)
    if k_given:
        raise_at_first(
            (k > 0) & ~(fits & (k.to(index.dtype) <= room)),
            lambda i: (
                f"t[{i}] (end time, sigma = {float(sigma_end[i]):.6g}) with k[{i}] = "
                f"{int(k[i])} does not fit the 1/{n} grid: the end index floor({n} sigma) = "
                f"{int(index[i])} must be >= {lowest} (t1 <= 1 - t_eps) and the start index "
                f"end + k <= {n - 1}"
            ),
        )
    k = torch.where(fits, torch.minimum(k, room.clamp_min(0).to(k.dtype)), torch.zeros_like(k))
    rolled = k > 0
    t_end = 1 - sigma_end
    t1 = torch.where(rolled, 1 - index / n, t_end)
    t0 = torch.where(rolled, 1 - (index + k.to(index.dtype)) / n, t_end)
    return t0, t1, k


def _noise_ward(u: Tensor, convention: str) -> Tensor:
    """sigma = 1 - t (canonical t) from a value in the user's convention, without the
    rounding of 1 - (1 - sigma) when the user's convention is noise-ward already."""
    return u if convention == "noise_at_1" else 1 - u


def draw(
    cfg: ReflexFlowConfig,
    x1: Tensor,
    noise: Tensor | None,
    t: Tensor | None,
    k: Tensor | None,
    generator: torch.Generator | None,
    t1: Tensor | None = None,
) -> Draws:
    """eps, k, t0, t1 and the Euler step of every sample (see the module docstring)."""
    batch, device, dtype = x1.shape[0], x1.device, state_dtype(x1)
    eps = (
        torch.randn(x1.shape, device=device, generator=generator, dtype=dtype)
        if noise is None
        else noise.to(dtype)
    )
    k_given = k is not None
    # drawn k with a pinned length: every k_i is K, or 0 where a user's t leaves no room
    # (the engine's masked static plan takes k_i in {0..K} without reading k)
    fixed_k = static_k(cfg) if not k_given else None
    if k is None:
        k = (
            _draw_k(cfg, batch, device, generator)
            if cfg.rolls_out
            else torch.zeros(batch, device=device, dtype=torch.int64)
        )
    else:
        k = _check_k(k, cfg, batch, device)
        if not cfg.rolls_out:  # lambda_adr = lambda_fc = 0: plain FM, nothing rolls out
            k = torch.zeros_like(k)
    h = cfg.step
    renoise = cfg.biased_input == "renoise"
    if t1 is not None and not (renoise or cfg.step_schedule == "single"):
        raise ValueError(
            "an explicit t1 needs step_schedule='single' or biased_input='renoise' (on the "
            "grid t1 = t0 + k h)"
        )
    if cfg.time_draw == "end":
        return _draw_end(cfg, x1, eps, t, k, k_given, generator, dtype)
    if renoise:
        return _draw_renoise(cfg, x1, eps, t, t1, k, generator, dtype)
    single = cfg.step_schedule == "single"
    room = (1 - cfg.t_eps) - (0 if single else h) * k.to(torch.float64)  # t0 <= room
    if t is None:
        u = _sampled_u(cfg, batch, device, generator)
        t0 = to_canonical_time(u, _sampler_convention(cfg)) * room
    else:
        _check_t(t, batch, device)
        t0, k = _user_times(cfg, t, k, room, k_given)
    if single and t1 is not None:
        t1 = _user_t1(cfg, t1, t0, k, 1 - cfg.t_eps)
        step = t1 - t0
    elif single:
        frac = torch.rand(batch, device=device, generator=generator, dtype=torch.float64)
        t1 = torch.where(k > 0, t0 + (1 - cfg.t_eps - t0) * frac, t0)
        step = t1 - t0
    else:
        t1 = t0 + h * k.to(torch.float64)
        step = torch.full_like(t0, h)
    return Draws(eps, k, t0.to(dtype), t1.to(dtype), step.to(dtype), fixed_k)


def _sampler_convention(cfg: ReflexFlowConfig) -> str:
    """The convention of the time sampler's values: its own ``convention`` attribute
    (a preset's sampler, e.g. takenoko's noise-ward sigma), else the loss's."""
    return getattr(cfg.sampler, "convention", None) or cfg.convention


def _user_t1(cfg: ReflexFlowConfig, t1: Tensor, t0: Tensor, k: Tensor, high: float) -> Tensor:
    """Canonical t1 from the user's t1 for rows with k > 0 (t0 elsewhere); ValueError
    unless t0 <= t1 <= high on those rows (one host sync)."""
    _check_t(t1, t0.shape[0], t0.device)
    t1 = to_canonical_time(t1.to(torch.float64), cfg.convention)
    rolled = k > 0
    raise_at_first(
        rolled & ~((t1 >= t0 - T_TOL) & (t1 <= high + T_TOL)),
        lambda i: (
            f"t1[{i}] = {float(t1[i]):.6g} (canonical) must lie in [t0 = {float(t0[i]):.6g}, "
            f"{high:.6g}]"
        ),
    )
    return torch.where(rolled, t1.clamp(max=high), t0)


def _draw_renoise(
    cfg: ReflexFlowConfig,
    x1: Tensor,
    eps: Tensor,
    t: Tensor | None,
    t1: Tensor | None,
    k: Tensor,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> Draws:
    """biased_input "renoise" (takenoko): t0 = u, t1 = 1 - sigma with sigma from the
    noise-ward ShiftedLogitNormalTime(renoise_shift, *renoise_range); see the module
    docstring. k (0 or 1) marks the re-noised rows."""
    batch, device = x1.shape[0], x1.device
    if t is None:
        t0 = to_canonical_time(_sampled_u(cfg, batch, device, generator), _sampler_convention(cfg))
    else:
        _check_t(t, batch, device)
        t0, _ = _user_times(
            cfg, t, torch.zeros_like(k), torch.ones_like(t, dtype=torch.float64), True
        )
    k = k.clamp_max(1)
    if t1 is None:
        low, high = cfg.renoise_range
        sigma = ShiftedLogitNormalTime(cfg.renoise_shift, low, high)(batch, device, generator)
        t1 = torch.where(k > 0, 1 - sigma, t0)
    else:
        t1 = _user_t1(cfg, t1, torch.zeros_like(t0), k, 1.0)
        t1 = torch.where(k > 0, t1, t0)
    return Draws(eps, k, t0.to(dtype), t1.to(dtype), (t1 - t0).to(dtype), None)


def _draw_end(
    cfg: ReflexFlowConfig,
    x1: Tensor,
    eps: Tensor,
    t: Tensor | None,
    k: Tensor,
    k_given: bool,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> Draws:
    """time_draw "end": the drawn (or given) time is where the rollout ends; see
    :func:`end_grid_times`."""
    batch, device = x1.shape[0], x1.device
    if t is None:
        u = _sampled_u(cfg, batch, device, generator)
        sigma_end = _noise_ward(u, _sampler_convention(cfg))
    else:
        _check_t(t, batch, device)
        sigma_end = _noise_ward(_unit_interval(t, cfg.convention), cfg.convention).clamp(0, 1)
    t0, t1, k = end_grid_times(sigma_end, k, cfg.num_sampling_steps, cfg.t_eps, k_given)
    step = torch.full_like(t0, cfg.step)
    return Draws(eps, k, t0.to(dtype), t1.to(dtype), step.to(dtype), None)
