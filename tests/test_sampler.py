"""ODE sampling (reflexflow/sampler.py): Euler and Heun converge at their order, the
noise_at_1 convention, and every bad input named."""

import math

import pytest
import torch

import reflexflow as rf
from reflexflow.time_sampling import LogitNormalTime
from tests.helpers import ConvVelocity

B = 4
X = torch.randn(B, 3, 8, 8)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_solver_converges_at_its_order_on_dx_dt_equals_x(solver, order):
    x0 = torch.ones(1, 1, dtype=torch.float64)
    errors = [
        abs(float(rf.sample(lambda x, t: x, x0, n, solver=solver)) - math.e) for n in (20, 40)
    ]
    assert errors[0] / errors[1] == pytest.approx(2**order, rel=0.1)


def test_euler_lands_exactly_on_a_point_mass_with_its_exact_velocity():
    c = torch.tensor([[1.5, -2.0, 0.25]], dtype=torch.float64)

    def exact(x, t):  # linear path, x1 = c: v*(x, t) = (c - x) / (1 - t)
        return (c - x) / (1 - t)[:, None]

    noise = torch.randn(5, 3, dtype=torch.float64)
    out = rf.sample(exact, noise, 7)
    torch.testing.assert_close(out, c.expand(5, 3))


def test_sampler_noise_at_1_matches_canonical_and_keeps_a_trajectory():
    model = torch.nn.Linear(3, 3).double()
    canonical = lambda x, t: model(x) * (1 + t[:, None])
    diffusers = lambda x, sigma: -model(x) * (2 - sigma[:, None])
    noise = torch.randn(4, 3, dtype=torch.float64)
    a, traj = rf.sample(canonical, noise, 5, solver="heun", return_trajectory=True)
    b = rf.sample(diffusers, noise, 5, solver="heun", convention="noise_at_1")
    torch.testing.assert_close(a, b)
    assert len(traj) == 6 and torch.equal(traj[0], noise)


def test_sampler_rejects_bad_arguments():
    noise = torch.randn(2, 3)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        rf.sample(lambda x, t: x, noise, 0)
    with pytest.raises(ValueError, match="solver must be one of"):
        rf.sample(lambda x, t: x, noise, 4, solver="rk4")
    with pytest.raises(TypeError, match="noise must be a floating-point tensor"):
        rf.sample(lambda x, t: x, noise.long(), 4)


def test_noise_dtype_other_than_the_models_is_named_in_sample():
    with pytest.raises(TypeError, match=r"noise's dtype torch\.float16.*noise\.to"):
        rf.sample(ConvVelocity(), X.half(), 2)


@pytest.mark.parametrize(
    "noise, kwargs, error, match",
    [
        (torch.randn(B), {}, ValueError, r"noise must have shape \(B, \.\.\.\)"),
        (X[:0], {}, ValueError, r"noise must have shape \(B, \.\.\.\) with B >= 1"),
        (X.to("meta"), {}, ValueError, "noise is on the meta device"),
        (X.long(), {}, TypeError, "noise must be a floating-point tensor"),
        (X, dict(steps=2.0), ValueError, "steps must be an int >= 1"),
        (X, dict(convention="sigma"), ValueError, "convention must be one of"),
        (X, dict(timestep_scale=0), ValueError, "timestep_scale must be > 0"),
        (X, dict(t_start="0"), TypeError, "t_start must be a number"),
        (X, dict(model_kwargs=[1]), TypeError, "model_kwargs must be a dict or None"),
        (
            X,
            dict(model_kwargs={"y": torch.zeros(B + 1, dtype=torch.long)}),
            ValueError,
            r"model_kwargs\['y'\] has shape \(5,\)",
        ),
    ],
)
def test_sample_names_bad_inputs(noise, kwargs, error, match):
    steps = kwargs.pop("steps", 2)
    with pytest.raises(error, match=match):
        rf.sample(ConvVelocity(num_classes=3), noise, steps, **kwargs)


def test_sample_passes_unbatched_kwargs_as_they_are():
    ids = torch.arange(6).view(3, 2)  # not batch-shaped (Flux's img_ids)
    seen = []

    def model(x, t, img_ids):
        seen.append(img_ids)
        return -x

    rf.sample(model, X, 2, model_kwargs={"img_ids": ids}, unbatched_kwargs=("img_ids",))
    assert len(seen) == 2 and all(s is ids for s in seen)


def test_sample_refuses_a_model_returning_a_non_floating_tensor():
    with pytest.raises(TypeError, match="floating-point velocity"):
        rf.sample(lambda x, t: x.long(), X, 2)


def test_sampler_timestep_scale_and_noise_at_1_equal_canonical_sampling():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4)
    seen = []

    def sd3_model(x, timestep):  # noise_at_1 model taking timesteps in [0, 1000]
        seen.append(timestep)
        return net(x) * (timestep[:, None] / 1000.0)

    noise = torch.randn(3, 4)
    a = rf.sample(sd3_model, noise, steps=5, convention="noise_at_1", timestep_scale=1000.0)
    b = rf.sample(lambda x, t: -sd3_model(x, 1000 * (1 - t)), noise, steps=5)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(seen[0], torch.full((3,), 1000.0))  # starts at sigma = 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mean": float("nan")}, ValueError, "logit_mean must be finite"),
        ({"std": float("inf")}, ValueError, "logit_std must be finite"),
        ({"std": "1"}, TypeError, "logit_std must be a number"),
        ({"std": 0.0}, ValueError, "logit_std must be > 0"),
    ],
)
def test_logit_normal_time_refuses_non_finite_or_non_numeric_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        LogitNormalTime(**kwargs)
