"""The objective's one contract (docs/method.md section 5): three types.

* :class:`ObjectiveSpec` (frozen): what is computed, the choices. Built once from the
  config (:meth:`ObjectiveSpec.from_config`), validated on construction.
* :class:`ObjectiveInputs`: the tensors of one step (model outputs, data, draws,
  optional targets and weights).
* :class:`ObjectiveTerms`: what comes back (the loss, its terms, per-sample rows).

``reference.objective(path, spec, inputs)`` and its Triton twin
``kernels.fused_objective(path, spec, inputs)`` take and return these types, so a new
option is one field here and one branch in each implementation. Fields carry their
documentation in ``metadata["help"]``, as Meta's flow_matching ``SchedulerOutput`` does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = [
    "ADR_LOSSES",
    "FC_FILTERS",
    "FC_FORMS",
    "FC_NORMALIZE",
    "FC_CHANNEL_REDUCE",
    "NORM_EPS",
    "NORM_FLOOR",
    "FCSpec",
    "ObjectiveSpec",
    "ObjectiveInputs",
    "ObjectiveTerms",
]

ADR_LOSSES = ("direction", "mse")
FC_FILTERS = ("gaussian", "box", "fft", "none")
FC_FORMS = ("weight", "squared")
FC_NORMALIZE = ("mean", "sum")  # the FC map's denominator: mean of m (ours) or sum (peers)
FC_CHANNEL_REDUCE = ("mean_abs", "l2")  # unsigned map: mean_c |delta| or ||delta||_c
NORM_EPS = 1e-6  # absolute lower bound of the per-sample norms in the direction loss
# |v1| is also bounded below by NORM_FLOOR * |v_adr|: a model whose output starts at zero
# (SiT/DiT zero-initialise their last layer) would otherwise see gradients ~ 1/NORM_EPS.
# 0.01 rather than 0.1: a larger floor also binds in normal training near t = 1, where
# |v_adr| = |x1 - x^| / (1 - t1) is large (docs/demo.md).
NORM_FLOOR = 0.01


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _number(name: str, value: Any, *, low: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or (value <= low if low_open else value < low):
        raise ValueError(
            f"{name} must be finite and {'>' if low_open else '>='} {low}, got {value!r}"
        )


@dataclass(frozen=True)
class FCSpec:
    """Frequency compensation: w = 1 + lambda_fc * LP(m) / (mean LP(m) + tiny)."""

    lambda_fc: float = field(default=1.0, metadata={"help": "weight of the FC map; 0: w = 1"})
    filter: str = field(
        default="gaussian", metadata={"help": "low-pass: gaussian, box, fft or none"}
    )
    sigma: float = field(default=2.0, metadata={"help": "gaussian sigma in pixels"})
    size: int = field(default=5, metadata={"help": "box window, odd"})
    cutoff: float = field(default=0.25, metadata={"help": "fft cutoff, fraction of Nyquist"})
    per_channel: bool = field(
        default=False, metadata={"help": "one map per channel instead of the channel mean"}
    )
    signed: bool = field(
        default=False, metadata={"help": "signed element-wise map, normalised by mean |m|"}
    )
    form: str = field(default="weight", metadata={"help": "weight: w r^2; squared: (w r)^2"})
    normalize: str = field(
        default="mean",
        metadata={
            "help": "m / (mean m + tiny) (mean) or m / max(sum m, 1e-6) (sum: SimpleTuner, "
            "takenoko; w - 1 of size 1/N)"
        },
    )
    channel_reduce: str = field(
        default="mean_abs",
        metadata={
            "help": "unsigned map: m = mean_c |delta| (mean_abs) or max(||delta||_c, 1e-6) "
            "(l2: takenoko)"
        },
    )
    adds_fm: bool = field(
        default=False,
        metadata={"help": "fc_i = mean r^2 + mean (w r)^2 on FC rows: FC on top of FM (takenoko)"},
    )

    def __post_init__(self) -> None:
        _number("lambda_fc", self.lambda_fc, low=0)
        _choice("fc_filter", self.filter, FC_FILTERS)
        _number("fc_sigma", self.sigma, low=0)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise TypeError(f"fc_size must be an int >= 1, got {self.size!r}")
        if self.size % 2 == 0:
            raise ValueError(f"fc_size must be odd, got {self.size}")
        _number("fc_cutoff", self.cutoff, low=0, low_open=True)
        if self.cutoff > 1:
            raise ValueError(f"fc_cutoff must be <= 1, got {self.cutoff!r}")
        _choice("fc_form", self.form, FC_FORMS)
        _choice("fc_normalize", self.normalize, FC_NORMALIZE)
        _choice("fc_channel_reduce", self.channel_reduce, FC_CHANNEL_REDUCE)
        if not isinstance(self.adds_fm, bool):
            raise TypeError(f"fc_adds_fm must be a bool, got {self.adds_fm!r}")

    @property
    def is_default_form(self) -> bool:
        """normalize, channel_reduce and adds_fm at their defaults (what the kernels do)."""
        return (self.normalize, self.channel_reduce, self.adds_fm) == ("mean", "mean_abs", False)


@dataclass(frozen=True)
class ObjectiveSpec:
    """L = L_FC + lambda_adr * L_ADR: every choice of the objective, validated once."""

    lambda_adr: float = field(default=10.0, metadata={"help": "weight of the ADR term"})
    adr_loss: str = field(
        default="direction",
        metadata={"help": "mse: mean (v1 - v_adr)^2; direction: ||v1/|v1| - v_adr/|v_adr|||^2"},
    )
    fc: FCSpec = field(default_factory=FCSpec, metadata={"help": "frequency compensation"})
    norm_eps: float = field(
        default=NORM_EPS, metadata={"help": "lower bound of the direction loss's norms"}
    )
    norm_floor: float = field(
        default=NORM_FLOOR,
        metadata={"help": "direction loss: |v1| bounded below by norm_floor * |v_adr|"},
    )
    adr_target_grad: bool = field(
        default=False,
        metadata={
            "help": "v_adr keeps its gradient (through x^_t1 into v(x_t0, t0) with "
            "rollout_grad: Arioso); default detached"
        },
    )

    def __post_init__(self) -> None:
        _number("lambda_adr", self.lambda_adr, low=0)
        _choice("adr_loss", self.adr_loss, ADR_LOSSES)
        if not isinstance(self.fc, FCSpec):
            raise TypeError(f"fc must be an FCSpec, got {type(self.fc).__name__}")
        _number("norm_eps", self.norm_eps, low=0, low_open=True)
        _number("norm_floor", self.norm_floor, low=0)
        if not isinstance(self.adr_target_grad, bool):
            raise TypeError(f"adr_target_grad must be a bool, got {self.adr_target_grad!r}")

    @property
    def reference_only(self) -> bool:
        """True when an option the fused kernels do not implement is not at its default
        (fc normalize / channel_reduce / adds_fm, adr_target_grad): such a spec runs on
        :func:`reflexflow.reference.objective` whatever the backend."""
        return self.adr_target_grad or not self.fc.is_default_form

    @classmethod
    def from_config(cls, cfg: Any) -> ObjectiveSpec:
        """The objective's choices from a :class:`reflexflow.config.ReflexFlowConfig`."""
        return cls(
            lambda_adr=float(cfg.lambda_adr),
            adr_loss=cfg.adr_loss,
            fc=FCSpec(
                lambda_fc=float(cfg.lambda_fc),
                filter=cfg.fc_filter,
                sigma=float(cfg.fc_sigma),
                size=int(cfg.fc_size),
                cutoff=float(cfg.fc_cutoff),
                per_channel=bool(cfg.fc_per_channel),
                signed=bool(cfg.fc_signed),
                form=cfg.fc_form,
                normalize=cfg.fc_normalize,
                channel_reduce=cfg.fc_channel_reduce,
                adds_fm=bool(cfg.fc_adds_fm),
            ),
            norm_eps=float(cfg.norm_eps),
            norm_floor=float(cfg.norm_floor),
            adr_target_grad=bool(cfg.adr_target_grad),
        )

    def replace(self, **changes: Any) -> ObjectiveSpec:
        """A copy with ``changes`` (``fc=`` an FCSpec, or ``fc_<field>=`` one FC field)."""
        fc_changes = {k[3:]: changes.pop(k) for k in list(changes) if k.startswith("fc_")}
        if fc_changes:
            changes["fc"] = dataclasses.replace(changes.get("fc", self.fc), **fc_changes)
        return dataclasses.replace(self, **changes)


