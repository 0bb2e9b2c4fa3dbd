"""reflexflow/adapters/flow_matching.py: flow_matching schedulers (stand-ins that follow
their documented formulas) as reflexflow paths; tests/test_peers.py runs the real package."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import reflexflow as rf
from reflexflow import adapters
from tests.helpers import assert_same_path

T = torch.linspace(0.0, 0.99, 23, dtype=torch.float64)


def cond_ot(t):
    return SimpleNamespace(
        alpha_t=t, sigma_t=1 - t, d_alpha_t=torch.ones_like(t), d_sigma_t=-torch.ones_like(t)
    )


def cosine(t):
    c, s = torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)
    return SimpleNamespace(
        alpha_t=s, sigma_t=c, d_alpha_t=0.5 * math.pi * c, d_sigma_t=-0.5 * math.pi * s
    )


def vp(t, beta_min=0.1, beta_max=20.0):
    """flow_matching's VPScheduler formulas (as a dict, which path_from_scheduler accepts)."""
    b, B = beta_min, beta_max
    T_ = 0.5 * (1 - t) ** 2 * (B - b) + (1 - t) * b
    dT = -(1 - t) * (B - b) - b
    return {
        "alpha_t": torch.exp(-0.5 * T_),
        "sigma_t": torch.sqrt(1 - torch.exp(-T_)),
        "d_alpha_t": -0.5 * dT * torch.exp(-0.5 * T_),
        "d_sigma_t": 0.5 * dT * torch.exp(-T_) / torch.sqrt(1 - torch.exp(-T_)),
    }


@pytest.mark.parametrize(
    "scheduler, path", [(cond_ot, rf.LinearPath()), (cosine, rf.GVPPath()), (vp, rf.VPPath())]
)
def test_flow_matching_schedulers_map_onto_the_named_paths(scheduler, path):
    assert_same_path(adapters.path_from_scheduler(scheduler), path, T)


def test_loss_with_scheduler_path_equals_loss_with_named_path():
    net = torch.nn.Linear(4, 4).double()
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    draws = dict(
        noise=torch.randn(6, 4, generator=g, dtype=torch.float64),
        t=torch.rand(6, generator=g, dtype=torch.float64) * 0.5,
        k=torch.tensor([0, 1, 2, 1, 2, 0]),
    )
    knobs = dict(rollout_steps=2, num_sampling_steps=10)
    a = rf.reflexflow_loss(
        lambda x, t: net(x), x1, path=adapters.path_from_scheduler(cosine), **knobs, **draws
    )
    b = rf.reflexflow_loss(lambda x, t: net(x), x1, path="gvp", **knobs, **draws)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-12)


def test_path_from_scheduler_rejects_bad_input():
    with pytest.raises(TypeError, match="scheduler"):
        adapters.path_from_scheduler(3)
    with pytest.raises(TypeError, match="sigma_t"):
        adapters.path_from_scheduler(lambda t: SimpleNamespace(alpha_t=t)).s(T)
