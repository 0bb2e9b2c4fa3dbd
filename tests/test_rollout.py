"""The batched rollout (reflexflow/rollout.py) equals the per-sample oracle; it runs only
active samples."""

import torch

import reflexflow as rf
from reflexflow import reference as ref
from reflexflow.rollout import active_counts, euler_rollout, rollout_plan
from tests.helpers import ConvVelocity


def test_rollout_plan_sorts_by_k_and_counts_active_samples_per_step():
    k = torch.tensor([0, 3, 1, 3, 2, 0])
    t0, step = torch.zeros(6), torch.full((6,), 0.25)
    order, counts, times, steps = rollout_plan(k, t0, step)
    assert order.tolist() == [1, 3, 4, 2, 0, 5]  # stable, descending
    assert counts.tolist() == active_counts(k.tolist()) == [4, 3, 2]
    assert times[:, 0].tolist() == [0.0, 0.25, 0.5] and torch.equal(steps, step)
    given = rollout_plan(k, t0, step, 2)  # a given step count: no read of k
    assert given[1].tolist() == [4, 3] and given[2].shape == (2, 6)


def test_rollout_together_equals_one_by_one_for_per_sample_k():
    model = ConvVelocity(num_classes=3).double()
    vel = rf.VelocityModel(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 6, 5, generator=g, dtype=torch.float64)
    t0 = torch.rand(7, generator=g, dtype=torch.float64) * 0.5
    k = torch.tensor([0, 3, 1, 2, 3, 0, 1])
    step = torch.rand(7, generator=g, dtype=torch.float64) * 0.1
    kwargs = {"y": torch.tensor([0, 1, 2, 0, 1, 2, 0])}
    together = euler_rollout(vel, x, t0, k, step, kwargs)
    one_by_one = ref.euler_rollout_per_sample(vel, x, t0, k, step, kwargs)
    torch.testing.assert_close(together, one_by_one, rtol=1e-12, atol=1e-12)
    assert torch.equal(together[k == 0], x[k == 0])  # k = 0 rows untouched, bit for bit


def test_rollout_runs_exactly_sum_of_k_sample_forwards():
    vel = rf.VelocityModel(lambda x, t: -x)
    x = torch.randn(8, 4)
    k = torch.tensor([0, 1, 4, 2, 0, 3, 1, 1])
    euler_rollout(vel, x, torch.zeros(8), k, torch.full((8,), 0.05))
    assert vel.sample_forwards == int(k.sum())
    assert vel.calls == int(k.max())


def test_rollout_does_not_modify_its_input_and_builds_no_graph():
    weight = torch.ones((), requires_grad=True)
    vel = rf.VelocityModel(lambda x, t: weight * x)
    x = torch.randn(3, 2)
    before = x.clone()
    out = euler_rollout(vel, x, torch.zeros(3), torch.tensor([2, 1, 0]), torch.full((3,), 0.1))
    assert torch.equal(x, before)
    assert not out.requires_grad
    torch.testing.assert_close(out[0], x[0] * 1.1**2)


def test_static_plan_for_a_fixed_k_equals_the_sorted_plan_bit_for_bit():
    model = ConvVelocity(num_classes=3)
    vel = rf.VelocityModel(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 6, 5, generator=g)
    t0 = torch.rand(5, generator=g) * 0.5
    k = torch.full((5,), 3)
    step = torch.full((5,), 0.05)
    kwargs = {"y": torch.tensor([0, 1, 2, 0, 1])}
    planned = euler_rollout(vel, x, t0, k, step, kwargs)
    static = euler_rollout(vel, x, t0, k, step, kwargs, fixed_k=3)
    assert torch.equal(planned, static)


def test_model_kwargs_in_any_mapping_follow_their_samples():
    from types import MappingProxyType

    model = ConvVelocity(num_classes=3).double()
    x1 = torch.randn(4, 3, 6, 5, dtype=torch.float64)
    noise = torch.randn_like(x1)
    y = torch.tensor([0, 2, 1, 2])
    knobs = {"rollout_steps": 2, "num_sampling_steps": 10, "k": torch.tensor([1, 2, 2, 1])}
    plain = rf.reflexflow_loss(
        model, x1, noise=noise, t=torch.full((4,), 0.3), model_kwargs={"y": y}, **knobs
    )
    proxy = rf.reflexflow_loss(
        model,
        x1,
        noise=noise,
        t=torch.full((4,), 0.3),
        model_kwargs=MappingProxyType({"y": y}),
        **knobs,
    )
    assert torch.equal(plain.loss, proxy.loss)
