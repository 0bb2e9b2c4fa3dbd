"""The objective's one contract (reflexflow/objective.py): ObjectiveSpec and ObjectiveInputs
give the loss the reference objective computes, on every backend, baselines included."""

import pytest
import torch

import reflexflow as rf
from reflexflow import reference as ref
from reflexflow.objective import ObjectiveInputs, ObjectiveSpec
from tests.helpers import ConvVelocity, data_and_noise, gen

B = 6


def test_objective_k_zero_rows_have_adr_target_exactly_u_t1():
    path = rf.GVPPath()
    x1, eps = data_and_noise()
    t1 = torch.full((B,), 0.3, dtype=torch.float64)
    x_t1 = ref.interpolate(path, x1, eps, t1)
    torch.testing.assert_close(
        ref.adr_target(path, x1, eps, x_t1, t1),
        ref.velocity_target(path, x1, eps, t1),
        rtol=0,
        atol=1e-15,
    )


def test_loss_equals_reference_objective_on_an_explicit_rollout():
    model = ConvVelocity().double()
    x1, noise = data_and_noise()
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
