"""The targets stage (reflexflow/targets.py): the ADR target points from the rolled-out
state to x1, the FC weight (k = 0 gives 1; fc_t_max, fc_per_channel, fc_source)."""

import pytest
import torch

import reflexflow as rf
from reflexflow import reference as ref
from tests.helpers import ConvVelocity, data_and_noise

B, SHAPE = 6, (6, 3, 8, 8)


def test_k_zero_everywhere_gives_unit_fc_weight_and_adr_target_u_t1():
    model = ConvVelocity().double()
    x1, noise = data_and_noise()
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
