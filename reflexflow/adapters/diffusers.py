"""diffusers' DreamBooth recipes for SD3 / Flux: :func:`diffusers_knobs` (the loss knobs)
and :class:`DiffusersModelAdapter` (a transformer called as ``model(x, t, **kwargs)``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .diffusers_sigmas import (
    FLUX_SCHEDULER,
    SD3_SCHEDULER,
    DiffusersLossWeighting,
    DiffusersSigmaSampler,
    _table_of,
    flux_shift_mu,
    scheduler_sigma_table,
)

_FAMILIES = {
    # timestep_scale, default weighting_scheme, default precondition_outputs
    "sd3": (1000.0, "logit_normal", True),
    "flux": (1.0, "none", False),
}


def diffusers_knobs(
    family: str = "sd3",
    *,
    scheduler: Any = None,
    weighting_scheme: str | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    precondition_outputs: bool | None = None,
    image_seq_len: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Loss knobs that train as diffusers' DreamBooth scripts for SD3 / Flux do.

    Both families put noise at sigma = 1, x = (1 - sigma) x0 + sigma eps, target
    eps - x0 (convention="noise_at_1"). "sd3" (train_dreambooth_sd3.py,
    SD3Transformer2DModel) takes timesteps sigma * 1000 (timestep_scale=1000); "flux"
    (train_dreambooth_flux.py, FluxTransformer2DModel) takes sigma (the script passes
    timesteps / 1000; timestep_scale=1) and ``unbatched_kwargs=("img_ids", "txt_ids")``.

    Sigma draw (``time_sampler``, :class:`DiffusersSigmaSampler`): u from the
    weighting_scheme's density, sigma = the scheduler's training sigmas at floor(1000 u).
    The table is ``scheduler``'s when given (a fresh FlowMatchEulerDiscreteScheduler, as
    the scripts copy it), else the published config's: SD3 shift 3
    (:data:`SD3_SCHEDULER`); FLUX.1 has use_dynamic_shifting=True
    (:data:`FLUX_SCHEDULER`), whose constructor applies no shift, so the Flux script
    trains on unshifted sigmas. ``image_seq_len`` (Flux only; L = (H / 2) (W / 2) for
    (C, H, W) latents) adds the resolution-dependent shift e^mu / (e^mu + 1/s - 1),
    mu = :func:`flux_shift_mu` (with the scheduler's config values), which FluxPipeline
    applies at inference: for training on the sigmas you will sample at. As for every
    drawn time, the loss maps the draw into the room its rollout needs: canonical t0 =
    (1 - sigma) (1 - t_eps - k h), so the FM term's sigma is sigma + (1 - sigma)(t_eps +
    k h), never below t_eps + k h (0.021 with K = 1, N = 50; t_eps alone with k = 0). To
    train on the scripts' sigmas exactly, draw them yourself and pass ``t=sigma`` (an
    explicit t keeps its value; a rollout that does not fit is dropped).

    Weighting (``loss_weighting``, :class:`DiffusersLossWeighting`): "sigma_sqrt" and
    "cosmap" weight the FM term per sample; "logit_normal", "mode" and "none" weight 1.
    ``precondition_outputs`` (SD3 default True, as the SD3 script's
    --precondition_outputs=1; Flux False) multiplies by sigma^2. Defaults per family:
    SD3 "logit_normal" (logit_mean 0, logit_std 1), Flux "none" (uniform u); mode_scale
    1.29 as both scripts.

    ``overrides`` are other ReflexFlowLoss knobs and replace the recipe's, e.g.
    ``ReflexFlowLoss(**diffusers_knobs("sd3", num_sampling_steps=28, time_sampler=...))``.
    """
    if family not in _FAMILIES:
        raise ValueError(f"family must be one of {sorted(_FAMILIES)}, got {family!r}")
    if "logit_normal" in overrides:
        raise TypeError("logit_normal is no knob: use weighting_scheme='logit_normal' / 'none'")
    if overrides.get("convention", "noise_at_1") != "noise_at_1":
        raise ValueError(
            "diffusers_knobs draws and weights sigmas: convention must stay 'noise_at_1'"
        )
    scale, default_scheme, default_precondition = _FAMILIES[family]
    scheme = default_scheme if weighting_scheme is None else weighting_scheme
    precondition = default_precondition if precondition_outputs is None else precondition_outputs
    if image_seq_len is not None and family != "flux":
        raise ValueError("image_seq_len (the resolution-dependent shift) is Flux's; family='sd3'")
    if scheduler is not None:
        table = _table_of(scheduler)
        config = dict(scheduler.config)
    elif family == "sd3":
        config = SD3_SCHEDULER
        table = scheduler_sigma_table(config["num_train_timesteps"], config["shift"])
    else:
        config = FLUX_SCHEDULER
        table = scheduler_sigma_table(config["num_train_timesteps"])  # no shift at init
    if image_seq_len is not None:
        if not config.get("use_dynamic_shifting", False):
            raise ValueError(
                "image_seq_len needs a scheduler with use_dynamic_shifting=True (its "
                "constructor leaves the table unshifted); this one shifts statically"
            )
        if config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError("image_seq_len supports time_shift_type='exponential' only")
        mu = flux_shift_mu(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        table = math.exp(mu) / (math.exp(mu) + (1 / table - 1))
    knobs: dict[str, Any] = {
        "convention": "noise_at_1",
        "timestep_scale": scale,
        "time_sampler": DiffusersSigmaSampler(
            scheme,
            sigmas=table,
            logit_mean=logit_mean,
            logit_std=logit_std,
            mode_scale=mode_scale,
        ),
    }
    weighting = DiffusersLossWeighting(scheme, precondition_outputs=precondition)
    if scheme in ("sigma_sqrt", "cosmap") or precondition:
        knobs["loss_weighting"] = weighting
    if family == "flux":
        knobs["unbatched_kwargs"] = ("img_ids", "txt_ids")
    knobs.update(overrides)
    return knobs


class DiffusersModelAdapter(torch.nn.Module):
    """Calls a diffusers-style transformer as reflexflow expects: ``model(x, t, **kwargs)``.

    forward(x, t, **kw) = unpack(transformer(**{sample_arg: pack(x), timestep_arg: t},
    **kw, return_dict=False)[0]). ``pack``/``unpack`` (e.g. Flux's 2x2 latent packing,
    :func:`flux_pack_latents` / :func:`flux_unpack_latents`) let the loss see (B, C, H, W)
    latents, so the FC filter runs over H and W rather than over a token axis. Output
    objects with ``.sample`` and plain tensors are accepted. Use with
    ``ReflexFlowLoss(**diffusers_knobs("sd3"))``.
    """

    def __init__(
        self,
        transformer: torch.nn.Module | Callable[..., Any],
        *,
        sample_arg: str = "hidden_states",
        timestep_arg: str = "timestep",
        pack: Callable[[Tensor], Tensor] | None = None,
        unpack: Callable[[Tensor, Tensor], Tensor] | None = None,
        return_dict_arg: bool = True,
    ) -> None:
        super().__init__()
        if not callable(transformer):
            raise TypeError(f"transformer must be callable, got {type(transformer).__name__}")
        for name, arg in (("sample_arg", sample_arg), ("timestep_arg", timestep_arg)):
            if not isinstance(arg, str) or not arg:
                raise TypeError(f"{name} must be a keyword name (str), got {arg!r}")
        for name, fn in (("pack", pack), ("unpack", unpack)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
        if not isinstance(return_dict_arg, bool):
            raise TypeError(f"return_dict_arg must be a bool, got {return_dict_arg!r}")
        self.transformer = transformer
        self.sample_arg, self.timestep_arg = sample_arg, timestep_arg
        self.pack, self.unpack = pack, unpack
        self.return_dict_arg = return_dict_arg

    def forward(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        """v = unpack(transformer(pack(x), t, **kwargs), x): the model output, x's layout."""
        inp = self.pack(x) if self.pack is not None else x
        call = {self.sample_arg: inp, self.timestep_arg: t, **kwargs}
        if self.return_dict_arg:
            call["return_dict"] = False
        out = self.transformer(**call)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif not isinstance(out, Tensor) and hasattr(out, "sample"):
            out = out.sample
        return self.unpack(out, x) if self.unpack is not None else out
