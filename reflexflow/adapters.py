"""Adapters to the conventions of other flow-matching codebases (none of them is imported).

* SiT (``Transport.training_losses``): :class:`SiTTransportAdapter`, :func:`drop_labels`.
* diffusers (SD3, Flux; noise at sigma = 1): :class:`DiffusersModelAdapter`,
  :func:`diffusers_knobs`, :class:`ShiftedSigmaSampler`.
* Meta's flow_matching (``scheduler(t) -> alpha_t, sigma_t, d_alpha_t, d_sigma_t``):
  :func:`path_from_scheduler`, :class:`FunctionPath`.
* torchcfm (``ConditionalFlowMatcher`` and subclasses): :func:`torchcfm_path`,
  :class:`LipmanOTPath`.

Every adapter maps onto reflexflow's canonical convention (data at t = 1):
x_t = a(t) x1 + s(t) eps, u_t = a'(t) x1 + s'(t) eps (DESIGN.md section 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .loss import ReflexFlowLoss, ReflexFlowOutput
from .paths import AffinePath, GVPPath, LinearPath, PathLike, VPPath

__all__ = [
    "FunctionPath",
    "path_from_scheduler",
    "LipmanOTPath",
    "torchcfm_path",
    "drop_labels",
    "sit_path",
    "SiTTransportAdapter",
    "DiffusersModelAdapter",
    "diffusers_knobs",
    "ShiftedSigmaSampler",
]


# ----------------------------------------------------------------- flow_matching (Meta)


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


# --------------------------------------------------------------------------- torchcfm


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

    torchcfm pairs a source x0 (the noise: pass it as ``noise=``, e.g. after its OT plan)
    with data x1 at t = 1, as reflexflow does:

    * ConditionalFlowMatcher / ExactOptimalTransportConditionalFlowMatcher, sigma = 0:
      x_t = t x1 + (1 - t) x0, u = x1 - x0: "linear";
    * VariancePreservingConditionalFlowMatcher, sigma = 0: x_t = cos(pi t/2) x0 +
      sin(pi t/2) x1: "gvp";
    * TargetConditionalFlowMatcher(sigma): x_t = t x1 + (1 - (1 - sigma) t) eps:
      :class:`LipmanOTPath` (its eps is torchcfm's fresh noise, not x0).

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


# -------------------------------------------------------------------------------- SiT


def drop_labels(
    y: Tensor, prob: float, null_label: int, generator: torch.Generator | None = None
) -> Tensor:
    """Classifier-free-guidance label dropout: y_i -> null_label with probability ``prob``."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if not isinstance(y, Tensor) or y.dim() != 1:
        raise TypeError("y must be a (B,) tensor of class labels")
    if prob == 0.0:
        return y
    drop = torch.rand(y.shape, device=y.device, generator=generator) < prob
    return torch.where(drop, torch.full_like(y, null_label), y)


_SIT_PATHS = {"linear": "linear", "gvp": "gvp", "vp": "vp"}


def sit_path(path_type: Any) -> str:
    """reflexflow path name of a SiT path type ("Linear", "GVP", "VP" or SiT's PathType)."""
    name = getattr(path_type, "name", path_type)
    if not isinstance(name, str) or name.lower() not in _SIT_PATHS:
        raise ValueError(f"path_type must be one of 'Linear', 'GVP', 'VP', got {path_type!r}")
    return _SIT_PATHS[name.lower()]


_SIT_PLANS = {"ICPlan": "linear", "GVPCPlan": "gvp"}


def _transport_path(transport_or_path: Any) -> Any:
    """The reflexflow path of a SiT Transport (from its path_sampler plan) or path type.

    SiT's Transport keeps no path_type, only ``path_sampler``: an ICPlan (linear),
    GVPCPlan (gvp) or VPCPlan(sigma_min, sigma_max) (vp with those betas).
    """
    if hasattr(transport_or_path, "path_type"):
        return sit_path(transport_or_path.path_type)
    plan = getattr(transport_or_path, "path_sampler", None)
    if plan is None:
        return sit_path(transport_or_path)
    name = type(plan).__name__
    if name == "VPCPlan":
        return VPPath(float(plan.sigma_min), float(plan.sigma_max))
    if name not in _SIT_PLANS:
        raise ValueError(
            f"transport.path_sampler must be a SiT ICPlan, GVPCPlan or VPCPlan, got {name}"
        )
    return _SIT_PLANS[name]


