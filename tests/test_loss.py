"""ReflexFlowLoss end to end: special cases, conventions, determinism, gradients."""

import warnings

import pytest
import torch

import reflexflow as rf
from reflexflow import reference as ref
from reflexflow.objective import ObjectiveInputs, ObjectiveSpec
from tests.helpers import ConvVelocity, MLPVelocity, gen

B, SHAPE = 6, (6, 3, 8, 8)


def _data(seed=0, dtype=torch.float64, shape=SHAPE):
    g = gen(seed)
    return torch.randn(*shape, generator=g, dtype=dtype), torch.randn(
        *shape, generator=g, dtype=dtype
    )


def test_k_zero_everywhere_gives_unit_fc_weight_and_adr_target_u_t1():
    model = ConvVelocity().double()
    x1, noise = _data()
    t = torch.linspace(0.1, 0.8, B, dtype=torch.float64)
    k = torch.zeros(B, dtype=torch.int64)
    out = rf.reflexflow_loss(
        model, x1, noise=noise, t=t, k=k, preset="grid-direction", adr_loss="mse"
    )
    assert torch.equal(out.fc_weight, torch.ones_like(out.fc_weight))
    assert torch.equal(out.bias_norm, torch.zeros(B, dtype=torch.float64))
    assert torch.equal(out.t1, out.t0)
    # ADR target = u_t1 = u_t0 at the same input: L = L_FM + 10 * L_FM
    v = model(ref.interpolate(rf.LinearPath(), x1, noise, t), t)
    fm = ref.fm_loss(v, x1 - noise)
    torch.testing.assert_close(out.fc_loss, fm.detach())
    torch.testing.assert_close(out.adr_loss, fm.detach())
    torch.testing.assert_close(out.loss, 11 * fm)


def test_objective_k_zero_rows_have_adr_target_exactly_u_t1():
    path = rf.GVPPath()
    x1, eps = _data()
    t1 = torch.full((B,), 0.3, dtype=torch.float64)
    x_t1 = ref.interpolate(path, x1, eps, t1)
    torch.testing.assert_close(
        ref.adr_target(path, x1, eps, x_t1, t1),
        ref.velocity_target(path, x1, eps, t1),
        rtol=0,
        atol=1e-15,
    )


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
def test_zero_lambdas_equal_plain_fm_on_the_same_draws(path):
    model = ConvVelocity().double()
    x1, noise = _data()
    t = torch.linspace(0.0, 0.7, B, dtype=torch.float64)
    k = torch.tensor([1, 2, 0, 1, 2, 1])
    plain = rf.reflexflow_loss(model, x1, noise=noise, t=t, path=path, method="fm")
    zero = rf.reflexflow_loss(
        model,
        x1,
        noise=noise,
        t=t,
        k=k,
        path=path,
        rollout_steps=2,
        num_sampling_steps=10,
        lambda_adr=0.0,
        lambda_fc=0.0,
    )
    torch.testing.assert_close(zero.loss, plain.loss, rtol=0, atol=0)


def test_loss_equals_reference_objective_on_an_explicit_rollout():
    model = ConvVelocity().double()
    x1, noise = _data()
    t = torch.linspace(0.0, 0.6, B, dtype=torch.float64)
    k = torch.tensor([2, 0, 1, 2, 1, 0])
    knobs = {"rollout_steps": 2, "num_sampling_steps": 10, "preset": "grid-direction"}
    out = rf.reflexflow_loss(model, x1, noise=noise, t=t, k=k, **knobs)
    path = rf.LinearPath()
    x_t0 = ref.interpolate(path, x1, noise, t)
    step = torch.full_like(t, 0.1)
    vel = rf.VelocityModel(model)
    x_hat = ref.euler_rollout_per_sample(vel, x_t0, t, k, step)
    t1 = t + 0.1 * k
    inputs = ObjectiveInputs(
        v0=model(x_t0, t), v1=model(x_hat, t1), x1=x1, eps=noise, x_hat=x_hat, t0=t, t1=t1, k=k
    )
    expected = ref.objective(path, ObjectiveSpec(), inputs)
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out.t1, t1)
    torch.testing.assert_close(out.bias_norm, expected.delta.flatten(1).norm(dim=1))


