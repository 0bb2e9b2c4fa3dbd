"""Adapters to the conventions of other flow-matching codebases (none of them is imported).

* SiT (``Transport.training_losses``): :class:`SiTTransportAdapter`, :func:`drop_labels`,
  :func:`sit_label_embedder`.
* diffusers (SD3, Flux; noise at sigma = 1): :class:`DiffusersModelAdapter`,
  :func:`diffusers_knobs` (the DreamBooth scripts' sigma draw and loss weighting:
  :class:`DiffusersSigmaSampler`, :class:`DiffusersLossWeighting`), Flux's latent
  packing and image ids, :class:`ShiftedSigmaSampler`.
* Meta's flow_matching (``scheduler(t) -> alpha_t, sigma_t, d_alpha_t, d_sigma_t``):
  :func:`path_from_scheduler`, :class:`FunctionPath`.
* torchcfm (``ConditionalFlowMatcher`` and subclasses): :func:`torchcfm_path`,
  :class:`LipmanOTPath`.

Every adapter maps onto reflexflow's canonical convention (data at t = 1):
x_t = a(t) x1 + s(t) eps, u_t = a'(t) x1 + s'(t) eps (docs/method.md section 1).
tests/test_peers.py checks them against the real packages when they are installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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
    "sit_label_embedder",
    "SiTTransportAdapter",
    "DiffusersModelAdapter",
    "diffusers_knobs",
    "DiffusersSigmaSampler",
    "DiffusersLossWeighting",
    "scheduler_sigma_table",
    "flux_shift_mu",
    "flux_pack_latents",
    "flux_unpack_latents",
    "flux_latent_image_ids",
    "ShiftedSigmaSampler",
    "SD3_SCHEDULER",
    "FLUX_SCHEDULER",
    "WEIGHTING_SCHEMES",
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


# -------------------------------------------------------------------------------- SiT


def drop_labels(
    y: Tensor, prob: float, null_label: int, generator: torch.Generator | None = None
) -> Tensor:
    """Classifier-free-guidance label dropout: y_i -> null_label with probability ``prob``."""
    if isinstance(prob, bool) or not isinstance(prob, (int, float)):
        raise TypeError(f"prob must be a number, got {prob!r}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if not isinstance(y, Tensor) or y.dim() != 1:
        raise TypeError("y must be a (B,) tensor of class labels")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
    if isinstance(null_label, bool) or not isinstance(null_label, int):
        raise TypeError(f"null_label must be an int, got {null_label!r}")
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


def _y_embedder(model: Any) -> Any | None:
    """``model.y_embedder`` through DDP's .module and compile's ._orig_mod, or None."""
    for _ in range(8):  # wrappers nest a few levels at most
        emb = getattr(model, "y_embedder", None)
        if emb is not None:
            return emb
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return None
        model = inner
    return None


def _follows_sit_contract(emb: Any) -> bool:
    return (
        isinstance(getattr(emb, "embedding_table", None), torch.nn.Embedding)
        and hasattr(emb, "num_classes")
        and hasattr(emb, "dropout_prob")
    )


def sit_label_embedder(model: Any) -> Any | None:
    """SiT's ``LabelEmbedder`` of ``model`` (through DDP's .module and compile's ._orig_mod).

    The contract (SiT's models.py): ``model.y_embedder`` with ``embedding_table`` (an
    nn.Embedding of num_classes + 1 rows when its dropout_prob > 0, num_classes rows
    otherwise: the null-class row exists only then), ``num_classes`` and
    ``dropout_prob`` (the model drops labels itself, in every train-mode call, with this
    probability). None when the model has no ``y_embedder``. A ``y_embedder`` that drops
    labels (``dropout_prob`` > 0) but breaks the contract (e.g. its table is not named
    ``embedding_table``) is refused with a ValueError: the adapter could neither switch
    its dropout off nor check its null row, and labels would be dropped independently
    in every model call of a step.
    """
    emb = _y_embedder(model)
    if emb is None:
        return None
    if _follows_sit_contract(emb):
        return emb
    prob = getattr(emb, "dropout_prob", 0)
    if isinstance(prob, (int, float)) and prob > 0:
        raise ValueError(
            f"the model's y_embedder ({type(emb).__name__}) drops labels itself "
            f"(dropout_prob={prob}) but does not follow SiT's LabelEmbedder contract "
            "(an nn.Embedding named embedding_table, num_classes, dropout_prob), so the "
            "adapter cannot switch that dropout off during its calls: every model call of "
            "a step would drop labels differently. Name the table embedding_table and "
            "give the embedder num_classes, or set y_embedder.dropout_prob = 0 and let "
            "the adapter drop labels (class_dropout_prob=..., num_classes=...)"
        )
    return None


@contextmanager
def _model_label_dropout_off(embedder: Any | None) -> Iterator[None]:
    """Set a SiT LabelEmbedder's own dropout_prob to 0 for the block, then restore it."""
    if embedder is None or not embedder.dropout_prob:
        yield
        return
    before = embedder.dropout_prob
    embedder.dropout_prob = 0.0
    try:
        yield
    finally:
        embedder.dropout_prob = before


