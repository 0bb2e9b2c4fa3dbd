"""diffusers' SD3/Flux sigma tables, sigma draws and loss weighting: the scheduler
configs, :func:`scheduler_sigma_table`, :func:`flux_shift_mu`,
:class:`DiffusersSigmaSampler`, :class:`DiffusersLossWeighting`, :class:`ShiftedSigmaSampler`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..checks import check_bool, check_number

WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")

# FlowMatchEulerDiscreteScheduler configs of the published checkpoints (their
# scheduler/scheduler_config.json): SD3 / SD3.5 shift 3; FLUX.1 dynamic shifting.
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}


def flux_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent shift exponent (diffusers' ``calculate_shift``).

    mu = base_shift + (max_shift - base_shift) (L - base_seq_len) / (max_seq_len -
    base_seq_len), linear in the packed image sequence length L = (H / 2) (W / 2) of
    (C, H, W) latents: 0.5 at L = 256 (512 px), 1.15 at L = 4096 (1024 px).
    """
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be a positive int, got {image_seq_len!r}")
    for name, value in (("base_shift", base_shift), ("max_shift", max_shift)):
        check_number(name, value)
    check_number("base_seq_len", base_seq_len, integer=True)
    check_number("max_seq_len", max_seq_len, integer=True)
    if max_seq_len == base_seq_len:
        raise ValueError(
            f"max_seq_len must differ from base_seq_len (the shift is interpolated between "
            f"them), got both {base_seq_len}"
        )
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def scheduler_sigma_table(
    num_train_timesteps: int = 1000, shift: float = 1.0, *, mu: float | None = None
) -> Tensor:
    """The training sigmas of a fresh FlowMatchEulerDiscreteScheduler, float32, (N,).

    s_i = (N - i) / N for i = 0..N-1 (1 down to 1/N), then either the static shift
    sigma = shift s / (1 + (shift - 1) s) (use_dynamic_shifting=False, e.g. SD3 with
    shift 3), or, given ``mu``, the exponential time shift e^mu / (e^mu + 1/s - 1) that
    Flux's pipeline applies at inference (set_timesteps(mu=...)). A scheduler with
    use_dynamic_shifting=True applies no shift in its constructor: its training table is
    the unshifted s (shift = 1, mu = None).
    """
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int):
        raise TypeError(f"num_train_timesteps must be an int, got {num_train_timesteps!r}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    check_number("shift", shift, low=0, low_open=True)
    if mu is not None:
        check_number("mu", mu)
    n = num_train_timesteps
    s = torch.linspace(1, n, n, dtype=torch.float32).flip(0) / n
    if mu is not None:
        return math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    return shift * s / (1 + (shift - 1) * s)


def _table_of(scheduler: Any) -> Tensor:
    """The sigmas a training script indexes: a fresh scheduler's ``sigmas`` (N entries)."""
    config = getattr(scheduler, "config", None)
    sigmas = getattr(scheduler, "sigmas", None)
    n = getattr(config, "num_train_timesteps", None)
    if not isinstance(sigmas, Tensor) or not isinstance(n, int):
        raise TypeError(
            "scheduler must be a diffusers FlowMatchEulerDiscreteScheduler (with .sigmas and "
            f".config.num_train_timesteps), got {type(scheduler).__name__}"
        )
    if sigmas.shape != (n,):
        raise ValueError(
            f"the scheduler's sigmas have shape {tuple(sigmas.shape)}, not ({n},): "
            "set_timesteps() was called on it. Pass a fresh copy, as the training scripts "
            "do (noise_scheduler_copy = copy.deepcopy(noise_scheduler))"
        )
    return sigmas.detach().to("cpu", torch.float32).clone()


class DiffusersSigmaSampler:
    """The sigma draw of diffusers' SD3/Flux training scripts, as a ``time_sampler``.

    u = compute_density_for_timestep_sampling(weighting_scheme): sigmoid(N(logit_mean,
    logit_std)) for "logit_normal", 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u) with
    u ~ U(0, 1) for "mode", U(0, 1) otherwise; then, as the scripts index the
    scheduler's tables, sigma = table[floor(u N)] with N = num_train_timesteps
    (:func:`scheduler_sigma_table`, or a real scheduler's ``sigmas``). The draws use the
    same torch calls, so the same generator gives the scripts' sigmas. u = 1 (sigmoid
    saturating in float32) takes the last entry where the scripts fail on the index.
    Returns float64 sigmas: its ``convention`` is "noise_at_1", so the loss reads them as
    sigmas under either loss convention.
    """

    convention = "noise_at_1"

    def __init__(
        self,
        weighting_scheme: str = "logit_normal",
        *,
        sigmas: Tensor | None = None,
        shift: float = 1.0,
        num_train_timesteps: int = 1000,
        mu: float | None = None,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ) -> None:
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(
                f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}"
            )
        check_number("logit_mean", logit_mean)
        check_number("logit_std", logit_std)  # > 0 only where used, as before
        if weighting_scheme == "logit_normal" and not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        check_number("mode_scale", mode_scale)
        if weighting_scheme == "mode" and not -1.0 <= mode_scale <= 2 / (math.pi - 2):
            raise ValueError(
                f"mode_scale must be in [-1, 2 / (pi - 2) = {2 / (math.pi - 2):.4f}] "
                f"(a density on [0, 1]), got {mode_scale}"
            )
        if sigmas is None:
            sigmas = scheduler_sigma_table(num_train_timesteps, shift, mu=mu)
        elif not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.numel() < 1:
            raise TypeError("sigmas must be a 1-D tensor (the scheduler's training sigmas)")
        elif not bool(((sigmas >= 0) & (sigmas <= 1)).all()):  # NaN fails too
            raise ValueError("sigmas must lie in [0, 1] (and be numbers, not NaN)")
        self.sigmas = sigmas.detach().to(torch.float32)
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.mode_scale = float(mode_scale)

    def density(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """u in [0, 1] per sample (float32), as compute_density_for_timestep_sampling."""
        if self.weighting_scheme == "logit_normal":
            z = torch.normal(
                mean=self.logit_mean,
                std=self.logit_std,
                size=(batch,),
                device=device,
                generator=generator,
            )
            return torch.sigmoid(z)
        u = torch.rand(size=(batch,), device=device, generator=generator)
        if self.weighting_scheme == "mode":
            u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def __call__(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        n = self.sigmas.numel()
        index = (self.density(batch, device, generator) * n).long().clamp_(0, n - 1)
        return self.sigmas.to(device)[index].to(torch.float64)

    def __repr__(self) -> str:
        return (
            f"DiffusersSigmaSampler({self.weighting_scheme!r}, N={self.sigmas.numel()}, "
            f"sigma in [{float(self.sigmas.min()):.4g}, {float(self.sigmas.max()):.4g}])"
        )


class DiffusersLossWeighting:
    """Per-sample weight of the FM term as diffusers' SD3/Flux scripts weight their loss.

    w(sigma) = compute_loss_weighting_for_sd3(weighting_scheme, sigma): sigma^-2 for
    "sigma_sqrt", 2 / (pi (1 - 2 sigma + 2 sigma^2)) for "cosmap", 1 otherwise; times
    sigma^2 with ``precondition_outputs`` (train_dreambooth_sd3.py's default: it trains
    -sigma v + x_sigma against x0, i.e. sigma^2 ||v - (eps - x0)||^2). Called by the loss
    with the rollout start sigmas (B,): its ``convention`` is "noise_at_1", so the loss
    hands it sigmas under either loss convention. The loss applies it as
    mean_i w_i mean ||v_i - u_i||^2, which is the scripts' weighted mean.
    """

    convention = "noise_at_1"

    def __init__(self, weighting_scheme: str = "none", *, precondition_outputs: bool = False):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(
                f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}"
            )
        if not isinstance(precondition_outputs, bool):
            raise TypeError(f"precondition_outputs must be a bool, got {precondition_outputs!r}")
        self.weighting_scheme = weighting_scheme
        self.precondition_outputs = precondition_outputs

    def __call__(self, sigma: Tensor) -> Tensor:
        if self.weighting_scheme == "sigma_sqrt":
            w = sigma**-2.0
        elif self.weighting_scheme == "cosmap":
            w = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
        else:
            w = torch.ones_like(sigma)
        return w * sigma**2 if self.precondition_outputs else w

    def __repr__(self) -> str:
        return (
            f"DiffusersLossWeighting({self.weighting_scheme!r}, "
            f"precondition_outputs={self.precondition_outputs})"
        )


class ShiftedSigmaSampler:
    """sigma = shift u / (1 + (shift - 1) u), u = sigmoid(mean + std z) (or U(0, 1)).

    The continuous form of FlowMatchEulerDiscreteScheduler's static shift (SD3: shift 3),
    as a ``time_sampler``: it draws sigma, and its ``convention`` is "noise_at_1", so the
    loss reads its values as sigmas under either loss convention. The scripts' discrete
    draw is :class:`DiffusersSigmaSampler`.
    """

    convention = "noise_at_1"

    def __init__(
        self, shift: float = 3.0, *, logit_normal: bool = True, mean: float = 0.0, std: float = 1.0
    ) -> None:
        check_number("shift", shift, low=0, low_open=True)
        check_bool("logit_normal", logit_normal)
        check_number("mean", mean)
        check_number("std", std)
        if logit_normal and not std > 0:  # > 0 only where used, as before
            raise ValueError(f"std must be > 0, got {std}")
        self.shift, self.logit_normal = float(shift), logit_normal
        self.mean, self.std = float(mean), float(std)

    def __call__(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        if self.logit_normal:
            z = torch.randn(batch, device=device, generator=generator, dtype=torch.float64)
            u = torch.sigmoid(self.mean + self.std * z)
        else:
            u = torch.rand(batch, device=device, generator=generator, dtype=torch.float64)
        return self.shift * u / (1 + (self.shift - 1) * u)

    def __repr__(self) -> str:
        return f"ShiftedSigmaSampler(shift={self.shift}, logit_normal={self.logit_normal})"