@pytest.mark.parametrize("method", ["reflexflow", "fm", "ip", "ss"])
def test_noise_at_1_round_trip_gives_the_same_loss(method):
    """A model in the diffusers convention (sigma = 1 - t, predicts -v) gives the same loss."""
    canonical = ConvVelocity().double()

    def diffusers_model(x, sigma):
        return -canonical(x, 1 - sigma)

    x1, noise = _data()
    t = torch.linspace(0.05, 0.6, B, dtype=torch.float64)
    k = torch.tensor([1, 0, 1, 1, 0, 1]) if method in ("reflexflow", "ss") else None
    knobs = {"method": method, "num_sampling_steps": 10}
    a = rf.reflexflow_loss(canonical, x1, noise=noise, t=t, k=k, generator=gen(3), **knobs)
    b = rf.reflexflow_loss(
        diffusers_model,
        x1,
        noise=noise,
        t=1 - t,
        k=k,
        generator=gen(3),
        convention="noise_at_1",
        **knobs,
    )
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.t0, 1 - a.t0)


def test_timestep_scale_multiplies_the_time_the_model_sees():
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    x1 = torch.randn(2, 3)
    rf.reflexflow_loss(
        model,
        x1,
        t=torch.tensor([0.2, 0.4]),
        method="fm",
        convention="noise_at_1",
        timestep_scale=1000.0,
    )
    torch.testing.assert_close(seen[0], torch.tensor([200.0, 400.0]))


def test_same_generator_gives_the_same_loss_twice():
    model = ConvVelocity()
    x1 = torch.randn(*SHAPE)
    loss_fn = rf.ReflexFlowLoss(
        rollout_steps=3, num_sampling_steps=20, ss_prob=0.5, k_draw="uniform"
    )
    a = loss_fn(model, x1, generator=gen(7))
    b = loss_fn(model, x1, generator=gen(7))
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.k, b.k) and torch.equal(a.t0, b.t0)
    c = loss_fn(model, x1, generator=gen(8))
    assert not torch.equal(a.loss, c.loss)


def test_drawn_times_and_lengths_leave_room_for_the_rollout():
    model = MLPVelocity()
    x1 = torch.randn(512, 5)
    for schedule in ("grid", "single"):
        out = rf.reflexflow_loss(
            model,
            x1,
            rollout_steps=4,
            num_sampling_steps=8,
            step_schedule=schedule,
            ss_prob=0.75,
            generator=gen(1),
            lambda_fc=0.0,
        )
        assert bool((out.t0 >= 0).all()) and bool((out.t1 <= 1 - 1e-3 + 1e-6).all())
        assert bool((out.t1 >= out.t0).all())
        assert set(out.k.unique().tolist()) <= ({0, 1, 2, 3, 4} if schedule == "grid" else {0, 1})
        frac_rolled = float((out.k > 0).double().mean())
        assert 0.65 < frac_rolled < 0.85
        if schedule == "grid":
            torch.testing.assert_close(out.t1 - out.t0, out.k.float() / 8)