class SiTTransportAdapter:
    """Drop-in for SiT's ``Transport.training_losses(model, x1, model_kwargs)``.

    SiT's path is reflexflow's canonical one (x_t = alpha_t x1 + sigma_t x0, data x1 at
    t = 1, noise x0), and SiT's models are called as ``model(x, t, y=...)``. The change in
    SiT's train.py is one line, ``transport = SiTTransportAdapter(args.path_type)``;
    ``loss_dict = transport.training_losses(model, x, model_kwargs)`` and
    ``loss = loss_dict["loss"].mean()`` stay: "loss" is per sample, shape (B,), as SiT's,
    and its mean is the library's loss (same value, same gradient).

    ``transport_or_path`` is a SiT Transport (its path is read from its path_sampler,
    its model_type must be velocity) or a path type name. Other ``knobs`` go to
    :class:`ReflexFlowLoss` (e.g. ``num_sampling_steps``; see below).

    Label dropout (classifier-free guidance). SiT's model drops labels itself, in every
    train-mode call, when its ``class_dropout_prob`` > 0 (its label table then has a
    null-class row at index num_classes, and only then). The adapter drops labels once
    per step instead, so the rollout and both gradient calls see the same (kept or
    dropped) label, and switches the model's own dropout off during its calls:

    * ``class_dropout_prob=None`` (default): the model's own probability (SiT's default
      0.1) when it exposes SiT's ``y_embedder``, else no dropout;
    * a number: that probability. With a SiT model whose label table has no null row
      (built with class_dropout_prob=0) a probability > 0 is refused with a ValueError
      saying what to do; a model that hides its table fails on the first call that
      drops a label, with the same advice;
    * ``num_classes`` (the null label's id) defaults to the model's ``num_classes``.

    Sampling steps. ``num_sampling_steps`` (N) sets the rollout step h = 1 / N: pick the
    inference you train for. SiT's ``Sampler.sample_ode(sampling_method="euler",
    num_steps=M)`` integrates on ``torch.linspace(0, 1, M)``, i.e. M - 1 Euler steps of
    1 / (M - 1): use ``num_sampling_steps = M - 1`` (e.g. num_steps=51 is N = 50). For
    the VP path SiT stops at 1 - sample_eps: h = (1 - sample_eps) / (M - 1). SiT's
    default, dopri5, is adaptive (num_steps there only sets the saved points): choose N
    as the number of fixed steps you will sample with.
    """

    def __init__(
        self,
        transport_or_path: Any = "Linear",
        *,
        num_classes: int | None = None,
        class_dropout_prob: float | None = None,
        label_key: str = "y",
        **knobs: Any,
    ) -> None:
        model_type = getattr(transport_or_path, "model_type", None)
        if model_type is not None and getattr(model_type, "name", model_type) != "VELOCITY":
            raise ValueError(
                f"ReflexFlow trains a velocity model; the transport's model_type is {model_type}"
            )
        path = _transport_path(transport_or_path)
        if class_dropout_prob is not None:
            if isinstance(class_dropout_prob, bool) or not isinstance(
                class_dropout_prob, (int, float)
            ):
                raise TypeError(
                    f"class_dropout_prob must be a number or None, got {class_dropout_prob!r}"
                )
            if not 0.0 <= class_dropout_prob <= 1.0:
                raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob}")
            class_dropout_prob = float(class_dropout_prob)
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        if not isinstance(label_key, str):
            raise TypeError(f"label_key must be a str (a model_kwargs key), got {label_key!r}")
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.label_key = label_key
        self.loss_fn = ReflexFlowLoss(path=path, **knobs)
        if self.loss_fn.config.memory == "lean":
            raise ValueError(
                "memory='lean' does not fit SiT's contract: training_losses must return a "
                "per-sample loss that train.py backpropagates with .mean().backward(), and "
                "the lean step's ADR forward only runs inside out.backward() (outside the "
                "adapter's label handling); use ReflexFlowLoss(memory='lean') directly"
            )

    def label_dropout(self, model: Any) -> tuple[float, int | None, Any | None]:
        """(probability, null label, SiT LabelEmbedder or None) this adapter uses with model.

        Raises ValueError when labels would be dropped to a null class the model's label
        table does not have, or when num_classes disagrees with the model's.
        """
        embedder = sit_label_embedder(model)
        num_classes = self.num_classes
        if embedder is not None:
            if num_classes is not None and num_classes != embedder.num_classes:
                raise ValueError(
                    f"num_classes={num_classes} but the model's label embedder has "
                    f"num_classes={embedder.num_classes}"
                )
            num_classes = int(embedder.num_classes)
        prob = self.class_dropout_prob
        if prob is None:
            prob = float(embedder.dropout_prob) if embedder is not None else 0.0
        if prob > 0 and num_classes is None:
            raise ValueError(
                "class_dropout_prob > 0 needs num_classes (the null label's id): pass it, "
                "or use a model that exposes SiT's y_embedder"
            )
        if prob > 0 and embedder is not None:
            rows = embedder.embedding_table.num_embeddings
            if rows <= num_classes:
                raise ValueError(_no_null_row_message(rows, num_classes, prob))
        return prob, num_classes, embedder

    def training_losses(
        self,
        model: Callable[..., Tensor],
        x1: Tensor,
        model_kwargs: Mapping[str, Any] | None = None,
        *,
        generator: torch.Generator | None = None,
        **loss_kwargs: Any,
    ) -> dict[str, Any]:
        """SiT's signature: {"loss" (B,), "fc_loss", "adr_loss", "bias_norm", "t", "output"}.

        "loss" is the per-sample loss (``ReflexFlowOutput.per_sample_loss``), so
        ``loss_dict["loss"].mean()`` is L = L_FC + lambda_adr L_ADR; "fc_loss" and
        "adr_loss" are the two (detached) terms, "t" the rollout start times, "output"
        the full :class:`ReflexFlowOutput`. ``loss_kwargs`` (noise, t, k) go to the loss.
        """
        if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
            raise TypeError(
                f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}"
            )
        kwargs = dict(model_kwargs or {})
        prob, null_label, embedder = self.label_dropout(model)
        if prob > 0:
            if self.label_key not in kwargs:
                raise ValueError(f"model_kwargs has no {self.label_key!r} labels to drop")
            kwargs[self.label_key] = drop_labels(
                kwargs[self.label_key], prob, null_label, generator
            )
        with _model_label_dropout_off(embedder if prob > 0 else None):
            try:
                out: ReflexFlowOutput = self.loss_fn(
                    model, x1, model_kwargs=kwargs, generator=generator, **loss_kwargs
                )
            except IndexError as err:
                if prob > 0 and embedder is None:
                    raise ValueError(
                        f"the model failed with IndexError ({err}) on labels dropped to the "
                        f"null class {null_label}: its label table probably has no null row. "
                        + _NULL_ROW_ADVICE
                    ) from err
                raise
        return {
            "loss": out.per_sample_loss,
            "fc_loss": out.fc_loss,
            "adr_loss": out.adr_loss,
            "bias_norm": out.bias_norm,
            "t": out.t0,
            "output": out,
        }


