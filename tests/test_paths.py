import math

import pytest
import torch

from reflexflow import reference as ref
from reflexflow.paths import GVPPath, LinearPath, VPPath, get_path

T = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)


@pytest.mark.parametrize("path", [LinearPath(), GVPPath(), VPPath(), VPPath(0.5, 10.0)])
def test_path_derivatives_match_central_finite_differences(path):
    h = 1e-6
    da_fd = (path.a(T + h) - path.a(T - h)) / (2 * h)
    ds_fd = (path.s(T + h) - path.s(T - h)) / (2 * h)
    torch.testing.assert_close(path.da(T), da_fd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(path.ds(T), ds_fd, rtol=1e-6, atol=1e-7)


def test_path_endpoints_put_data_at_one_and_noise_at_zero():
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    for path in (LinearPath(), GVPPath()):
        assert float(path.a(zero)) == pytest.approx(0.0, abs=1e-12)
        assert float(path.s(zero)) == pytest.approx(1.0)
        assert float(path.a(one)) == pytest.approx(1.0)
        assert float(path.s(one)) == pytest.approx(0.0, abs=1e-12)
    vp = VPPath()
    assert float(vp.a(one)) == pytest.approx(1.0)
    assert float(vp.a(zero)) == pytest.approx(math.exp(-0.25 * 19.9 - 0.05))
    assert float(vp.s(zero) ** 2 + vp.a(zero) ** 2) == pytest.approx(1.0)


def test_linear_adr_closed_form_equals_general_formula():
    g = torch.Generator().manual_seed(0)
    x1, eps, x_hat = (torch.randn(6, 3, 5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    t1 = torch.rand(6, generator=g, dtype=torch.float64) * 0.9
    general = ref.adr_target(LinearPath(), x1, eps, x_hat, t1)
    torch.testing.assert_close(
        general, ref.adr_target_linear(x1, x_hat, t1), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("path", [LinearPath(), GVPPath(), VPPath()])
def test_adr_target_is_the_path_velocity_of_the_recomputed_noise(path):
    """v_adr = a'(t1) x1 + s'(t1) eps^ with eps^ = (x^ - a(t1) x1) / s(t1)."""
    g = torch.Generator().manual_seed(1)
    x1, eps, x_hat = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t1 = torch.tensor([0.1, 0.4, 0.7, 0.9], dtype=torch.float64)
    eps_hat = (x_hat - ref.bcast(path.a(t1), x1) * x1) / ref.bcast(path.s(t1), x1)
    expected = ref.velocity_target(path, x1, eps_hat, t1)
    torch.testing.assert_close(ref.adr_target(path, x1, eps, x_hat, t1), expected)


def test_get_path_rejects_unknown_names_and_incomplete_objects():
    with pytest.raises(ValueError, match="path must be one of"):
        get_path("cosine")

    class NoDerivatives:
        def a(self, t):
            return t

        def s(self, t):
            return 1 - t

    with pytest.raises(TypeError, match=r"lacks \['da', 'ds'\]"):
        get_path(NoDerivatives())


def test_user_path_object_is_accepted_and_used():
    class Scaled(LinearPath):
        def a(self, t):
            return 2 * t

        def da(self, t):
            return 2 * torch.ones_like(t)

    path = get_path(Scaled())
    x1 = torch.ones(1, 2, dtype=torch.float64)
    u = ref.velocity_target(
        path, x1, torch.zeros_like(x1), torch.tensor([0.3], dtype=torch.float64)
    )
    assert torch.equal(u, 2 * x1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gvp_noise_scale_is_exactly_zero_at_t_one(dtype):
    t = torch.tensor([1.0], dtype=dtype)
    assert float(GVPPath().s(t)) == 0.0 and float(GVPPath().da(t)) == 0.0
