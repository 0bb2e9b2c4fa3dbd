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
            "at x_t1 per step. Ours, not the paper's: adr_x1_from = 0.9, the near-t = 1 "
            "remedy (mse ADR rows with t1 > 0.9 weighted min(1, (c(t1)/c(0.9))^2), "
            "c = s / (a' s - a s'); |v1 - v_adr| grows like |delta| / (1 - t1) there): on "
            "the 2-D ring it cut the largest per-sample loss from 2960 to 137 and the "
            "8-step MMD from 0.0156 to 0.0147 (docs/peer-readings.md); norm_floor 0.01 and "
            "norm_eps 1e-6 (used by the direction loss only)."
        ),
        "arioso": (
            "Arioso (escapeprograms/Arioso@1af393b), DEFAR's Algorithm 1 in Arioso/augment.py "
            "(sample_t1, adr_per_sample, _masked_l2_normalize), Arioso/cfm.py (interpolate, "
            "masked_mse), Arioso/train.py (the step) and Arioso/configs/7-9-adr.yaml: "
            "t0 ~ U(0, 1) (torch.rand), t1 = t0 + (1 - t0) U(0, 1) (the library: t0 = u "
            "(1 - t_eps), t1 <= 1 - t_eps, within t_eps of Arioso's on the same uniforms); "
            "one Euler step x^ = x_t0 + (t1 - t0) v(x_t0, t0) whose graph is kept "
            "(rollout_grad); direction ADR on v(x^, t1) with fp32 norms clamped at 1e-8 "
            "(norm_eps 1e-8) and no floor (norm_floor 0), weight adr_beta = 1 (its default "
            "0 is off; its notes sweep 0.5 to 10); plain FM at t0; no FC. Its ADR target "
            "x1 - (1 - sigma) x^ (the library's v_adr times s(t1) on its path "
            "x_t = (1 - (1 - 1e-4) t) x0 + t x1: the same direction) is NOT detached, and "
            "this preset keeps that (adr_target_grad): the ADR gradient also flows through "
            "the target into v(x_t0, t0), 29% of the gradient on the fixture. Its path is "
            "the user's (path=...). Reproduces tests/data/peers/arioso.json to 6e-8 on the "
            "loss and 2e-7 on the gradients (float64; its fp32 norms are the residual)."
        ),
        "simpletuner": (
            "SimpleTuner (bghira/SimpleTuner@bc8e6ab, which contains PR 2156's ADR sign fix). "
            "Draws (simpletuner/helpers/scheduled_sampling/plan.py:build_rollout_schedule, "
            "helpers/models/common.py:sample_flow_sigmas): the END sigma = sigmoid(N(0, 1)) "
            "(time_sampler logit_normal, time_draw 'end'; its flow_schedule_shift is "
            "model-specific and not set here), end index int(1000 sigma), k ~ U{0..M} per "
            "sample (k_min 0; max_step_offset M is the user's: rollout_steps 10, its docs' "
            "example), start index min(end + k, 999). scheduled_sampling_probability "
            "defaults to 0.0 there (nothing rolls out); ss_prob 1.0 is its docs' example. "
            "Rollout (scheduled_sampling/rollout.py:_apply_flow_matching_rollout): plain "
            "Euler on the 1/1000 grid (num_sampling_steps 1000), no gradient. Loss "
            "(models/common.py:ModelFoundation.loss): FM on the biased input (fm_input "
            "'biased') times w = 1 + alpha e / sum|e| per element (e = clean - biased "
            "prediction = the velocity-space bias, signed, no filter, normalised by the SUM "
            "over C, H, W: fc_signed, fc_filter 'none', fc_form 'weight', fc_normalize "
            "'sum', alpha = lambda_fc = 1; w - 1 has size 1/N, a near no-op on large "
            "latents: measured 0.3% on N = 32), plus direction ADR x beta1 = 10 (norms "
            "clamped at 1e-6, no floor: norm_floor 0). Not copied (documented, measured in "
            "docs/peer-readings.md): its states on a 1/999 grid while the model sees t/1000 "
            "(7.5e-4 of the gradients on the fixture), its clean prediction at the "
            "continuous sigma (3e-4), rollouts that end at t = 1, its float32 FM. "
            "Reproduces tests/data/peers/simpletuner.json (1/1000 grid) to 3e-9 on the "
            "loss and 4e-8 on the gradients."
        ),
        "takenoko": (
            "takenoko (seruva19/takenoko@72c42ad): src/enhancements/reflexflow/"
            "reflexflow_helper.py (ReflexFlowHelper.apply_to_inputs, "
            "_sample_shifted_logit_normal), src/enhancements/reflexflow/reflexflow.py "
            "(compute_reflexflow_loss_terms), src/criteria/training_loss.py (assembly). No "
            "model rollout (biased_input 'renoise'): the input is re-noised on the path with "
            "the same noise at sigma = clamp(0.6 b / (1 - 0.4 b), 0.05, 0.95), b = "
            "sigmoid(N(0, 1)) (renoise_shift, renoise_range), and the model is called at it "
            "with the ORIGINAL label t0 (fm_input 'biased': one gradient call serves every "
            "term); t0 is its trainer's default draw, sigma = shift-3 logit-normal "
            "(time_sampler, noise-ward). Loss: base FM mean (v - u)^2 + 10 x direction ADR "
            "(norms clamped at 1e-6, no floor) + 1 x FC mean((w (v - u))^2) on top of the "
            "base (fc_adds_fm, fc_form 'squared'), w = 1 + E / sum_hw E, E = "
            "max(||v(x^, t0) - v(x_t0, t0)||_channels, 1e-6) (fc_channel_reduce 'l2', "
            "fc_normalize 'sum', no filter). Odd, kept: its ADR target x1 - x^ = "
            "s(t1) (x1 - eps) is colinear with the FM target (cosine 1 on every fixture "
            "sample), so the term is a cosine penalty towards u and rectifies nothing; the "
            "exposure it trains is the label mismatch |t1 - t0|. Not copied: "
            "reflexflow_apply_prob drawn once per batch (here ss_prob per sample), its "
            "video-frame selection. Reproduces tests/data/peers/takenoko.json to 3e-8 on "
            "the loss and 3e-7 on the gradients."
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