_NULL_ROW_ADVICE = (
    "Either build the SiT model with class_dropout_prob > 0 (SiT's default 0.1, as its "
    "train.py does: the table then has the null row, and the adapter switches the model's "
    "own dropout off during its calls), or give the adapter class_dropout_prob=0 (no "
    "label dropout, no classifier-free guidance)."
)


def _no_null_row_message(rows: int, num_classes: int, prob: float) -> str:
    return (
        f"the adapter drops labels to the null class {num_classes} with probability {prob}, "
        f"but the model's label table (y_embedder.embedding_table) has {rows} rows: no null "
        f"row (SiT adds it only when the model's class_dropout_prob > 0). " + _NULL_ROW_ADVICE
    )


# --------------------------------------------------------------------------- diffusers

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
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
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
    Returns float64 sigmas (convention="noise_at_1").
    """

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
        if weighting_scheme == "logit_normal" and not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        if weighting_scheme == "mode" and not -1.0 <= mode_scale <= 2 / (math.pi - 2):
            raise ValueError(
                f"mode_scale must be in [-1, 2 / (pi - 2) = {2 / (math.pi - 2):.4f}] "
                f"(a density on [0, 1]), got {mode_scale}"
            )
        if sigmas is None:
            sigmas = scheduler_sigma_table(num_train_timesteps, shift, mu=mu)
        elif not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.numel() < 1:
            raise TypeError("sigmas must be a 1-D tensor (the scheduler's training sigmas)")
        elif bool(((sigmas < 0) | (sigmas > 1)).any()):
            raise ValueError("sigmas must lie in [0, 1]")
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
    with the rollout start sigmas (B,) (convention="noise_at_1"); the loss applies it as
    mean_i w_i mean ||v_i - u_i||^2, which is the scripts' weighted mean.
    """

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
    applies at inference: for training on the sigmas you will sample at.

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


