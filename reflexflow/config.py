"""Validated configuration of the ReflexFlow loss: every knob, its default and its source.

See the README's defaults table for where each default comes from (DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .conventions import check_convention
from .paths import get_path
from .reference import FILTERS, NORM_EPS, NORM_FLOOR
from .time_sampling import get_time_sampler

__all__ = ["ReflexFlowConfig", "METHODS", "BACKENDS"]

METHODS = ("reflexflow", "fm", "ip", "ss")
BACKENDS = ("auto", "torch", "triton")
K_DRAWS = ("fixed", "uniform")
SCHEDULES = ("grid", "single")
FC_SOURCES = ("state", "velocity")
ADR_LOSSES = ("direction", "mse")


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
    """All knobs of the loss (DESIGN.md sections 1 to 6), validated on construction."""

    method: str = "reflexflow"
    path: Any = "linear"
    convention: str = "data_at_1"
    timestep_scale: float = 1.0
    rollout_steps: int = 1  # K
    num_sampling_steps: int = 50  # N, inference steps: h = 1 / N
    k_draw: str = "uniform"
    step_schedule: str = "grid"
    ss_prob: float = 1.0
    t_eps: float = 1e-3
    time_sampler: Any = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    adr_loss: str = "direction"
    lambda_adr: float = 10.0
    lambda_fc: float = 1.0
    fc_filter: str = "gaussian"
    fc_sigma: float = 2.0
    fc_size: int = 5
    fc_cutoff: float = 0.25
    fc_per_channel: bool = False
    fc_t_max: float | None = None
    fc_source: str = "state"
    norm_eps: float = NORM_EPS
    norm_floor: float = NORM_FLOOR
    rollout_grad: bool = False
    joint_forward: bool | None = None
    ip_gamma: float = 0.1
    backend: str = "auto"
    cuda_graph: bool = False  # capture fixed-k rollouts on CUDA as CUDA graphs
    check_finite: bool = False

    def __post_init__(self) -> None:
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
            "time_sampler",
            get_time_sampler(
                self.time_sampler, logit_mean=self.logit_mean, logit_std=self.logit_std
            ),
        )
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
        _check_number("norm_eps", self.norm_eps, low=0, low_open=True)
        _check_number("norm_floor", self.norm_floor, low=0, high=1)
        _check_number("ip_gamma", self.ip_gamma, low=0)
        _check_choice("backend", self.backend, BACKENDS)
        for name in ("fc_per_channel", "rollout_grad", "check_finite"):
            _check_bool(name, getattr(self, name))
        _check_bool("joint_forward", self.joint_forward, optional=True)
        if not isinstance(self.cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {self.cuda_graph!r}")
        if self.step_schedule == "grid" and self.rollout_steps * self.step >= 1 - self.t_eps:
            raise ValueError(
                f"rollout_steps={self.rollout_steps} Euler steps of h = 1/num_sampling_steps = "
                f"{self.step:.4g} do not fit before t = 1 - t_eps = {1 - self.t_eps}"
            )
        if self.rollout_grad:
            if self.step_schedule == "grid" and self.rollout_steps != 1:
                raise ValueError(
                    "rollout_grad needs one Euler step per rollout: use "
                    "step_schedule='single' or rollout_steps=1"
                )
            if self.joint_forward:
                raise ValueError(
                    "joint_forward=True is impossible with rollout_grad=True: the second "
                    "model call's input depends on the first call's output"
                )
        if self.joint_forward is None:
            object.__setattr__(self, "joint_forward", not self.rollout_grad)

    @property
    def step(self) -> float:
        """Inference Euler step h = 1 / num_sampling_steps."""
        return 1.0 / self.num_sampling_steps

    @property
    def uses_rollout(self) -> bool:
        return self.method in ("ss", "reflexflow")

    def replace(self, **changes: Any) -> ReflexFlowConfig:
        return dataclasses.replace(self, **changes)


def config_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ReflexFlowConfig))
