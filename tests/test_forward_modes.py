"""The shared first call (the default forward mode) against a per-sample oracle.

The oracle calls the model separately for every sample and every Euler step (no
sharing, no batching, no sort): v0_i = v(x_t0_i, t0_i) with grad, k_i Euler steps of
no-grad calls from x_t0_i, v1_i = v(x^_t1_i, t1_i) with grad, and the objective of each
sample alone. With a deterministic model (float64) the batched, shared-call loss must
give the same rolled-out state, targets, loss and gradients, for per-sample k including
k = 0 rows, in both conventions. Call counts: sum(max(k_i - 1, 0)) no-grad
sample-forwards plus 2B gradient-carrying ones.
"""

from __future__ import annotations

import pytest
import torch

import reflexflow as rf
from reflexflow import reference as ref
from reflexflow.conventions import VelocityModel, to_canonical_time
from reflexflow.objective import FCSpec, ObjectiveInputs, ObjectiveSpec
from tests.helpers import ConvVelocity

B, SHAPE, H = 6, (6, 3, 6, 6), 0.1
K = torch.tensor([0, 1, 3, 2, 0, 3])


def _inputs(convention: str):
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
    noise = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
    t0 = torch.rand(B, generator=g, dtype=torch.float64) * (1 - 1e-3 - H * K.double())
    t = t0 if convention == "data_at_1" else 1 - t0
    return x1, noise, t


def _model_for(convention: str, net: torch.nn.Module):
    if convention == "data_at_1":
        return net
    return lambda x, sigma: -net(x, 1 - sigma)  # diffusers-style: sigma = 1 - t, predicts -v


def _oracle(net, convention, x1, noise, t, knobs):
    """Per-sample loss and rolled-out states, one model call per sample and step."""
    path = rf.LinearPath()
    velocity = VelocityModel(_model_for(convention, net), convention)
    t0 = to_canonical_time(t, convention)
    spec = ObjectiveSpec(
        lambda_adr=knobs["lambda_adr"],
        adr_loss=knobs["adr_loss"],
        fc=FCSpec(lambda_fc=knobs["lambda_fc"]),
    )
    losses, states = [], []
    for i in range(B):
        sl = slice(i, i + 1)
        x_t0 = ref.interpolate(path, x1[sl], noise[sl], t0[sl])
        v0 = velocity(x_t0, t0[sl])
        x = x_t0
        tau = t0[sl].clone()
        with torch.no_grad():
            for _ in range(int(K[i])):
                x = x + H * velocity(x, tau)
                tau = tau + H
        t1 = t0[sl] + H * K[sl].double()
        v1 = velocity(x, t1)
        inputs = ObjectiveInputs(
            v0=v0, v1=v1, x1=x1[sl], eps=noise[sl], x_hat=x, t0=t0[sl], t1=t1, k=K[sl]
        )
        out = ref.objective(path, spec, inputs)
        losses.append(out.loss)
        states.append(x)
    return torch.stack(losses).mean(), torch.cat(states)


@pytest.mark.parametrize("convention", ["data_at_1", "noise_at_1"])
@pytest.mark.parametrize("adr_loss", ["mse", "direction"])
def test_shared_first_call_equals_a_per_sample_oracle(convention, adr_loss):
    x1, noise, t = _inputs(convention)
    knobs = {"adr_loss": adr_loss, "lambda_adr": 2.0, "lambda_fc": 0.5}
    oracle_net = ConvVelocity().double()
    want, states = _oracle(oracle_net, convention, x1, noise, t, knobs)
    want.backward()

    net = ConvVelocity().double()
    out = rf.reflexflow_loss(
        _model_for(convention, net),
        x1,
        noise=noise,
        t=t,
        k=K,
        convention=convention,
        preset="grid-direction",
        fc_source="state",
        rollout_steps=3,
        num_sampling_steps=10,
        **knobs,
    )
    out.loss.backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=0)
    path = rf.LinearPath()
    t1 = to_canonical_time(out.t1, convention)
    delta = states - ref.interpolate(path, x1, noise, t1)
    torch.testing.assert_close(out.bias_norm, delta.flatten(1).norm(dim=1), rtol=1e-12, atol=0)
    assert torch.equal(out.bias_norm[K == 0], torch.zeros(2, dtype=torch.float64))
    for mine, theirs in zip(net.parameters(), oracle_net.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-12)


def test_shared_call_makes_sum_of_k_minus_one_no_grad_forwards_and_2b_with_grad():
    x1, noise, t = _inputs("data_at_1")
    net = ConvVelocity().double()
    calls = []

    def counting(x, tt):
        calls.append((x.shape[0], torch.is_grad_enabled()))
        return net(x, tt)

    rf.reflexflow_loss(
        counting,
        x1,
        noise=noise,
        t=t,
        k=K,
        preset="grid-direction",
        rollout_steps=3,
        num_sampling_steps=10,
    )
    no_grad = sum(n for n, grad in calls if not grad)
    with_grad = sum(n for n, grad in calls if grad)
    assert no_grad == int((K - 1).clamp_min(0).sum())
    assert with_grad == 2 * B
    assert sum(1 for _, grad in calls if grad) == 2  # two gradient-carrying calls of B


@pytest.mark.parametrize("schedule", ["grid", "single"])
def test_one_step_rollouts_need_no_rollout_call_at_all(schedule):
    x1 = torch.randn(4, 3, 4, 4)
    calls = []

    def counting(x, tt):
        calls.append(torch.is_grad_enabled())
        return -x

    rf.reflexflow_loss(
        counting, x1, preset="grid-direction", step_schedule=schedule, generator=torch.Generator()
    )
    assert calls == [True, True]


def test_fixed_k_shared_call_runs_a_static_plan_of_k_minus_one_full_batch_steps():
    x1 = torch.randn(4, 3, 4, 4)
    calls = []

    def counting(x, tt):
        calls.append((x.shape[0], torch.is_grad_enabled()))
        return -x

    rf.reflexflow_loss(
        counting, x1, preset="grid-direction", rollout_steps=3, k_draw="fixed", ss_prob=1.0
    )
    assert calls == [(4, True), (4, False), (4, False), (4, True)]