class SiTTransportAdapter:
    """Drop-in for SiT's ``Transport.training_losses(model, x1, model_kwargs)``.

    SiT's path is reflexflow's canonical one (x_t = alpha_t x1 + sigma_t x0, data x1 at
    t = 1, noise x0), and SiT's models are called as ``model(x, t, y=...)``: the one-line
    change in SiT's train.py is
    ``transport = SiTTransportAdapter(args.path_type, num_classes=args.num_classes)``
    (``loss_dict = transport.training_losses(model, x, model_kwargs)`` and
    ``loss_dict["loss"].mean()`` stay as they are: "loss" is the scalar loss).

    ``transport_or_path`` is a SiT Transport (its path_type is read, its model_type must
    be velocity) or a path type name. With ``class_dropout_prob > 0`` the labels
    ``model_kwargs[label_key]`` are dropped to ``num_classes`` (SiT's null class) once per
    step, so the rollout and both gradient calls see the same label; build the SiT model
    with class_dropout_prob=0 then. Other ``knobs`` go to :class:`ReflexFlowLoss`.
    """

    def __init__(
        self,
        transport_or_path: Any = "Linear",
        *,
        num_classes: int | None = None,
        class_dropout_prob: float = 0.0,
        label_key: str = "y",
        **knobs: Any,
    ) -> None:
        model_type = getattr(transport_or_path, "model_type", None)
        if model_type is not None and getattr(model_type, "name", model_type) != "VELOCITY":
            raise ValueError(
                f"ReflexFlow trains a velocity model; the transport's model_type is {model_type}"
            )
        path = _transport_path(transport_or_path)
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob}")
        if class_dropout_prob > 0 and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError("class_dropout_prob > 0 needs num_classes (the null label's id)")
        self.num_classes = num_classes
        self.class_dropout_prob = float(class_dropout_prob)
        self.label_key = label_key
        self.loss_fn = ReflexFlowLoss(path=path, **knobs)

    def training_losses(
        self,
        model: Callable[..., Tensor],
        x1: Tensor,
        model_kwargs: Mapping[str, Any] | None = None,
        *,
        generator: torch.Generator | None = None,
        **loss_kwargs: Any,
    ) -> dict[str, Any]:
        """SiT's signature; returns {"loss", "fc_loss", "adr_loss", "bias_norm", "t", "output"}.

        "loss" is the scalar L = L_FC + lambda_adr L_ADR (``.mean()`` leaves it unchanged);
        "output" the full :class:`ReflexFlowOutput`. ``loss_kwargs`` (noise, t, k) go to
        the loss.
        """
        kwargs = dict(model_kwargs or {})
        if self.class_dropout_prob > 0:
            if self.label_key not in kwargs:
                raise ValueError(f"model_kwargs has no {self.label_key!r} labels to drop")
            kwargs[self.label_key] = drop_labels(
                kwargs[self.label_key], self.class_dropout_prob, self.num_classes, generator
            )
        out: ReflexFlowOutput = self.loss_fn(
            model, x1, model_kwargs=kwargs, generator=generator, **loss_kwargs
        )
        return {
            "loss": out.loss,
            "fc_loss": out.fc_loss,
            "adr_loss": out.adr_loss,
            "bias_norm": out.bias_norm,
            "t": out.t0,
            "output": out,
        }


# --------------------------------------------------------------------------- diffusers


def diffusers_knobs(family: str = "sd3", *, logit_normal: bool = True) -> dict[str, Any]:
    """Loss knobs for a diffusers flow-matching transformer.

    Both families use noise at sigma = 1, x = (1 - sigma) x0 + sigma eps, target eps - x0
    (convention="noise_at_1"). "sd3" (SD3Transformer2DModel) takes timesteps
    sigma * 1000 (timestep_scale=1000); "flux" (FluxTransformer2DModel, as its pipeline
    calls it) takes sigma and scales by 1000 inside (timestep_scale=1). With
    logit_normal, sigma is drawn as SD3 trains: sigmoid(N(0, 1)).
    """
    scales = {"sd3": 1000.0, "flux": 1.0}
    if family not in scales:
        raise ValueError(f"family must be one of {sorted(scales)}, got {family!r}")
    knobs: dict[str, Any] = {"convention": "noise_at_1", "timestep_scale": scales[family]}
    if logit_normal:
        knobs["time_sampler"] = "logit_normal"
    return knobs


class ShiftedSigmaSampler:
    """sigma = shift u / (1 + (shift - 1) u), u = sigmoid(mean + std z) (or U(0, 1)).

    The timestep shift of diffusers' FlowMatchEulerDiscreteScheduler (SD3: shift = 3),
    as a ``time_sampler`` for convention="noise_at_1" (it draws sigma).
    """

    def __init__(
        self, shift: float = 3.0, *, logit_normal: bool = True, mean: float = 0.0, std: float = 1.0
    ) -> None:
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if logit_normal and not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.shift, self.logit_normal, self.mean, self.std = float(shift), logit_normal, mean, std

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


class DiffusersModelAdapter(torch.nn.Module):
    """Calls a diffusers-style transformer as reflexflow expects: ``model(x, t, **kwargs)``.

    forward(x, t, **kw) = unpack(transformer(**{sample_arg: pack(x), timestep_arg: t},
    **kw, return_dict=False)[0]). ``pack``/``unpack`` (e.g. Flux's 2x2 latent packing)
    let the loss see (B, C, H, W) latents, so the FC filter runs over H and W rather than
    over a token axis. Output objects with ``.sample`` and plain tensors are accepted.
    Use with ``ReflexFlowLoss(**diffusers_knobs("sd3"))``.
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
