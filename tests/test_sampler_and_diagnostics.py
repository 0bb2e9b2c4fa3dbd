import math

import pytest
import torch

import reflexflow as rf


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


def test_exposure_bias_is_zero_for_the_exact_model_and_positive_for_a_wrong_one():
    c = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    x1 = c.expand(6, 2, 8, 8).clone()

    def exact(x, t):
        return (c - x) / (1 - t).view(-1, 1, 1, 1)

    good = rf.exposure_bias(
        exact,
        x1,
        num_sampling_steps=10,
        k=2,
        num_times=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert float(good.mse.max()) < 1e-20
    bad = rf.exposure_bias(
        lambda x, t: torch.zeros_like(x),
        x1,
        num_sampling_steps=10,
        k=2,
        num_times=4,
        generator=torch.Generator().manual_seed(0),
        batch_size=4,
    )
    assert bool((bad.mse > 1e-3).all())
    assert bad.t0.shape == (4,) and float(bad.t0[-1]) == pytest.approx(1 - 1e-3 - 0.2)
    assert bool(((bad.low_freq_share >= 0) & (bad.low_freq_share <= 1)).all())
    assert set(bad.as_dict()) == {"t0", "mse", "low_freq_share", "k", "h"}


def test_exposure_bias_rejects_rollouts_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        rf.exposure_bias(lambda x, t: x, torch.randn(2, 3), num_sampling_steps=4, k=4)
