"""reflexflow/adapters/torchcfm.py: torchcfm matchers (stand-ins by class name) as
reflexflow paths, and the ones without an affine equivalent refused; tests/test_peers.py
runs the real package."""

from __future__ import annotations

import pytest
import torch

import reflexflow as rf
from reflexflow import adapters
from reflexflow import reference as ref


class ConditionalFlowMatcher:
    def __init__(self, sigma=0.0):
        self.sigma = sigma


class ExactOptimalTransportConditionalFlowMatcher(ConditionalFlowMatcher):
    pass


class TargetConditionalFlowMatcher(ConditionalFlowMatcher):
    pass


class VariancePreservingConditionalFlowMatcher(ConditionalFlowMatcher):
    pass


class SchrodingerBridgeConditionalFlowMatcher(ConditionalFlowMatcher):
    pass


def test_torchcfm_matchers_map_onto_paths():
    assert isinstance(adapters.torchcfm_path(ConditionalFlowMatcher(0.0)), rf.LinearPath)
    assert isinstance(
        adapters.torchcfm_path(ExactOptimalTransportConditionalFlowMatcher()), rf.LinearPath
    )
    assert isinstance(
        adapters.torchcfm_path(VariancePreservingConditionalFlowMatcher()), rf.GVPPath
    )


def test_lipman_path_reproduces_target_cfm_sample_and_target():
    # torchcfm TargetConditionalFlowMatcher: x_t = t x1 + (1 - (1 - sigma) t) eps,
    # u_t = (x1 - (1 - sigma) x_t) / (1 - (1 - sigma) t)
    sigma = 0.05
    path = adapters.torchcfm_path(TargetConditionalFlowMatcher(sigma))
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(7, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(7, 3, generator=g, dtype=torch.float64)
    t = torch.rand(7, generator=g, dtype=torch.float64)
    xt = t[:, None] * x1 + (1 - (1 - sigma) * t[:, None]) * eps
    ut = (x1 - (1 - sigma) * xt) / (1 - (1 - sigma) * t[:, None])
    torch.testing.assert_close(ref.interpolate(path, x1, eps, t), xt)
    torch.testing.assert_close(ref.velocity_target(path, x1, eps, t), ut)


def test_torchcfm_matchers_without_affine_equivalent_are_refused():
    with pytest.raises(ValueError, match="sigma"):
        adapters.torchcfm_path(ConditionalFlowMatcher(0.1))
    with pytest.raises(ValueError, match="Schrodinger"):
        adapters.torchcfm_path(SchrodingerBridgeConditionalFlowMatcher(1.0))
    with pytest.raises(TypeError, match="matcher"):
        adapters.torchcfm_path(object())
