"""The reference formulas against docs/method.md, independently of the loss module."""

import pytest
import torch

from reflexflow import LinearPath
from reflexflow import reference as ref
from reflexflow.objective import FLOW_MATCHING, FCSpec, ObjectiveInputs, ObjectiveSpec

FILTER_KW = [
    {"kind": "gaussian", "sigma": 1.5},
    {"kind": "gaussian", "sigma": 4.0},
    {"kind": "box", "size": 3},
    {"kind": "box", "size": 7},
    {"kind": "fft", "cutoff": 0.25},
]
SHAPES = [(3, 4, 9, 7), (2, 3, 4, 6, 5), (3, 2, 11), (4, 13)]


@pytest.mark.parametrize("kw", FILTER_KW, ids=lambda kw: f"{kw['kind']}")
@pytest.mark.parametrize("n_axes", [1, 2])
def test_every_filter_leaves_a_constant_map_constant(kw, n_axes):
    m = torch.full((2, 1, 6, 9), 0.37, dtype=torch.float64)
    out = ref.lowpass(m, n_axes=n_axes, **kw)
    torch.testing.assert_close(out, m, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", FILTER_KW, ids=lambda kw: f"{kw['kind']}")
def test_every_filter_removes_high_frequencies(kw):
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    m = checker.to(torch.float64).view(1, 1, 8, 8)
    out = ref.lowpass(m, n_axes=2, **kw)
    assert float(out.std()) < 0.5 * float(m.std())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("kw", FILTER_KW, ids=lambda kw: f"{kw['kind']}")
def test_fc_weight_has_per_sample_mean_one_plus_lambda_and_is_at_least_one(shape, per_channel, kw):
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(*shape, generator=g, dtype=torch.float64)
    lam = 0.7
    w = ref.fc_weight(delta, lambda_fc=lam, per_channel=per_channel, **kw)
    assert bool((w >= 1).all())
    dims = tuple(range(2 if (len(shape) > 2) else 1, w.dim()))
    torch.testing.assert_close(w.mean(dim=dims), torch.full_like(w.mean(dim=dims), 1 + lam))
    expected_channels = shape[1] if per_channel and len(shape) > 2 else 1
    if len(shape) > 2:
        assert w.shape == (shape[0], expected_channels, *shape[2:])
    else:
        assert w.shape == shape


def test_fc_weight_is_exactly_one_for_inactive_rows_and_for_zero_bias():
    delta = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    delta[2] = 0
    active = torch.tensor([True, False, True])
    w = ref.fc_weight(delta, lambda_fc=1.0, active=active)
    assert torch.equal(w[1], torch.ones_like(w[1]))
    assert torch.equal(w[2], torch.ones_like(w[2]))
    assert float(w[0].mean()) == pytest.approx(2.0)


def test_video_filter_runs_per_frame_without_mixing_frames():
    delta = torch.zeros(1, 2, 3, 8, 8, dtype=torch.float64)
    delta[:, :, 1] = 1.0  # only frame 1 is biased
    w = ref.fc_weight(delta, lambda_fc=1.0)
    # frames 0 and 2 have m = 0: the filter runs over (H, W) only, never across frames
    assert torch.equal(w[:, :, 0], torch.ones_like(w[:, :, 0]))
    assert torch.equal(w[:, :, 2], torch.ones_like(w[:, :, 2]))
    # the normalisation is per sample over (T, H, W): mean of m~ is 1, so frame 1 holds 3
    torch.testing.assert_close(w[:, :, 1], torch.full_like(w[:, :, 1], 4.0))


def test_fc_weight_carries_no_gradient():
    delta = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = ref.fc_weight(delta)
    assert not w.requires_grad


def _objective_inputs(seed=0, shape=(4, 3, 6, 5)):
    g = torch.Generator().manual_seed(seed)
    x1, eps, v0, v1 = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(4))
    t0 = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.5
    t1 = t0 + 0.1
    k = torch.tensor([1, 0, 2, 1])[: shape[0]]
    noise = 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)
    x_hat = ref.interpolate(LinearPath(), x1, eps, t1) + noise
    return x1, eps, v0, v1, x_hat, t0, t1, k


