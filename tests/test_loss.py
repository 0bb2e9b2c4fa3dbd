"""ReflexFlowLoss end to end: special cases, conventions, determinism, gradients."""

import pytest
import torch

import reflexflow as rf
from tests.helpers import ConvVelocity, MLPVelocity, data_and_noise, gen

B, SHAPE = 6, (6, 3, 8, 8)


def _two_step_loss(model, x1, noise, t, k, **knobs):
    """The loss on given draws with rollout_steps=2, num_sampling_steps=10."""
    return rf.reflexflow_loss(
        model, x1, noise=noise, t=t, k=k, rollout_steps=2, num_sampling_steps=10, **knobs
    )


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
def test_zero_lambdas_equal_plain_fm_on_the_same_draws(path):
    model = ConvVelocity().double()
    x1, noise = data_and_noise()
    t = torch.linspace(0.0, 0.7, B, dtype=torch.float64)
    k = torch.tensor([1, 2, 0, 1, 2, 1])
    plain = rf.reflexflow_loss(model, x1, noise=noise, t=t, path=path, method="fm")
    zero = _two_step_loss(model, x1, noise, t, k, path=path, lambda_adr=0.0, lambda_fc=0.0)
    torch.testing.assert_close(zero.loss, plain.loss, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["reflexflow", "fm", "ip", "ss"])
def test_noise_at_1_round_trip_gives_the_same_loss(method):
    """A model in the diffusers convention (sigma = 1 - t, predicts -v) gives the same loss."""
    canonical = ConvVelocity().double()

    def diffusers_model(x, sigma):
        return -canonical(x, 1 - sigma)

    x1, noise = data_and_noise()
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
    x1, noise = data_and_noise()
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
        out = _two_step_loss(model, x1, noise, t, k, preset=preset, **mode)
        out.loss.backward()
        grads[name] = (out.loss.detach(), [p.grad.clone() for p in model.parameters()])
    for name in ("joint", "two-call"):
        torch.testing.assert_close(grads[name][0], grads["shared"][0], rtol=1e-12, atol=0)
        for a, b in zip(grads[name][1], grads["shared"][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_model_kwargs_follow_their_samples_through_rollout_and_joint_batch():
    model = ConvVelocity(num_classes=4).double()
    x1, noise = data_and_noise()
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
