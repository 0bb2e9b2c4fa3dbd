"""Named readings of ReflexFlow / DEFAR: each preset is data, a set of knob values.

The papers' method sections are not public as text; what is public is summarised in
docs/method.md ("The public readings"). Every preset below fixes the knobs that define
*what is trained* (rollout, the two terms, their targets and weights); knobs that only
change *how it runs* (path, convention, backend, forward mode, memory mode, CUDA graphs)
are never part of a preset. Any field can be overridden:
``ReflexFlowLoss(preset="arioso", lambda_adr=0.5)``.

Where a source leaves a value open, the preset says so in :data:`SOURCES` and the value
is the library's choice, with its reason.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

__all__ = ["PRESETS", "SOURCES", "PRESET_FIELDS", "DEFAULT_PRESET", "preset_knobs", "describe"]

DEFAULT_PRESET = "defar"

# The knobs a preset sets (every preset sets all of them, so presets never mix).
PRESET_FIELDS = (
    "method",
    "rollout_steps",
    "num_sampling_steps",
    "k_draw",
    "step_schedule",
    "ss_prob",
    "rollout_grad",
    "fm_input",
    "adr_loss",
    "lambda_adr",
    "lambda_fc",
    "fc_source",
    "fc_signed",
    "fc_form",
    "fc_filter",
    "fc_sigma",
    "fc_per_channel",
    "fc_t_max",
    "target",
)

_COMMON: dict[str, Any] = {
    "method": "reflexflow",
    "k_draw": "uniform",
    "ss_prob": 1.0,
    "rollout_grad": False,
    "fm_input": "clean",
    "fc_signed": False,
    "fc_form": "weight",
    "fc_filter": "gaussian",
    "fc_sigma": 2.0,
    "fc_per_channel": False,
    "fc_t_max": None,
    "target": "conditional",
}

PRESETS: MappingProxyType = MappingProxyType(
    {
        # The authors' own latest description (DEFAR overview figure, ECCV 2026 README).
        "defar": MappingProxyType(
            {
                **_COMMON,
                "rollout_steps": 1,
                "num_sampling_steps": 50,
                "step_schedule": "grid",
                "adr_loss": "mse",
                "lambda_adr": 1.0,
                "lambda_fc": 1.0,
                "fc_source": "velocity",
            }
        ),
        # A public reimplementation of DEFAR's Algorithm 1.
        "arioso": MappingProxyType(
            {
                **_COMMON,
                "rollout_steps": 1,
                "num_sampling_steps": 50,
                "step_schedule": "single",
                "rollout_grad": True,
                "adr_loss": "direction",
                "lambda_adr": 1.0,
                "lambda_fc": 0.0,
                "fc_source": "state",
            }
        ),
        # SimpleTuner's reading of ReflexFlow v1 (scheduled sampling over training steps).
        "simpletuner": MappingProxyType(
            {
                **_COMMON,
                "rollout_steps": 4,
                "num_sampling_steps": 1000,
                "step_schedule": "grid",
                "fm_input": "biased",
                "adr_loss": "direction",
                "lambda_adr": 10.0,
                "lambda_fc": 1.0,
                "fc_source": "velocity",
                "fc_signed": True,
                "fc_form": "squared",
                "fc_filter": "none",
            }
        ),
        # The library's own earlier default (before the DEFAR figure was public).
        "grid-direction": MappingProxyType(
            {
                **_COMMON,
                "rollout_steps": 1,
                "num_sampling_steps": 50,
                "step_schedule": "grid",
                "adr_loss": "direction",
                "lambda_adr": 10.0,
                "lambda_fc": 1.0,
                "fc_source": "state",
            }
        ),
    }
)

SOURCES: MappingProxyType = MappingProxyType(
    {
        "defar": (
            "DEFAR (arXiv 2606.28226, ECCV 2026), the authors' overview figure: a one-step "
            "inference simulation from x_t0 with the predicted v(x_t0, t0); MSE between "
            "v(x^_t1, t1) and the anti-drift target; FC-reweighted FM at t0 with the bias "
            "taken in velocity space at t1 (its gain is shown at high noise, t < 0.3). Open "
            "in the source, the library's choices: the step is one step of the inference "
            "sampler (h = 1/num_sampling_steps, N = 50 as SiT's ODE sampler); lambda_adr = 1 "
            "(the mse target has the FM target's scale); lambda_fc = 1 and a gaussian "
            "low-pass (sigma 2 px) of the channel-mean |bias| as in the v1 paper's FC; FC "
            "everywhere (fc_t_max None). Velocity-space FC costs one extra no-grad forward "
            "at x_t1 per step."
        ),
        "arioso": (
            "Arioso's reimplementation of DEFAR's Algorithm 1: one Euler step t0 -> t1 = t0 "
            "+ (1 - t0) U(0, 1) whose gradient flows through v(x_t0, t0) (rollout_grad); "
            "direction ADR with weight 1 (its notes call 10 'a different scale' and sweep "
            "0.5 to 10); plain FM at t0; no FC."
        ),
        "simpletuner": (
            "SimpleTuner's scheduled sampling with ReflexFlow (reads ReflexFlow v1): Euler "
            "over a few training timesteps without gradient, direction ADR with beta1 = 10, "
            "FM on the biased input against u_t1 with the same prediction, FC from the "
            "velocity-space bias (biased vs clean prediction) normalised over all elements, "
            "no filter, applied as (w r)^2, alpha = beta2 = 1. Open in the source (its "
            "max_step_offset is the user's choice; its docs' example is 10): the library "
            "takes up to 4 training timesteps of 1/1000 (num_sampling_steps = 1000, "
            "rollout_steps = 4, k ~ U{1..4}, span <= 0.004) and the signed map. SimpleTuner "
            "rolls out with Heun or UniPC by default; the library rolls out with Euler."
        ),
        "grid-direction": (
            "reflexflow's default before DEFAR's figure was public (a third party's reading "
            "of ReflexFlow v1): k ~ U{1..K} Euler steps of the inference step h = 1/50, "
            "direction ADR x10, gaussian FC of the state-space bias."
        ),
    }
)


def preset_knobs(name: str) -> dict[str, Any]:
    """The knob values of preset ``name`` (a fresh dict: modify it freely)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return dict(PRESETS[name])


def describe(name: str) -> str:
    """Where preset ``name``'s values come from, and which ones are the library's choice.

    Returns the text (it prints nothing): ``print(reflexflow.presets.describe("defar"))``.
    """
    preset_knobs(name)  # validates the name
    return SOURCES[name]