@pytest.mark.parametrize("adr_loss", ["mse", "direction"])
def test_objective_gradients_equal_design_closed_forms(adr_loss):
    """docs/method.md section 5: dL/dv0 = 2/N w (v0 - u_t0); dL/dv1 per adr_loss."""
    path = LinearPath()
    x1, eps, v0, v1, x_hat, t0, t1, k = _objective_inputs()
    v0.requires_grad_(True)
    v1.requires_grad_(True)
    lam = 10.0
    spec = ObjectiveSpec(lambda_adr=lam, adr_loss=adr_loss, fc=FCSpec(lambda_fc=1.0))
    inputs = ObjectiveInputs(v0=v0, v1=v1, x1=x1, eps=eps, x_hat=x_hat, t0=t0, t1=t1, k=k)
    out = ref.objective(path, spec, inputs)
    g0, g1 = torch.autograd.grad(out.loss, (v0, v1))
    n_el, batch = v0.numel(), v0.shape[0]
    u0 = ref.velocity_target(path, x1, eps, t0)
    torch.testing.assert_close(g0, 2 / n_el * out.w * (v0 - u0).detach())
    v_adr = out.v_adr
    if adr_loss == "mse":
        expected = 2 * lam / n_el * (v1 - v_adr).detach()
    else:
        v = v1.detach().flatten(1)
        n = v.norm(dim=1, keepdim=True)
        a = v_adr.flatten(1)
        d = v / n - a / a.norm(dim=1, keepdim=True)
        unit = v / n
        expected = (2 * lam / batch) * (d - (d * unit).sum(1, keepdim=True) * unit) / n
        expected = expected.view_as(v1)
    torch.testing.assert_close(g1, expected)


def test_objective_with_zero_lambdas_is_plain_fm_at_t0():
    x1, eps, v0, v1, x_hat, t0, t1, k = _objective_inputs()
    inputs = ObjectiveInputs(v0=v0, x1=x1, eps=eps, x_hat=x_hat, t0=t0, t1=t1, k=k)
    out = ref.objective(LinearPath(), FLOW_MATCHING, inputs)
    assert torch.equal(out.loss, ref.fm_loss(v0, x1 - eps))
    assert out.adr_loss is None and out.w is None