class ShiftedSigmaSampler:
    """sigma = shift u / (1 + (shift - 1) u), u = sigmoid(mean + std z) (or U(0, 1)).

    The continuous form of FlowMatchEulerDiscreteScheduler's static shift (SD3: shift 3),
    as a ``time_sampler`` for convention="noise_at_1" (it draws sigma). The scripts'
    discrete draw is :class:`DiffusersSigmaSampler`.
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


def flux_pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, (H / 2)(W / 2), 4 C) tokens of 2x2 patches (Flux's packing)."""
    if x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"x must be (B, C, H, W) with even H and W, got {tuple(x.shape)}")
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def flux_unpack_latents(tokens: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`flux_pack_latents`: tokens back to ``like``'s (B, C, H, W)."""
    if like.dim() != 4 or like.shape[2] % 2 or like.shape[3] % 2:
        raise ValueError(f"like must be (B, C, H, W) with even H and W, got {tuple(like.shape)}")
    b, c, h, w = like.shape
    want = (b, (h // 2) * (w // 2), 4 * c)
    if tuple(tokens.shape) != want:
        raise ValueError(
            f"tokens must have shape {want} (2x2 patches of like's {tuple(like.shape)}), got "
            f"{tuple(tokens.shape)}"
        )
    out = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(b, c, h, w)


def flux_latent_image_ids(height: int, width: int, **tensor_kwargs: Any) -> Tensor:
    """Flux's img_ids for (C, height, width) latents: ((height / 2)(width / 2), 3) rows
    (0, row, column) of the 2x2-packed token grid. Not batch-shaped: give the loss
    ``unbatched_kwargs=("img_ids", "txt_ids")`` (diffusers_knobs("flux") does)."""
    for name, n in (("height", height), ("width", width)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n % 2:
            raise ValueError(f"{name} must be an even int >= 2 (latent pixels), got {n!r}")
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, **tensor_kwargs)
    ids[..., 1] += torch.arange(h, **tensor_kwargs)[:, None]
    ids[..., 2] += torch.arange(w, **tensor_kwargs)[None, :]
    return ids.reshape(h * w, 3)


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
