"""Validated configuration of the ReflexFlow loss: every knob, its default and its source.

Knobs that define what is trained come from a named preset (:mod:`reflexflow.presets`;
default "defar") unless given; the rest have fixed defaults. See the README's knob
table for where each default comes from.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .config_checks import check_rollout_modules, check_user_objects, warn_ignored_knobs
from .conventions import check_convention
from .paths import get_path
from .presets import DEFAULT_PRESET, PRESET_FIELDS, PRESETS, preset_knobs
from .reference import FILTERS, NORM_EPS, NORM_FLOOR
from .time_sampling import get_time_sampler
from .weighting import check_loss_weighting

__all__ = ["ReflexFlowConfig", "METHODS", "BACKENDS", "FROM_PRESET"]

METHODS = ("reflexflow", "fm", "ip", "ss")
BACKENDS = ("auto", "torch", "triton")
K_DRAWS = ("fixed", "uniform")
SCHEDULES = ("grid", "single")
FC_SOURCES = ("state", "velocity")
ADR_LOSSES = ("direction", "mse")
FM_INPUTS = ("clean", "biased")
FC_FORMS = ("weight", "squared")
TARGETS = ("conditional", "stable")
ROLLOUT_MODES = ("eval", "train")
MEMORY_MODES = ("default", "lean")


# Default of a knob that the preset sets (see :data:`reflexflow.presets.PRESETS`): the
# Ellipsis, a constant torch.compile traces through when a config is built in a graph.
FROM_PRESET: Any = ...


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_bool(name: str, value: Any, *, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        expected = "a bool or None" if optional else "a bool"
        raise TypeError(f"{name} must be {expected}, got {value!r}")


def _check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ReflexFlowConfig:
    """All knobs of the loss (docs/method.md), validated on construction.

    The knobs listed in :data:`reflexflow.presets.PRESET_FIELDS` default to the values
    of ``preset`` (default "defar"); a knob given explicitly overrides its preset value.
    ``explicit`` records which preset knobs were given. The forward mode is resolved into
    ``shares_first_call`` and ``joint_call`` (see ``_resolve_forward_mode``), the time
    sampler into ``sampler``. Copy a config with :meth:`replace` (``dataclasses.replace``
    would keep the old preset's values of the knobs that follow the preset).
    """

    preset: str = DEFAULT_PRESET
    method: str = FROM_PRESET
    path: Any = "linear"
    convention: str = "data_at_1"
    timestep_scale: float = 1.0
    rollout_steps: int = FROM_PRESET  # K
    num_sampling_steps: int = FROM_PRESET  # N, inference steps: h = 1 / N
    k_draw: str = FROM_PRESET
    step_schedule: str = FROM_PRESET
    ss_prob: float = FROM_PRESET
    t_eps: float = 1e-3
    time_sampler: Any = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    fm_input: str = FROM_PRESET
    adr_loss: str = FROM_PRESET
    lambda_adr: float = FROM_PRESET
    lambda_fc: float = FROM_PRESET
    fc_filter: str = FROM_PRESET
    fc_sigma: float = FROM_PRESET
    fc_size: int = 5
    fc_cutoff: float = 0.25
    fc_per_channel: bool = FROM_PRESET
    fc_signed: bool = FROM_PRESET
    fc_form: str = FROM_PRESET
    fc_t_max: float | None = FROM_PRESET
    fc_source: str = FROM_PRESET
    target: str = FROM_PRESET
    stable_ref: int = 0  # extra reference samples kept from recent batches (target="stable")
    stable_gather: bool = False  # all-gather the batch across ranks for the reference set
    loss_weighting: Any = None  # None, "none", "sigma_sqrt", "cosmap" or a callable of t
    weight_adr: bool = False  # also weight the ADR term (at t1) by loss_weighting
    norm_eps: float = NORM_EPS
    norm_floor: float = NORM_FLOOR
    rollout_grad: bool = FROM_PRESET
    rollout_mode: str = "eval"
    rollout_modules: tuple = ()  # modules the model callable runs that the loss cannot see
    share_first_call: bool | None = None
    joint_forward: bool | None = None
    memory: str = "default"
    unbatched_kwargs: tuple[str, ...] = ()
    ip_gamma: float = 0.1
    backend: str = "auto"
    cuda_graph: bool = False  # capture fixed-k rollouts on CUDA as CUDA graphs
    check_finite: bool = False
    # resolved on construction (not arguments): the preset knobs given explicitly, and
    # the forward mode (see _resolve_forward_mode)
    explicit: frozenset = dataclasses.field(init=False, compare=False, repr=False)
    shares_first_call: bool = dataclasses.field(init=False, compare=False, repr=False)
    joint_call: bool = dataclasses.field(init=False, compare=False, repr=False)
    # the time sampler built from time_sampler, logit_mean and logit_std
    sampler: Any = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.preset, str) or self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        given = {f for f in PRESET_FIELDS if getattr(self, f) is not FROM_PRESET}
        for name, value in preset_knobs(self.preset).items():
            if name not in given:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "explicit", frozenset(given))
        self._validate_knobs()
        self._resolve_forward_mode()

    def _validate_knobs(self) -> None:
        _check_choice("method", self.method, METHODS)
        object.__setattr__(self, "path", get_path(self.path))
        check_convention(self.convention)
        _check_number("timestep_scale", self.timestep_scale, low=0, low_open=True)
        _check_number("rollout_steps", self.rollout_steps, low=1, integer=True)
        _check_number("num_sampling_steps", self.num_sampling_steps, low=1, integer=True)
        _check_choice("k_draw", self.k_draw, K_DRAWS)
        _check_choice("step_schedule", self.step_schedule, SCHEDULES)
        _check_number("ss_prob", self.ss_prob, low=0, high=1)
        _check_number("t_eps", self.t_eps, low=0, high=0.5, low_open=True)
        object.__setattr__(
            self,
            "sampler",
            get_time_sampler(
                self.time_sampler, logit_mean=self.logit_mean, logit_std=self.logit_std
            ),
        )
        _check_choice("fm_input", self.fm_input, FM_INPUTS)
        _check_choice("adr_loss", self.adr_loss, ADR_LOSSES)
        _check_number("lambda_adr", self.lambda_adr, low=0)
        _check_number("lambda_fc", self.lambda_fc, low=0)
        _check_choice("fc_filter", self.fc_filter, FILTERS)
        _check_number("fc_sigma", self.fc_sigma, low=0)
        _check_number("fc_size", self.fc_size, low=1, integer=True)
        if self.fc_size % 2 == 0:
            raise ValueError(f"fc_size must be odd, got {self.fc_size}")
        _check_number("fc_cutoff", self.fc_cutoff, low=0, high=1, low_open=True)
        if self.fc_t_max is not None:
            _check_number("fc_t_max", self.fc_t_max, low=0, high=1)
        _check_choice("fc_source", self.fc_source, FC_SOURCES)
        _check_choice("fc_form", self.fc_form, FC_FORMS)
        _check_choice("target", self.target, TARGETS)
        _check_number("stable_ref", self.stable_ref, low=0, integer=True)
        object.__setattr__(self, "loss_weighting", check_loss_weighting(self.loss_weighting))
        _check_number("norm_eps", self.norm_eps, low=0, low_open=True)
        _check_number("norm_floor", self.norm_floor, low=0, high=1)
        _check_choice("rollout_mode", self.rollout_mode, ROLLOUT_MODES)
        _check_choice("memory", self.memory, MEMORY_MODES)
        _check_number("ip_gamma", self.ip_gamma, low=0)
        _check_choice("backend", self.backend, BACKENDS)
        for name in (
            "fc_per_channel",
            "fc_signed",
            "rollout_grad",
            "check_finite",
            "cuda_graph",
            "stable_gather",
            "weight_adr",
        ):
            _check_bool(name, getattr(self, name))
        for name in ("joint_forward", "share_first_call"):
            _check_bool(name, getattr(self, name), optional=True)
        keys = self.unbatched_kwargs
        if isinstance(keys, str) or not isinstance(keys, (tuple, list)):
            raise TypeError(f"unbatched_kwargs must be a tuple of keys, got {keys!r}")
        if not all(isinstance(key, str) for key in keys):
            raise TypeError(f"unbatched_kwargs must hold strings (model_kwargs keys), got {keys!r}")
        object.__setattr__(self, "unbatched_kwargs", tuple(keys))
        if self.step_schedule == "grid" and self.rollout_steps * self.step >= 1 - self.t_eps:
            raise ValueError(
                f"rollout_steps={self.rollout_steps} Euler steps of h = 1/num_sampling_steps = "
                f"{self.step:.4g} do not fit before t = 1 - t_eps = {1 - self.t_eps}"
            )
        if self.rollout_grad and self.step_schedule == "grid" and self.rollout_steps != 1:
            raise ValueError(
                "rollout_grad needs one Euler step per rollout: use "
                "step_schedule='single' or rollout_steps=1"
            )
        if self.target == "stable" and self.method == "ip":
            raise ValueError("target='stable' is defined for method fm, ss and reflexflow, not ip")
        # user objects and environment (reflexflow.config_checks)
        object.__setattr__(self, "rollout_modules", check_rollout_modules(self.rollout_modules))
        check_user_objects(self)

    def _resolve_forward_mode(self) -> None:
        """How the gradient-carrying model calls run: ``shares_first_call`` and ``joint_call``.

        The FM term's call v(x_t0, t0) is also the rollout's first step. By default
        (share_first_call None) it is computed once, with grad, and the rollout continues
        from its detached value, wherever that is exact: method "reflexflow" with a
        rollout, fm_input "clean" and rollout_grad off. joint_forward=True asks instead for
        v(x_t0, t0) and v(x^_t1, t1) as one 2B call after a full no-grad rollout;
        share_first_call=False (joint_forward unset) for two separate calls after it.
        """
        can_share = (
            self.rolls_out and self.method == "reflexflow" and self.fm_input == "clean"
        ) and not self.rollout_grad
        two_calls = (
            self.method == "reflexflow" and self.lambda_adr != 0 and self.fm_input == "clean"
        )
        if self.rollout_grad and self.joint_forward:
            raise ValueError(
                "joint_forward=True is impossible with rollout_grad=True: the second "
                "model call's input depends on the first call's output"
            )
        if self.share_first_call and not can_share:
            raise ValueError(
                "share_first_call=True needs method='reflexflow' with a rollout, "
                "fm_input='clean' and rollout_grad=False (with rollout_grad the first call "
                "is shared already, and carries both gradients)"
            )
        if self.share_first_call and self.joint_forward:
            raise ValueError(
                "share_first_call=True and joint_forward=True exclude each other: the shared "
                "call runs before the rollout, the joint 2B call after it"
            )
        if self.joint_forward and not two_calls:
            raise ValueError(
                "joint_forward=True needs two gradient-carrying calls (method='reflexflow', "
                "lambda_adr > 0, fm_input='clean')"
            )
        if self.share_first_call is not None:
            share = self.share_first_call
        else:
            share = can_share and not self.joint_forward
        object.__setattr__(self, "shares_first_call", bool(share))
        object.__setattr__(self, "joint_call", bool(self.joint_forward))
        if self.memory == "lean":
            if self.rollout_grad:
                raise ValueError(
                    "memory='lean' needs independent terms; with rollout_grad=True the ADR "
                    "gradient flows into the first call"
                )
            if self.joint_forward:
                raise ValueError("memory='lean' runs the two terms apart: not joint_forward")
            if self.method == "reflexflow" and self.fm_input == "biased":
                raise ValueError(
                    "memory='lean' has nothing to split with fm_input='biased' (both terms "
                    "use the same model call)"
                )
        warn_ignored_knobs(self)  # knobs given explicitly that this configuration never reads

    @property
    def step(self) -> float:
        """Inference Euler step h = 1 / num_sampling_steps."""
        return 1.0 / self.num_sampling_steps

    @property
    def uses_rollout(self) -> bool:
        """The method has a rollout (ss, reflexflow): k may be > 0."""
        return self.method in ("ss", "reflexflow")

    @property
    def rolls_out(self) -> bool:
        """A rollout runs: ss, or reflexflow with an ADR or FC term (with lambda_adr =
        lambda_fc = 0 the loss is plain FM at t0, and k is 0)."""
        return self.uses_rollout and (
            self.method == "ss" or self.lambda_adr != 0 or self.lambda_fc != 0
        )

    @property
    def max_rollout_steps(self) -> int:
        """The longest rollout: 1 for the single-step schedule, else rollout_steps."""
        return 1 if self.step_schedule == "single" else self.rollout_steps

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ReflexFlowConfig:
        """The knobs of preset ``name`` with ``overrides`` on top."""
        return cls(preset=name, **overrides)

    def replace(self, **changes: Any) -> ReflexFlowConfig:
        """A copy with ``changes``. Preset knobs that were never given explicitly (here or
        when this config was built) follow the (possibly new) preset."""
        explicit = set(self.explicit) | (set(changes) & set(PRESET_FIELDS))
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        for name in PRESET_FIELDS:
            if name not in explicit:
                kwargs[name] = FROM_PRESET
        kwargs.update(changes)
        return ReflexFlowConfig(**kwargs)


def config_fields() -> tuple[str, ...]:
    """The knob names ReflexFlowConfig takes as arguments."""
    return tuple(f.name for f in dataclasses.fields(ReflexFlowConfig) if f.init)
