"""The reference formulas against docs/method.md, independently of the loss module."""

import pytest
import torch

from reflexflow import LinearPath
from reflexflow import reference as ref
from reflexflow.objective import FLOW_MATCHING, FCSpec, ObjectiveInputs, ObjectiveSpec
from tests.helpers import one_step_inputs

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


# --------------------------------------------------- the peers' options (docs/peer-readings.md)


def _peer_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(x1.shape, generator=g, dtype=torch.float64)
    delta = torch.randn(x1.shape, generator=g, dtype=torch.float64)
    return x1, eps, delta


def test_signed_sum_normalised_fc_weight_is_simpletuners_and_the_mean_form_over_n():
    _, _, delta = _peer_inputs()
    w = ref.fc_weight(delta, signed=True, kind="none", normalize="sum")
    want = 1 + delta / delta.abs().flatten(1).sum(1).clamp_min(1e-6).view(-1, 1, 1, 1)
    torch.testing.assert_close(w, want, rtol=1e-14, atol=0)
    # sum = N mean: SimpleTuner's weight is the mean form with lambda_fc = 1 / (C H W)
    n = delta[0].numel()
    mean_form = ref.fc_weight(delta, signed=True, kind="none", lambda_fc=1 / n)
    torch.testing.assert_close(w, mean_form, rtol=1e-10, atol=0)
    assert float((w - 1).abs().max()) < 1.0  # of size 1/N, where the mean form reaches ~N/N


def test_l2_channel_sum_normalised_fc_weight_is_takenokos():
    _, _, delta = _peer_inputs(1)
    w = ref.fc_weight(delta, kind="none", normalize="sum", channel_reduce="l2")
    e = delta.norm(dim=1, keepdim=True).clamp_min(1e-6)
    want = 1 + e / e.flatten(1).sum(1).clamp_min(1e-6).view(-1, 1, 1, 1)
    torch.testing.assert_close(w, want, rtol=1e-14, atol=0)
    assert w.shape == (3, 1, 4, 5)


def test_fc_adds_fm_puts_the_weighted_term_on_top_of_plain_fm_on_fc_rows_only():
    x1, eps, delta = _peer_inputs(2)
    v0 = torch.randn_like(x1)
    u0 = x1 - eps
    w = ref.fc_weight(delta, kind="none", normalize="sum", channel_reduce="l2")
    active = torch.tensor([True, False, True])
    rows, value = ref.fc_term(v0, u0, w, "squared", adds_fm=True, active=active)
    r2 = (v0 - u0).square()
    want = ref.per_sample_mean(r2) + active.double() * ref.per_sample_mean(w.square() * r2)
    torch.testing.assert_close(rows, want, rtol=1e-14, atol=0)
    torch.testing.assert_close(value, want.mean(), rtol=1e-14, atol=0)


def test_adr_target_grad_lets_the_gradient_flow_through_the_target():
    x1, eps, _ = _peer_inputs(3)
    path = LinearPath()
    t0 = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64)
    t1 = torch.tensor([0.6, 0.8, 0.9], dtype=torch.float64)
    grads = {}
    for target_grad in (False, True):
        v0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(4), dtype=x1.dtype)
        v0.requires_grad_(True)
        x_hat = ref.interpolate(path, x1, eps, t0) + ref.bcast(t1 - t0, x1) * v0
        spec = ObjectiveSpec(
            adr_loss="direction",
            fc=FCSpec(lambda_fc=0.0),
            norm_floor=0.0,
            adr_target_grad=target_grad,
        )
        inputs = one_step_inputs(x1, eps, x_hat, t0, t1, v0=v0, v1=1.3 * x_hat)
        loss = ref.objective(path, spec, inputs).loss
        (got,) = torch.autograd.grad(loss, v0, retain_graph=True)
        # by hand: plain FM at t0 + 10 x direction loss of v1 = 1.3 x^ against
        # v_adr = (x1 - x^) / (1 - t1), detached or not
        v = (1.3 * x_hat).flatten(1)
        a = ((x1 - x_hat) / ref.bcast(1 - t1, x1)).flatten(1)
        a = a if target_grad else a.detach()
        d = v / v.norm(dim=1, keepdim=True) - a / a.norm(dim=1, keepdim=True)
        by_hand = (v0 - (x1 - eps)).square().mean() + 10 * d.square().sum(1).mean()
        (want,) = torch.autograd.grad(by_hand, v0)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        grads[target_grad] = got
    assert not torch.allclose(grads[False], grads[True])