@dataclass
class ObjectiveInputs:
    """The tensors of one step, canonical convention; (B,) rows, (B, *S) samples.

    Either v0 (and v1) or v_joint. v1 None: no ADR term. v1 is v0 (the same tensor): one
    call serves both terms (fm_input "biased").
    """

    x1: Tensor = field(metadata={"help": "(B, *S) data"})
    eps: Tensor = field(metadata={"help": "(B, *S) noise of the path"})
    x_hat: Tensor = field(metadata={"help": "(B, *S) rolled-out state x^_t1, detached"})
    t0: Tensor = field(metadata={"help": "(B,) time of the FM term's call"})
    t1: Tensor = field(metadata={"help": "(B,) time of the ADR term's call"})
    k: Tensor = field(metadata={"help": "(B,) int64 rollout lengths, 0: not rolled out"})
    v0: Tensor | None = field(default=None, metadata={"help": "v(x_t0, t0), with grad"})
    v1: Tensor | None = field(default=None, metadata={"help": "v(x^_t1, t1), with grad"})
    v_joint: Tensor | None = field(
        default=None, metadata={"help": "(2B, *S): v0 and v1 from one call"}
    )
    fc_active: Tensor | None = field(
        default=None, metadata={"help": "(B,) bool rows with an FC map; default k > 0"}
    )
    fc_delta: Tensor | None = field(
        default=None, metadata={"help": "bias driving FC; default x^_t1 - x_t1"}
    )
    fm_weight: Tensor | None = field(
        default=None, metadata={"help": "(B,) per-sample weight of the FM term"}
    )
    adr_weight: Tensor | None = field(
        default=None, metadata={"help": "(B,) per-sample weight of the ADR term"}
    )
    u0: Tensor | None = field(default=None, metadata={"help": "FM target; default u_t0"})
    v_adr: Tensor | None = field(
        default=None, metadata={"help": "ADR target; default u_t1 + (s'/s)(t1) delta"}
    )

    @property
    def batch(self) -> int:
        return self.x1.shape[0]

    def model_outputs(self) -> tuple[Tensor, Tensor | None]:
        """(v0, v1), splitting v_joint; ValueError when neither or both forms are given."""
        if self.v_joint is not None:
            if self.v0 is not None or self.v1 is not None:
                raise ValueError("pass either v_joint or v0/v1, not both")
            v0, v1 = self.v_joint.chunk(2)
            return v0, v1
        if self.v0 is None:
            raise ValueError("v0 (or v_joint) is required")
        return self.v0, self.v1


