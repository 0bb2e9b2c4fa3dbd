"""The step's draws (reflexflow/draws.py): the user's times t and rollout lengths k are
checked (shape, dtype, range, fit in [0, 1 - t_eps]), a custom time sampler's output too,
and times the user passes are kept."""

from __future__ import annotations

import pytest
import torch

import reflexflow as rf
from tests.helpers import ConvVelocity
from tests.helpers import negative_velocity as model

B = 4


@pytest.fixture
def x1():
    return torch.randn(B, 3, 4, 4)


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


BATCH = 8


def test_sit_times_up_to_one_are_accepted_and_unfitting_rollouts_dropped():
    """SiT draws t ~ U[0, 1): t > 1 - t_eps must be valid; rollouts that do not fit drop."""
    t = torch.tensor([0.0, 0.3, 0.97, 0.985, 0.9995, 0.99999, 1.0, 0.5])
    out = rf.reflexflow_loss(
        ConvVelocity(), torch.randn(BATCH, 3, 4, 4), t=t, rollout_steps=1, num_sampling_steps=50
    )
    torch.testing.assert_close(out.t0, t)  # the user's times, unchanged
    room = 1 - 1e-3 - 1 / 50
    assert torch.equal(out.k, (t <= room + 1e-6).long())
    assert torch.isfinite(out.loss)
    out.loss.backward()


@pytest.mark.parametrize("convention", ["data_at_1", "noise_at_1"])
def test_user_times_with_drawn_k_keep_fitting_rollouts(convention):
    t = torch.linspace(0.0, 0.5, BATCH, dtype=torch.float64)
    t = t if convention == "data_at_1" else 1 - t
    out = rf.reflexflow_loss(
        ConvVelocity().double(),
        torch.randn(BATCH, 3, 4, 4, dtype=torch.float64),
        t=t,
        convention=convention,
        rollout_steps=3,
        k_draw="fixed",
        num_sampling_steps=10,
    )
    assert torch.equal(out.k, torch.full((BATCH,), 3))


def test_explicit_k_that_does_not_fit_explicit_t_is_still_an_error():
    with pytest.raises(ValueError, match=r"k\[0\] = 1 does not fit"):
        rf.reflexflow_loss(
            ConvVelocity(),
            torch.randn(2, 3, 4, 4),
            t=torch.tensor([0.999, 0.1]),
            k=torch.tensor([1, 1]),
        )


def test_dropped_rollouts_under_the_static_fixed_k_plan_leave_their_samples_unbiased():
    """k_draw="fixed" with a user's t near 1: the static (no host sync) plan runs K steps
    for the batch and leaves the dropped rows where they were."""
    t = torch.tensor([0.1, 0.5, 0.95, 0.99, 0.2, 0.999, 0.3, 1.0])
    out = rf.reflexflow_loss(
        ConvVelocity(),
        torch.randn(BATCH, 3, 4, 4),
        t=t,
        rollout_steps=3,
        num_sampling_steps=20,
        k_draw="fixed",
        fc_source="state",
    )
    dropped = t > 1 - 1e-3 - 3 / 20 + 1e-6
    assert torch.equal(out.k, torch.where(dropped, 0, 3))
    assert torch.equal(out.bias_norm[dropped], torch.zeros(int(dropped.sum())))
    assert bool((out.bias_norm[~dropped] > 0).all())


def test_zero_lambdas_run_no_rollout_and_draw_times_on_the_whole_interval():
    calls = []

    def counting(x, t):
        calls.append(t)
        return -x

    out = rf.reflexflow_loss(
        counting,
        torch.randn(512, 3),
        lambda_adr=0.0,
        lambda_fc=0.0,
        rollout_steps=3,
        k_draw="fixed",
        num_sampling_steps=10,
    )
    assert len(calls) == 1 and torch.equal(out.k, torch.zeros(512, dtype=torch.long))
    assert float(out.t0.max()) > 0.9  # not narrowed to 1 - t_eps - K h = 0.699