@pytest.mark.parametrize("preset", ["defar", "grid-direction"])
def test_shared_joint_and_two_call_modes_give_the_same_loss_and_gradients(preset):
    x1, noise = _data()
    t = torch.linspace(0.0, 0.6, B, dtype=torch.float64)
    k = torch.tensor([1, 0, 2, 1, 2, 0])
    modes = {
        "shared": {},
        "joint": {"joint_forward": True},
        "two-call": {"share_first_call": False},
    }
    grads = {}
    for name, mode in modes.items():
        model = ConvVelocity().double()
        out = rf.reflexflow_loss(
            model,
            x1,
            noise=noise,
            t=t,
            k=k,
            preset=preset,
            rollout_steps=2,
            num_sampling_steps=10,
            **mode,
        )
        out.loss.backward()
        grads[name] = (out.loss.detach(), [p.grad.clone() for p in model.parameters()])
    for name in ("joint", "two-call"):
        torch.testing.assert_close(grads[name][0], grads["shared"][0], rtol=1e-12, atol=0)
        for a, b in zip(grads[name][1], grads["shared"][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_model_kwargs_follow_their_samples_through_rollout_and_joint_batch():
    model = ConvVelocity(num_classes=4).double()
    x1, noise = _data()
    y = torch.tensor([0, 3, 1, 2, 3, 0])
    t = torch.linspace(0.0, 0.5, B, dtype=torch.float64)
    k = torch.tensor([1, 3, 0, 2, 3, 1])
    knobs = {"rollout_steps": 3, "num_sampling_steps": 10}
    full = rf.reflexflow_loss(
        model,
        x1,
        noise=noise,
        t=t,
        k=k,
        model_kwargs={"y": y},
        adr_loss="mse",
        lambda_fc=0.0,
        **knobs,
    )
    # one sample at a time: the per-sample mse terms averaged equal the batched loss
    parts = [
        rf.reflexflow_loss(
            model,
            x1[i : i + 1],
            noise=noise[i : i + 1],
            t=t[i : i + 1],
            k=k[i : i + 1],
            model_kwargs={"y": y[i : i + 1]},
            adr_loss="mse",
            lambda_fc=0.0,
            **knobs,
        ).loss
        for i in range(B)
    ]
    torch.testing.assert_close(full.loss, torch.stack(parts).mean())


@pytest.mark.parametrize(
    "mode, expected",
    [
        # shared first call (default): v(x_t0, t0) with grad, 1 more rollout step, v1
        ({}, [True, False, True]),
        # full no-grad rollout (2 steps), then the 2B call
        ({"joint_forward": True}, [False, False, True]),
        ({"share_first_call": False}, [False, False, True, True]),
    ],
)
def test_fc_weight_and_rollout_carry_no_gradient(mode, expected):
    model = ConvVelocity()
    x1 = torch.randn(*SHAPE)
    knobs = {"preset": "grid-direction", "rollout_steps": 2, "num_sampling_steps": 10, **mode}
    out = rf.reflexflow_loss(model, x1, generator=gen(0), **knobs)
    assert not out.fc_weight.requires_grad
    assert not out.bias_norm.requires_grad
    calls = []

    def counting(x, t):
        calls.append(torch.is_grad_enabled())
        return model(x, t)

    rf.reflexflow_loss(counting, x1, k=torch.full((B,), 2), t=torch.full((B,), 0.2), **knobs)
    assert calls == expected


def test_rollout_grad_lets_the_adr_gradient_reach_the_first_call():
    x1 = torch.randn(*SHAPE)
    t = torch.full((B,), 0.3)
    k = torch.ones(B, dtype=torch.int64)
    grads = {}
    for flag in (False, True):
        model = ConvVelocity()
        inputs = []

        def recording(x, tt, model=model, inputs=inputs):
            inputs.append(x)
            return model(x, tt)

        out = rf.reflexflow_loss(
            recording, x1, t=t, k=k, rollout_grad=flag, lambda_fc=0.0, num_sampling_steps=10
        )
        out.loss.backward()
        grads[flag] = model.conv1.weight.grad.clone()
        if flag:  # second call's input is the Euler step of the first call, graph kept
            assert inputs[-1].requires_grad
    assert not torch.allclose(grads[False], grads[True])


def test_adr_target_points_from_the_biased_state_towards_x1():
    """Toy: a model that drifts away from the data; v_adr must point back at x1."""
    x1 = torch.tensor([[2.0, -1.0]], dtype=torch.float64).repeat(4, 1)
    noise = torch.zeros_like(x1)

    def drifting(x, t):  # true velocity x1 - eps = x1, plus a sideways push
        return x1[:1].expand_as(x) + torch.tensor([0.0, 3.0], dtype=x.dtype)

    t = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64)
    k = torch.ones(4, dtype=torch.int64)
    out = rf.reflexflow_loss(drifting, x1, noise=noise, t=t, k=k, num_sampling_steps=10)
    assert bool((out.bias_norm > 0).all())
    path = rf.LinearPath()
    x_hat = ref.interpolate(path, x1, noise, out.t0) + 0.1 * drifting(x1, t)
    v_adr = ref.adr_target(path, x1, noise, x_hat, out.t1)
    to_data = x1 - x_hat
    cos = torch.nn.functional.cosine_similarity(v_adr, to_data, dim=1)
    torch.testing.assert_close(cos, torch.ones(4, dtype=torch.float64))
    # following v_adr for the remaining time lands exactly on x1
    torch.testing.assert_close(x_hat + ref.bcast(1 - out.t1, x_hat) * v_adr, x1)


def test_fc_t_max_and_fc_per_channel_shape_the_weight():
    model = ConvVelocity()
    x1 = torch.randn(*SHAPE)
    t = torch.tensor([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    k = torch.ones(B, dtype=torch.int64)
    out = rf.reflexflow_loss(model, x1, t=t, k=k, fc_t_max=0.5, num_sampling_steps=10)
    assert torch.equal(out.fc_weight[3:], torch.ones_like(out.fc_weight[3:]))
    assert bool((out.fc_weight[:3].mean(dim=(1, 2, 3)) - 2).abs().max() < 1e-5)
    out = rf.reflexflow_loss(model, x1, t=t, k=k, fc_per_channel=True, num_sampling_steps=10)
    assert out.fc_weight.shape == SHAPE


def test_velocity_fc_source_uses_an_extra_no_grad_forward():
    model = ConvVelocity()
    x1 = torch.randn(*SHAPE)
    calls = []

    def counting(x, t):
        calls.append((x.shape[0], torch.is_grad_enabled()))
        return model(x, t)

    for mode, expected in (
        ({"joint_forward": True}, [(B, False), (2 * B, True), (B, False)]),
        ({}, [(B, True), (B, True), (B, False)]),  # shared first call: no rollout call
    ):
        calls.clear()
        out = rf.reflexflow_loss(
            counting,
            x1,
            t=torch.full((B,), 0.2),
            k=torch.ones(B, dtype=torch.int64),
            preset="grid-direction",
            fc_source="velocity",
            num_sampling_steps=10,
            **mode,
        )
        assert calls == expected
        assert float(out.fc_weight.mean()) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("shape", [(4, 7), (4, 2, 9), (2, 3, 8, 8), (2, 2, 3, 6, 5)])
def test_every_layout_runs_and_backpropagates(shape):
    x1 = torch.randn(*shape)
    weight = torch.ones((), requires_grad=True)
    out = rf.reflexflow_loss(
        lambda x, t: weight * x,
        x1,
        generator=gen(0),
        rollout_steps=2,
        num_sampling_steps=10,
        k_draw="fixed",
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and weight.grad is not None
    assert out.fc_weight.shape[0] == shape[0]


def test_float32_data_with_bf16_model_keeps_float32_state_and_loss():
    model = ConvVelocity().to(torch.bfloat16)
    seen = []

    def bf16_model(x, t):
        seen.append(x.dtype)
        return model(x.to(torch.bfloat16), t).to(torch.bfloat16)

    x1 = torch.randn(*SHAPE)
    out = rf.reflexflow_loss(bf16_model, x1, generator=gen(0), num_sampling_steps=10)
    assert out.loss.dtype == torch.float32 and out.fc_weight.dtype == torch.float32
    assert set(seen) == {torch.float32}
    seen.clear()
    out16 = rf.reflexflow_loss(
        bf16_model, x1.to(torch.bfloat16), generator=gen(0), num_sampling_steps=10
    )
    assert out16.loss.dtype == torch.float32 and set(seen) == {torch.bfloat16}


def test_module_and_functional_twins_agree():
    model = ConvVelocity()
    x1 = torch.randn(*SHAPE)
    knobs = {"rollout_steps": 2, "num_sampling_steps": 10, "adr_loss": "mse", "lambda_fc": 0.5}
    a = rf.ReflexFlowLoss(**knobs)(model, x1, generator=gen(2))
    b = rf.reflexflow_loss(model, x1, generator=gen(2), **knobs)
    assert torch.equal(a.loss, b.loss)
    assert "lambda_fc=0.5" in repr(rf.ReflexFlowLoss(**knobs))


# -- non-finite values: the stage that made them, or one warning --------------------------


def _nan_when(condition):
    """A conv velocity whose output is NaN when condition() holds at call time."""
    net = ConvVelocity()

    def model(x, t):
        v = net(x, t)
        return v * float("nan") if condition() else v

    return model


def test_check_finite_names_the_data_stage_for_nan_noise():
    x1 = torch.randn(4, 3, 6, 6)
    noise = torch.randn_like(x1)
    noise[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="noise has non-finite values .* stage 'data'"):
        rf.reflexflow_loss(ConvVelocity(), x1, noise=noise, check_finite=True)


def test_check_finite_names_the_rollout_state_when_only_no_grad_calls_return_nan():
    model = _nan_when(lambda: not torch.is_grad_enabled())
    with pytest.raises(ValueError, match="x_hat has non-finite values .* 'rollout state'"):
        rf.reflexflow_loss(
            model,
            torch.randn(4, 3, 6, 6),
            t=torch.full((4,), 0.3),
            k=torch.full((4,), 2),
            preset="grid-direction",
            rollout_steps=2,
            check_finite=True,
        )


def test_check_finite_names_the_model_outputs_when_the_gradient_calls_return_nan():
    model = _nan_when(torch.is_grad_enabled)
    with pytest.raises(ValueError, match="v0 has non-finite values .* 'model outputs'"):
        rf.reflexflow_loss(
            model,
            torch.randn(4, 3, 6, 6),
            preset="grid-direction",
            share_first_call=False,
            check_finite=True,
        )


def test_check_finite_names_the_velocity_bias_when_its_no_grad_calls_return_nan():
    """k = 0 everywhere: no rollout call, so only FC's velocity-space bias calls run
    without grad."""
    model = _nan_when(lambda: not torch.is_grad_enabled())
    with pytest.raises(ValueError, match="fc_delta has non-finite values .* 'velocity bias'"):
        rf.reflexflow_loss(
            model,
            torch.randn(4, 3, 6, 6),
            t=torch.full((4,), 0.3),
            k=torch.zeros(4, dtype=torch.int64),
            preset="defar",
            check_finite=True,
        )


def test_non_finite_loss_without_check_finite_warns_once_suggesting_it(monkeypatch):
    """Default mode: the flag is copied to the host without a sync and read once it has
    landed (on CPU at once), one RuntimeWarning per process; the loss comes back NaN."""
    from reflexflow import finite

    monkeypatch.setattr(finite, "WATCH", finite.NonFiniteWatch())
    loss_fn = rf.ReflexFlowLoss()  # preset "defar": no host read of its own
    model = _nan_when(lambda: not torch.is_grad_enabled())
    x1 = torch.randn(4, 3, 6, 6)
    with pytest.warns(RuntimeWarning, match="check_finite=True"):
        out = loss_fn(model, x1)
    assert torch.isnan(out.loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(model, x1)  # once per process


def test_non_finite_lean_loss_warns_at_backward(monkeypatch):
    from reflexflow import finite

    monkeypatch.setattr(finite, "WATCH", finite.NonFiniteWatch())
    out = rf.reflexflow_loss(_nan_when(lambda: True), torch.randn(4, 3, 6, 6), memory="lean")
    with pytest.warns(RuntimeWarning, match="check_finite=True"):
        out.backward()


def test_finite_losses_give_no_warning(monkeypatch):
    from reflexflow import finite

    monkeypatch.setattr(finite, "WATCH", finite.NonFiniteWatch())
    loss_fn = rf.ReflexFlowLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            loss_fn(ConvVelocity(), torch.randn(4, 3, 6, 6))
    assert not finite.WATCH.warned


@pytest.mark.parametrize("method", ["fm", "ip", "ss"])
def test_baselines_take_the_same_objective_on_every_backend(method, monkeypatch):
    """fm, ip and ss are the objective with lambda_adr = lambda_fc = 0 (FLOW_MATCHING):
    backend="triton" routes them to the fused kernels, with the reference's loss and rows."""
    from reflexflow import kernels

    if not kernels.triton_usable("cpu"):
        pytest.skip("Triton needs TRITON_INTERPRET=1 on CPU")
    calls, fused = [], kernels.fused_objective
    monkeypatch.setattr(
        kernels, "fused_objective", lambda *a, **kw: calls.append(1) or fused(*a, **kw)
    )
    outs = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        out = rf.reflexflow_loss(
            ConvVelocity(),
            torch.randn(4, 3, 6, 6, generator=gen(1)),
            generator=gen(2),
            method=method,
            backend=backend,
        )
        outs.append(out)
    want, got = outs
    assert len(calls) == 1  # the triton run took the kernels, the torch run did not
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.per_sample_loss, want.per_sample_loss, rtol=1e-5, atol=1e-6)
    assert got.adr_loss is None and got.fc_weight is None