@dataclass
class ObjectiveTerms:
    """What the objective returns. per_sample.mean() equals loss up to float rounding."""

    loss: Tensor = field(metadata={"help": "scalar, differentiable"})
    fc_loss: Tensor = field(metadata={"help": "L_FC = mean_i fc_i"})
    per_sample: Tensor = field(metadata={"help": "(B,) fc_i + lambda_adr adr_i"})
    adr_loss: Tensor | None = field(default=None, metadata={"help": "L_ADR; None without v1"})
    w: Tensor | None = field(default=None, metadata={"help": "FC map; None when lambda_fc = 0"})
    v_adr: Tensor | None = field(
        default=None, metadata={"help": "the ADR target used (reference only)"}
    )
    delta: Tensor | None = field(default=None, metadata={"help": "x^_t1 - x_t1 (reference only)"})


__all__ += ["FLOW_MATCHING", "TERM_NAMES"]

# The flow-matching term alone: L = mean (v0 - u0)^2 (weighted per sample when fm_weight
# is given). fm, ip and ss are this objective on their own (v, u) pair.
FLOW_MATCHING = ObjectiveSpec(lambda_adr=0.0, fc=FCSpec(lambda_fc=0.0))

# ObjectiveTerms' tensor fields, in order (the legacy dict keys of the keyword API)
TERM_NAMES = tuple(f.name for f in dataclasses.fields(ObjectiveTerms))
