"""Per-sample loss weighting of the FM term (the SD3 / Flux training scripts' schemes)."""

from __future__ import annotations

import math

import pytest
import torch

import reflexflow as rf
from reflexflow import reference as ref
from reflexflow.weighting import loss_weights
from tests.helpers import ConvVelocity

X = torch.randn(4, 3, 8, 8)


def test_named_weightings_are_functions_of_sigma():
    t = torch.tensor([0.0, 0.25, 0.5, 0.9], dtype=torch.float64)
    sigma = 1 - t
    torch.testing.assert_close(loss_weights("sigma_sqrt", t, "data_at_1"), sigma**-2)
    cosmap = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    torch.testing.assert_close(loss_weights("cosmap", t, "noise_at_1"), cosmap)
    assert loss_weights(None, t, "data_at_1") is None


def test_a_callable_weighting_gets_times_in_the_losss_convention():
    got = []

    def weighting(tt):
        got.append(tt)
        return torch.ones_like(tt)

    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    loss_weights(weighting, t, "noise_at_1")
    torch.testing.assert_close(got[0], 1 - t)
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        loss_weights(lambda tt: tt[:1], t, "data_at_1")


def test_a_callable_weighting_with_its_own_convention_gets_times_in_it():
    from reflexflow.adapters import DiffusersLossWeighting

    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)  # canonical: sigma = 0.9, 0.5, 0.1
    sigma = 1 - t
    for convention in ("data_at_1", "noise_at_1"):
        got = loss_weights(DiffusersLossWeighting("sigma_sqrt"), t, convention)
        torch.testing.assert_close(got, sigma**-2)  # a function of sigma under both


@pytest.mark.parametrize("method", ["fm", "reflexflow"])
def test_weighted_fm_term_is_the_mean_of_weighted_per_sample_errors(method):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1).double()
    x1 = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    noise = torch.randn_like(x1)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64)
    k = torch.zeros(4, dtype=torch.long) if method == "reflexflow" else None
    out = rf.reflexflow_loss(
        lambda x, tt: net(x),
        x1,
        noise=noise,
        t=t,
        k=k,
        method=method,
        loss_weighting="cosmap",
        lambda_adr=0.0 if method == "reflexflow" else 1.0,
    )
    x_t = ref.interpolate(rf.LinearPath(), x1, noise, t)
    per_sample = (net(x_t) - (x1 - noise)).square().flatten(1).mean(1)
    w = loss_weights("cosmap", t, "data_at_1")
    torch.testing.assert_close(out.fc_loss, (w * per_sample).mean())
    torch.testing.assert_close(out.per_sample_loss, w * per_sample)


def test_loss_weighting_of_the_wrong_signature_or_with_negative_weights_is_refused():
    with pytest.raises(TypeError, match=r"loss_weighting must be callable as loss_weighting\(t\)"):
        rf.ReflexFlowConfig(loss_weighting=lambda: 1.0)
    with pytest.raises(ValueError, match="finite, non-negative weights; got min -1"):
        rf.reflexflow_loss(ConvVelocity(), X, loss_weighting=lambda t: -torch.ones_like(t))
    with pytest.raises(TypeError, match="floating-point weights, got torch.int64"):
        rf.reflexflow_loss(ConvVelocity(), X, loss_weighting=lambda t: torch.ones_like(t).long())


def test_a_time_sampler_or_weighting_declaring_an_unknown_convention_is_refused():
    class Declares:
        convention = "sigma"  # not a convention: it would have been read as noise_at_1

        def __call__(self, *args, **kwargs):
            return torch.full((args[0],) if isinstance(args[0], int) else args[0].shape, 0.5)

    with pytest.raises(ValueError, match=r"loss_weighting.convention must be one of"):
        rf.ReflexFlowLoss(loss_weighting=Declares())
    with pytest.raises(ValueError, match=r"time_sampler.convention must be one of"):
        rf.ReflexFlowLoss(time_sampler=Declares())