def test_direction_loss_is_bounded_for_zero_velocity():
    v1 = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    target = torch.ones(2, 3, dtype=torch.float64)
    loss = ref.adr_direction_loss(v1, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(v1.grad).all()
    assert float(loss.detach()) == pytest.approx(1.0)  # ||0 - unit||^2 = 1


def test_low_frequency_share_is_one_for_constant_and_small_for_checkerboard():
    const = torch.ones(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(ref.low_frequency_share(const), torch.ones(2, dtype=torch.float64))
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2 - 1).double()
    share = ref.low_frequency_share(checker.expand(1, 1, 8, 8))
    assert float(share) < 1e-12


def test_direction_loss_gradient_stays_bounded_for_a_zero_initialised_model():
    """SiT/DiT zero-initialise the output layer: v1 = 0 at step 0. With the relative floor
    |v1| >= NORM_FLOOR |v_adr| the gradient is 2 lambda / (B NORM_FLOOR |v_adr|) ||d||,
    not ~1 / norm_eps."""
    batch, dim = 4, 64
    v_adr = torch.randn(batch, dim, dtype=torch.float64)
    v1 = torch.zeros(batch, dim, dtype=torch.float64, requires_grad=True)
    ref.adr_direction_loss(v1, v_adr).backward()
    a_norm = v_adr.norm(dim=1, keepdim=True)
    # n = NORM_FLOOR |v_adr| is a constant: d = -v_adr/|v_adr|, dL/dv1 = (2/B) d / n
    expected = (2 / batch) * (-v_adr / a_norm) / (ref.NORM_FLOOR * a_norm)
    torch.testing.assert_close(v1.grad, expected)
    v1_old = torch.zeros(batch, dim, dtype=torch.float64, requires_grad=True)
    ref.adr_direction_loss(v1_old, v_adr, norm_floor=0.0).backward()
    assert float(v1_old.grad.norm()) > 1e4 * float(v1.grad.norm())  # what the floor prevents


def test_direction_loss_is_unchanged_above_the_floor():
    v_adr = torch.randn(3, 10, dtype=torch.float64)
    v1 = v_adr * 0.5 + 0.1 * torch.randn(3, 10, dtype=torch.float64)
    with_floor = ref.adr_direction_loss(v1, v_adr)
    without = ref.adr_direction_loss(v1, v_adr, norm_floor=0.0)
    torch.testing.assert_close(with_floor, without, rtol=0, atol=0)


def _objective(spec: ObjectiveSpec | None = None, **kw):
    """The reference objective on _objective_inputs(), inputs replaced by ``kw``."""
    x1, eps, v0, v1, x_hat, t0, t1, k = _objective_inputs()
    base = dict(v0=v0, v1=v1, x1=x1, eps=eps, x_hat=x_hat, t0=t0, t1=t1, k=k)
    base.update(kw)
    return ref.objective(LinearPath(), spec or ObjectiveSpec(), ObjectiveInputs(**base)), base


@pytest.mark.parametrize("adr_loss", ["mse", "direction"])
@pytest.mark.parametrize("weighted", [False, True])
def test_objective_per_sample_terms_average_to_the_loss(adr_loss, weighted):
    x1 = _objective_inputs()[0]
    weight = torch.rand(x1.shape[0], dtype=torch.float64) if weighted else None
    out, _ = _objective(ObjectiveSpec(adr_loss=adr_loss), fm_weight=weight, adr_weight=weight)
    assert out.per_sample.shape == (x1.shape[0],)
    torch.testing.assert_close(out.per_sample.mean(), out.loss, rtol=1e-12, atol=0)


def test_fm_weight_scales_each_samples_fm_term():
    x1, eps, v0, *_ = _objective_inputs()
    weight = torch.rand(x1.shape[0], dtype=torch.float64)
    out, _ = _objective(FLOW_MATCHING, v1=None, fm_weight=weight)
    per_sample = (v0 - (x1 - eps)).square().flatten(1).mean(1)
    torch.testing.assert_close(out.fc_loss, (weight * per_sample).mean())


def test_joint_output_gives_the_same_loss_and_gradients_as_two_halves():
    x1, eps, v0, v1, *_ = _objective_inputs()
    split = [z.detach().clone().requires_grad_() for z in (v0, v1)]
    joint = torch.cat([v0, v1]).detach().requires_grad_()
    a, _ = _objective(v0=split[0], v1=split[1])
    b, _ = _objective(v0=None, v1=None, v_joint=joint)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
    torch.testing.assert_close(joint.grad, torch.cat([split[0].grad, split[1].grad]))


def test_explicit_targets_replace_u_t0_and_v_adr():
    x1, eps, v0, v1, x_hat, t0, t1, k = _objective_inputs()
    u0, v_adr = torch.randn_like(v0), torch.randn_like(v1)
    out, _ = _objective(ObjectiveSpec(adr_loss="mse", fc=FCSpec(lambda_fc=0.0)), u0=u0, v_adr=v_adr)
    torch.testing.assert_close(out.fc_loss, (v0 - u0).square().mean())
    torch.testing.assert_close(out.adr_loss, (v1 - v_adr).square().mean())


def test_adr_target_is_u_t1_without_nan_for_unrolled_samples_at_t_one():
    x1, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4).double()
    t1 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    x_t1 = ref.interpolate(LinearPath(), x1, eps, t1)
    v_adr = ref.adr_target(LinearPath(), x1, eps, x_t1, t1)
    assert torch.isfinite(v_adr).all()
    torch.testing.assert_close(v_adr, ref.velocity_target(LinearPath(), x1, eps, t1))


def test_signed_fc_weight_keeps_the_sign_and_has_unit_mean_absolute_map():
    delta = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    w = ref.fc_weight(delta, lambda_fc=1.0, signed=True, kind="none")
    assert w.shape == delta.shape
    m = w - 1
    torch.testing.assert_close(m.abs().flatten(1).mean(1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(torch.sign(m), torch.sign(delta))


def test_squared_fc_form_weights_the_residual_before_squaring():
    x1, eps, v0, *_ = _objective_inputs()
    out, base = _objective(
        ObjectiveSpec(fc=FCSpec(form="squared", signed=True, filter="none")), v1=None
    )
    w = out.w
    torch.testing.assert_close(out.fc_loss, (w * (v0 - (x1 - eps))).square().mean())