@pytest.mark.parametrize(
    "spec",
    [
        ObjectiveSpec(fc=FCSpec(normalize="sum")),
        ObjectiveSpec(fc=FCSpec(channel_reduce="l2")),
        ObjectiveSpec(fc=FCSpec(adds_fm=True)),
        ObjectiveSpec(adr_target_grad=True),
    ],
    ids=["normalize", "channel_reduce", "adds_fm", "adr_target_grad"],
)
def test_a_spec_the_kernels_do_not_implement_is_routed_to_the_reference(spec):
    from reflexflow.stages import select_objective

    x1, eps, _ = _peer_inputs()
    x1, eps = x1.float(), eps.float()
    t = torch.full((3,), 0.5)
    inputs = one_step_inputs(x1, eps, x1, t, t, v0=x1, v1=x1)
    assert spec.reference_only and not ObjectiveSpec().reference_only
    for backend in ("torch", "auto", "triton"):
        assert select_objective(backend, LinearPath(), spec, inputs) is ref.objective


def test_the_default_spec_still_goes_to_the_kernels_under_backend_triton():
    from reflexflow import kernels
    from reflexflow.stages import select_objective

    x1, eps, _ = _peer_inputs()
    x1, eps = x1.float(), eps.float()
    t = torch.full((3,), 0.5)
    inputs = one_step_inputs(x1, eps, x1, t, t, v0=x1, v1=x1)
    if not kernels.supports(LinearPath(), ObjectiveSpec(), inputs):
        pytest.skip("the kernels do not run here")
    chosen = select_objective("triton", LinearPath(), ObjectiveSpec(), inputs)
    assert chosen is kernels.fused_objective


@pytest.mark.parametrize("path_name", ["linear", "gvp", "vp"])
def test_adr_x1_weight_is_one_up_to_t_c_and_the_squared_data_error_ratio_beyond(path_name):
    from reflexflow.paths import get_path

    path = get_path(path_name)
    t = torch.linspace(0.0, 0.999, 1000, dtype=torch.float64)
    w = ref.adr_x1_weight(path, t, 0.9)
    c = ref.data_error_scale(path, t)
    c_c = ref.data_error_scale(path, torch.tensor([0.9], dtype=torch.float64))
    torch.testing.assert_close(w, (c / c_c).square().clamp_max(1.0))
    assert bool((w[t <= 0.9] == 1).all()) and bool((w[t > 0.9] < 1).all())
    if path_name == "linear":  # c = 1 - t
        torch.testing.assert_close(c, 1 - t)
    # c |s'/s| -> 1 as t -> 1: the weighted mse error c (v1 - v_adr) stays bounded
    t_end = torch.tensor([0.999], dtype=torch.float64)
    ratio = ref.data_error_scale(path, t_end) * ref.adr_ratio(path, t_end).abs()
    assert abs(float(ratio) - 1) < 1e-3


@pytest.mark.parametrize("path_name", ["linear", "gvp", "vp"])
def test_adr_x1_weight_is_zero_not_nan_at_t_one(path_name):
    from reflexflow.paths import get_path

    # a row that does not roll out may sit at t1 = 1 (a user's t), where s = 0 and vp's s'
    # is infinite: c(1) = 0, so the weight is 0 and the row stays finite
    for dtype in (torch.float64, torch.float32):
        w = ref.adr_x1_weight(get_path(path_name), torch.tensor([1.0, 0.5], dtype=dtype), 0.9)
        assert w.tolist() == [0.0, 1.0]
