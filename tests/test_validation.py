"""Bad input raises a clear, named error; nothing is computed silently wrong."""

import pytest
import torch

import reflexflow as rf

B = 4


def model(x, t, **kw):
    return -x


@pytest.fixture
def x1():
    return torch.randn(B, 3, 4, 4)


def test_integer_data_is_rejected(x1):
    with pytest.raises(TypeError, match="x1 must be a floating-point tensor"):
        rf.reflexflow_loss(model, x1.to(torch.int64))


def test_data_without_batch_axis_is_rejected():
    with pytest.raises(ValueError, match="x1 must have shape"):
        rf.reflexflow_loss(model, torch.randn(5))


def test_noise_of_another_shape_or_dtype_is_rejected(x1):
    with pytest.raises(ValueError, match="noise must have x1's shape"):
        rf.reflexflow_loss(model, x1, noise=torch.randn(B, 3, 4, 5))
    with pytest.raises(TypeError, match="noise must be a floating-point tensor"):
        rf.reflexflow_loss(model, x1, noise=torch.zeros(x1.shape, dtype=torch.int32))


def test_model_returning_the_wrong_shape_is_rejected(x1):
    with pytest.raises(ValueError, match="model returned shape"):
        rf.reflexflow_loss(lambda x, t: x[:, :1], x1)
    with pytest.raises(TypeError, match="model must return a tensor"):
        rf.reflexflow_loss(lambda x, t: (x,), x1)
    with pytest.raises(TypeError, match="model must be callable"):
        rf.reflexflow_loss("not a model", x1)


@pytest.mark.parametrize(
    "t, error, match",
    [
        (torch.rand(B, 1), ValueError, r"t must have shape \(4,\)"),
        (torch.zeros(B, dtype=torch.int64), TypeError, "t must be a floating-point tensor"),
        ([0.1] * B, TypeError, "t must be a floating-point tensor"),
        (torch.full((B,), 1.2), ValueError, r"must lie in \[0, 1\]"),
        (torch.full((B,), -0.1), ValueError, r"must lie in \[0, 1\]"),
    ],
)
def test_bad_times_are_rejected(x1, t, error, match):
    with pytest.raises(error, match=match):
        rf.reflexflow_loss(model, x1, t=t, k=torch.zeros(B, dtype=torch.int64))


@pytest.mark.parametrize(
    "k, error, match",
    [
        (torch.ones(B, dtype=torch.int32), TypeError, "k must have dtype torch.int64"),
        (torch.ones(B + 1, dtype=torch.int64), ValueError, r"k must have shape \(4,\)"),
        (torch.tensor([1, -1, 0, 1]), ValueError, "k must be >= 0"),
        ([1, 1, 1, 1], TypeError, "k must be an int64 tensor"),
    ],
)
def test_bad_rollout_lengths_are_rejected(x1, k, error, match):
    with pytest.raises(error, match=match):
        rf.reflexflow_loss(model, x1, k=k)


def test_rollout_beyond_one_minus_t_eps_is_rejected(x1):
    t = torch.full((B,), 0.9)
    with pytest.raises(ValueError, match=r"t\[0\] = 0.9 .* k\[0\] = 3 does not fit"):
        rf.reflexflow_loss(
            model, x1, t=t, k=torch.full((B,), 3), rollout_steps=3, num_sampling_steps=10
        )


def test_k_is_rejected_for_methods_without_rollout(x1):
    with pytest.raises(ValueError, match="k must be all zeros for method='fm'"):
        rf.reflexflow_loss(model, x1, k=torch.ones(B, dtype=torch.int64), method="fm")


def test_single_step_schedule_rejects_k_above_one(x1):
    with pytest.raises(ValueError, match="k must be 0 or 1"):
        rf.reflexflow_loss(model, x1, k=torch.full((B,), 2), step_schedule="single")


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


def test_model_kwargs_must_be_a_mapping(x1):
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        rf.reflexflow_loss(model, x1, model_kwargs=[1, 2])


def test_check_finite_catches_nan_data_and_nan_model_output(x1):
    bad = x1.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x1 has non-finite values"):
        rf.reflexflow_loss(model, bad, check_finite=True)
    with pytest.raises(ValueError, match="x_hat has non-finite values .* 'rollout state'"):
        rf.reflexflow_loss(lambda x, t: x * float("inf"), x1, check_finite=True)
    # off by default: no host sync, the NaN comes back in the loss
    assert torch.isnan(rf.reflexflow_loss(model, bad).loss)


def test_generator_on_another_device_type_is_rejected(x1):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to build a mismatched generator")
    with pytest.raises(ValueError, match="generator is on"):
        rf.reflexflow_loss(model, x1, generator=torch.Generator(device="cuda"))


def test_explicit_k_above_rollout_steps_is_rejected(x1):
    with pytest.raises(ValueError, match=r"k must be <= rollout_steps = 2, got max 3"):
        rf.reflexflow_loss(model, x1, k=torch.tensor([3, 1, 1, 0]), rollout_steps=2)


@pytest.mark.parametrize(
    "sampler, error, match",
    [
        (lambda b, d, g: torch.rand(b, generator=g) * 1000, ValueError, r"values in \[0, 1\]"),
        (lambda b, d, g: torch.rand(b, 1, generator=g), ValueError, r"shape \(4,\)"),
        (lambda b, d, g: torch.ones(b, dtype=torch.int64), TypeError, "floating-point"),
        (lambda b, d, g: torch.full((b,), float("nan")), ValueError, r"values in \[0, 1\]"),
    ],
)
def test_custom_time_sampler_output_is_validated(x1, sampler, error, match):
    with pytest.raises(error, match=match):
        rf.reflexflow_loss(model, x1, time_sampler=sampler)


def test_custom_time_sampler_in_range_is_used(x1):
    out = rf.reflexflow_loss(
        model, x1, time_sampler=lambda b, d, g: torch.full((b,), 0.5), k=torch.zeros(4).long()
    )
    torch.testing.assert_close(out.t0, torch.full((4,), 0.5 * (1 - 1e-3)))


def test_nan_time_is_rejected(x1):
    t = torch.tensor([0.1, float("nan"), 0.2, 0.3])
    with pytest.raises(ValueError, match=r"t\[1\] = nan"):
        rf.reflexflow_loss(model, x1, t=t, k=torch.zeros(4, dtype=torch.int64))


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
