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

from .objective import NORM_EPS, NORM_FLOOR
from .time_sampling import ShiftedLogitNormalTime

__all__ = ["PRESETS", "SOURCES", "PRESET_FIELDS", "DEFAULT_PRESET", "preset_knobs", "describe"]

DEFAULT_PRESET = "defar"

# The knobs a preset sets (every preset sets all of them, so presets never mix).
PRESET_FIELDS = (
    "method",
    "rollout_steps",
    "num_sampling_steps",
    "k_draw",
    "k_min",
    "time_draw",
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
    "fc_normalize",
    "fc_channel_reduce",
    "fc_adds_fm",
    "target",
    "adr_target_grad",
    "adr_x1_from",
    "norm_eps",
    "norm_floor",
    "biased_input",
    "time_sampler",
)

# takenoko's trainer draw of t0 (its timestep_sampling "shift", discrete_flow_shift 3): a
# noise-ward sigma, whatever the loss's convention
TAKENOKO_TIME = ShiftedLogitNormalTime(3.0, convention="noise_at_1")

_COMMON: dict[str, Any] = {
    "method": "reflexflow",
    "k_draw": "uniform",
    "k_min": 1,
    "time_draw": "start",
    "ss_prob": 1.0,
    "rollout_grad": False,
    "fm_input": "clean",
    "fc_signed": False,
    "fc_form": "weight",
    "fc_filter": "gaussian",
    "fc_sigma": 2.0,
    "fc_per_channel": False,
    "fc_t_max": None,
    "fc_normalize": "mean",
    "fc_channel_reduce": "mean_abs",
    "fc_adds_fm": False,
    "target": "conditional",
    "adr_target_grad": False,
    "adr_x1_from": None,
    "norm_eps": NORM_EPS,
    "norm_floor": NORM_FLOOR,
    "biased_input": "rollout",
    "time_sampler": "uniform",
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
                "adr_x1_from": 0.9,
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
                "adr_target_grad": True,
                "norm_eps": 1e-8,
                "norm_floor": 0.0,
            }
        ),
        # SimpleTuner's reading of ReflexFlow v1 (scheduled sampling over training steps).
        "simpletuner": MappingProxyType(
            {
                **_COMMON,
                "rollout_steps": 10,
                "num_sampling_steps": 1000,
                "k_min": 0,
                "time_draw": "end",
                "step_schedule": "grid",
                "time_sampler": "logit_normal",
                "fm_input": "biased",
                "adr_loss": "direction",
                "lambda_adr": 10.0,
                "lambda_fc": 1.0,
                "fc_source": "velocity",
                "fc_signed": True,
                "fc_form": "weight",
                "fc_filter": "none",
                "fc_normalize": "sum",
                "norm_floor": 0.0,
            }
        ),
        # takenoko's ReflexFlow: no rollout; the input re-noised at an independent time.
        "takenoko": MappingProxyType(
            {
                **_COMMON,
                "rollout_steps": 1,
                "num_sampling_steps": 50,
                "step_schedule": "grid",
                "biased_input": "renoise",
                "time_sampler": TAKENOKO_TIME,
                "fm_input": "biased",
                "adr_loss": "direction",
                "lambda_adr": 10.0,
                "lambda_fc": 1.0,
                "fc_source": "velocity",
                "fc_filter": "none",
                "fc_form": "squared",
                "fc_normalize": "sum",
                "fc_channel_reduce": "l2",
                "fc_adds_fm": True,
                "norm_floor": 0.0,
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
            "Arioso (escapeprograms/Arioso@1af393b), DEFAR's Algorithm 1 in Arioso/augment.py "
            "(sample_t1, adr_per_sample), Arioso/train.py (the step) and "
            "Arioso/configs/7-9-adr.yaml: t0 ~ U(0, 1) (torch.rand), t1 = t0 + (1 - t0) U(0, 1) "
            "(the library: t0 = u (1 - t_eps), t1 <= 1 - t_eps, within t_eps of Arioso's on the "
            "same uniforms); one Euler step x^ = x_t0 + (t1 - t0) v(x_t0, t0) whose graph is "
            "kept (rollout_grad); direction ADR on v(x^, t1), fp32 norms clamped at 1e-8 and no "
            "floor, weight adr_beta = 1 (its default 0 is off; its notes sweep 0.5 to 10); "
            "plain FM at t0; no FC. Its ADR target x1 - (1 - sigma) x^ (the library's v_adr "
            "times s(t1) on its path x_t = (1 - (1 - 1e-4) t) x0 + t x1: the same direction) "
            "is NOT detached, so the ADR gradient also flows through the target into "
            "v(x_t0, t0). As shipped this preset detaches the target and floors |v1| at "
            "0.01 |v_adr|: on the fixture (tests/data/peers/arioso.json) the loss agrees to "
            "6e-8 where the floor does not bind, the gradients differ by 29%; the knobs that "
            "close the gap (adr_target_grad, norm_floor 0) are listed in docs/peer-readings.md."
        ),
        "simpletuner": (
            "SimpleTuner (bghira/SimpleTuner@bc8e6ab, which contains PR 2156's ADR sign fix). "
            "Draws (helpers/scheduled_sampling/plan.py:build_rollout_schedule, "
            "models/common.py:sample_flow_sigmas): the END sigma = sigmoid(N(0, 1)) (then "
            "flow_schedule_shift), end index int(1000 sigma), k ~ U{0..M} per sample "
            "(max_step_offset M, the user's; its docs' example 10; each sample rolls out with "
            "scheduled_sampling_probability, default 0.0, so by default nothing rolls out), "
            "start index min(end + k, 999). Rollout (scheduled_sampling/rollout.py:"
            "_apply_flow_matching_rollout): plain Euler for flow-matching models (its "
            "unipc/euler/dpm sampler setting serves eps and v models only), batch-1 calls "
            "without gradient, states on a 1/999 grid while the model is called with "
            "timestep t (t/1000): a slip the library does not copy; one more no-grad call at "
            "the end state (biased prediction) and one at the original noisy input (clean "
            "prediction, at the continuous drawn sigma). Loss (models/common.py:"
            "ModelFoundation.loss): the FM mse on the biased input against noise - latents, "
            "computed in float32, times w = 1 + alpha e / sum|e| per element (e = clean - "
            "biased prediction = the library's velocity-space bias, signed, sum over C, H, W: "
            "a weight of size 1/N, alpha = 1, beta2 = 1), plus direction ADR x beta1 = 10 "
            "against biased - latents (norms clamped at 1e-6, no floor). This preset as "
            "shipped: k ~ U{1..4} from a drawn start time and FC as (w r)^2 with w normalised "
            "by the mean (takenoko's form), norm_floor 0.01: its FC term is not SimpleTuner's. "
            "The knobs that reproduce it (k_min 0, time_draw 'end', a 1/1000 grid, "
            "fc_normalize 'sum', fc_form 'weight', norm_floor 0) are in docs/peer-readings.md."
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
    """Where preset ``name``'s values come from, and which ones are the library's choice."""
    preset_knobs(name)  # validates the name
    return SOURCES[name]
