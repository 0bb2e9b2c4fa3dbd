import dataclasses
import math

import pytest
import torch

from reflexflow import reference as ref
from reflexflow.paths import GVPPath, LinearPath, PathCoefficients, UserPath, VPPath, get_path

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


COEFFICIENT_PATHS = [LinearPath(), GVPPath(), VPPath(), VPPath(0.5, 10.0), VPPath(0.0, 20.0)]


@pytest.mark.parametrize("path", COEFFICIENT_PATHS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coefficients_equal_the_four_separate_calls_bit_for_bit(path, dtype):
    t = torch.cat([torch.linspace(0, 1, 41, dtype=dtype), torch.tensor([1 - 1e-8], dtype=dtype)])
    c = path.coefficients(t)
    assert isinstance(c, PathCoefficients)
    for name in ("a", "s", "da", "ds"):
        got, want = getattr(c, name), getattr(path, name)(t)
        assert got.dtype == dtype and torch.equal(got, want), name


def test_coefficients_are_frozen_and_cast_together():
    c = GVPPath().coefficients(torch.tensor([0.25, 1.0], dtype=torch.float64))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.a = c.s
    c32 = c.to(torch.float32)
    assert all(getattr(c32, n).dtype == torch.float32 for n in ("a", "s", "da", "ds"))
    assert torch.equal(c32.s, c.s.float())


def test_a_user_path_with_only_four_callables_gets_coefficients_from_get_path():
    class Quadratic:
        name = "quadratic"
        scale = 3.0

        def a(self, t):
            return t * t

        def s(self, t):
            return 1 - t

        def da(self, t):
            return 2 * t

        def ds(self, t):
            return -torch.ones_like(t)

        def __repr__(self):
            return "Quadratic()"

    raw = Quadratic()
    path = get_path(raw)
    assert isinstance(path, UserPath) and path.wrapped is raw
    assert repr(path) == "Quadratic()" and path.scale == 3.0 and path.name == "quadratic"
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    c = path.coefficients(t)
    assert torch.equal(c.a, t * t) and torch.equal(c.da, 2 * t) and torch.equal(c.s, 1 - t)
    builtin = GVPPath()
    assert get_path(builtin) is builtin  # a path with coefficients is returned as is
    assert get_path(path) is path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vp_coefficients_at_t_one_are_finite_with_a_zero_noise_slope(dtype):
    t = torch.tensor([1.0, 1 - 1e-8], dtype=dtype)  # float32 rounds the second to 1
    for path in (VPPath(), VPPath(0.0, 20.0)):
        c = path.coefficients(t)
        for name in ("a", "s", "da", "ds"):
            assert bool(torch.isfinite(getattr(c, name)).all()), name
        assert float(c.s[0]) == 0.0 and float(c.ds[0]) == 0.0
        torch.testing.assert_close(c.da[0], torch.tensor(0.5 * path.beta_min, dtype=dtype))
    just_below = torch.tensor([1 - 2**-20], dtype=dtype)
    slope = VPPath().ds(just_below)  # the derivative still diverges towards t = 1
    assert bool(torch.isfinite(slope).all()) and float(slope) < -100


@pytest.mark.parametrize(
    "convention, t, dtype",
    [
        ("data_at_1", 1.0, torch.float64),
        ("noise_at_1", 0.0, torch.float64),  # sigma = 0: canonical t = 1
        ("data_at_1", 1 - 1e-8, torch.float32),  # rounds to 1 in float32
    ],
)
def test_one_adam_step_from_t_one_on_the_vp_path_keeps_parameters_finite(convention, t, dtype):
    import reflexflow as rf
    from tests.helpers import ConvVelocity

    model = ConvVelocity().to(dtype)
    x1 = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=dtype)
    times = torch.full((4,), t, dtype=dtype)
    loss_fn = rf.ReflexFlowLoss(path="vp", convention=convention, rollout_steps=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = loss_fn(model, x1, t=times, generator=torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(out.loss))
    out.backward()
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("betas", [(0.1, float("inf")), (float("nan"), 20.0), ("0.1", 20.0)])
def test_vp_path_refuses_non_finite_or_non_numeric_betas(betas):
    with pytest.raises((ValueError, TypeError), match="beta_m"):
        VPPath(*betas)
