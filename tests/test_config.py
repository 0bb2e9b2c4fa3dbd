"""ReflexFlowConfig (reflexflow/config.py): every knob is checked at construction."""

import pytest

import reflexflow as rf


@pytest.mark.parametrize(
    "knobs, error, match",
    [
        ({"method": "sdss"}, ValueError, "method must be one of"),
        ({"path": "cosine"}, ValueError, "path must be one of"),
        ({"convention": "sigma"}, ValueError, "convention must be one of"),
        ({"rollout_steps": 0}, ValueError, "rollout_steps must be >= 1"),
        ({"rollout_steps": 1.5}, TypeError, "rollout_steps must be an int"),
        ({"num_sampling_steps": True}, TypeError, "num_sampling_steps must be an int"),
        ({"rollout_steps": 10, "num_sampling_steps": 10}, ValueError, "do not fit"),
        ({"ss_prob": 1.5}, ValueError, "ss_prob must be <= 1"),
        ({"t_eps": 0.0}, ValueError, "t_eps must be > 0"),
        ({"adr_loss": "cos"}, ValueError, "adr_loss must be one of"),
        ({"lambda_adr": -1.0}, ValueError, "lambda_adr must be >= 0"),
        ({"lambda_fc": float("nan")}, ValueError, "lambda_fc must be finite"),
        ({"fc_filter": "median"}, ValueError, "fc_filter must be one of"),
        ({"fc_size": 4}, ValueError, "fc_size must be odd"),
        ({"fc_cutoff": 0.0}, ValueError, "fc_cutoff must be > 0"),
        ({"fc_source": "noise"}, ValueError, "fc_source must be one of"),
        ({"k_draw": "poisson"}, ValueError, "k_draw must be one of"),
        ({"step_schedule": "exp"}, ValueError, "step_schedule must be one of"),
        ({"time_sampler": "beta"}, ValueError, "time_sampler must be"),
        ({"logit_std": 0.0, "time_sampler": "logit_normal"}, ValueError, "logit_std must be > 0"),
        ({"logit_mean": float("nan")}, ValueError, "logit_mean must be finite"),
        ({"logit_mean": None}, TypeError, "logit_mean must be a number"),
        ({"logit_std": "a"}, TypeError, "logit_std must be a number"),
        ({"logit_std": float("inf")}, ValueError, "logit_std must be finite"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"rollout_grad": True, "rollout_steps": 2}, ValueError, "rollout_grad needs one"),
        ({"rollout_grad": True, "joint_forward": True}, ValueError, "joint_forward=True is"),
        ({"timestep_scale": 0.0}, ValueError, "timestep_scale must be > 0"),
        ({"norm_floor": 2.0}, ValueError, "norm_floor must be <= 1"),
        ({"preset": "ddpm"}, ValueError, "preset must be one of"),
        ({"fm_input": "noisy"}, ValueError, "fm_input must be one of"),
        ({"fc_form": "cube"}, ValueError, "fc_form must be one of"),
        ({"target": "ot"}, ValueError, "target must be one of"),
        ({"stable_ref": -1}, ValueError, "stable_ref must be >= 0"),
        ({"target": "stable", "method": "ip"}, ValueError, "target='stable' is defined"),
        ({"loss_weighting": "snr"}, ValueError, "loss_weighting must be None"),
        ({"loss_weighting": 3}, TypeError, "loss_weighting must be None"),
        ({"rollout_mode": "inference"}, ValueError, "rollout_mode must be one of"),
        ({"memory": "low"}, ValueError, "memory must be one of"),
        ({"memory": "lean", "joint_forward": True}, ValueError, "runs the two terms apart"),
        ({"memory": "lean", "preset": "arioso"}, ValueError, "needs independent terms"),
        ({"memory": "lean", "preset": "simpletuner"}, ValueError, "nothing to split"),
        ({"share_first_call": True, "joint_forward": True}, ValueError, "exclude each other"),
        ({"share_first_call": True, "method": "ss"}, ValueError, "share_first_call=True needs"),
        ({"joint_forward": True, "lambda_adr": 0.0}, ValueError, "needs two gradient"),
        ({"unbatched_kwargs": "img_ids"}, TypeError, "unbatched_kwargs must be a tuple"),
        ({"unbatched_kwargs": (1,)}, TypeError, "unbatched_kwargs must hold strings"),
        ({"not_a_knob": 1}, TypeError, "not_a_knob"),
    ],
)
def test_bad_knobs_are_rejected_at_construction(knobs, error, match):
    with pytest.raises(error, match=match):
        rf.ReflexFlowLoss(**knobs)


@pytest.mark.parametrize(
    "name",
    [
        "fc_per_channel",
        "fc_signed",
        "rollout_grad",
        "check_finite",
        "joint_forward",
        "share_first_call",
        "stable_gather",
        "weight_adr",
    ],
)
def test_bool_knobs_reject_strings(name):
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        rf.ReflexFlowLoss(**{name: "False"})
