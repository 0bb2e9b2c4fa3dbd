"""What users pass: their own times (SiT), model_kwargs, and the model's training mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reflexflow as rf
from tests.helpers import ConvVelocity

B = 8


def test_sit_times_up_to_one_are_accepted_and_unfitting_rollouts_dropped():
    """SiT draws t ~ U[0, 1): t > 1 - t_eps must be valid; rollouts that do not fit drop."""
    t = torch.tensor([0.0, 0.3, 0.97, 0.985, 0.9995, 0.99999, 1.0, 0.5])
    out = rf.reflexflow_loss(
        ConvVelocity(), torch.randn(B, 3, 4, 4), t=t, rollout_steps=1, num_sampling_steps=50
    )
    torch.testing.assert_close(out.t0, t)  # the user's times, unchanged
    room = 1 - 1e-3 - 1 / 50
    assert torch.equal(out.k, (t <= room + 1e-6).long())
    assert torch.isfinite(out.loss)
    out.loss.backward()


@pytest.mark.parametrize("convention", ["data_at_1", "noise_at_1"])
def test_user_times_with_drawn_k_keep_fitting_rollouts(convention):
    t = torch.linspace(0.0, 0.5, B, dtype=torch.float64)
    t = t if convention == "data_at_1" else 1 - t
    out = rf.reflexflow_loss(
        ConvVelocity().double(),
        torch.randn(B, 3, 4, 4, dtype=torch.float64),
        t=t,
        convention=convention,
        rollout_steps=3,
        k_draw="fixed",
        num_sampling_steps=10,
    )
    assert torch.equal(out.k, torch.full((B,), 3))


def test_explicit_k_that_does_not_fit_explicit_t_is_still_an_error():
    with pytest.raises(ValueError, match=r"k\[0\] = 1 does not fit"):
        rf.reflexflow_loss(
            ConvVelocity(),
            torch.randn(2, 3, 4, 4),
            t=torch.tensor([0.999, 0.1]),
            k=torch.tensor([1, 1]),
        )


def test_a_kwarg_tensor_of_another_batch_size_is_named():
    y = torch.zeros(B + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\] has shape \(9,\)"):
        rf.reflexflow_loss(
            ConvVelocity(num_classes=4), torch.randn(B, 3, 4, 4), model_kwargs={"y": y}
        )
    nested = {"extra": {"mask": torch.ones(1, 5)}}
    with pytest.raises(ValueError, match=r"model_kwargs\['extra'\]\['mask'\]"):
        rf.reflexflow_loss(lambda x, t, extra: -x, torch.randn(B, 3), model_kwargs=nested)


def test_unbatched_kwargs_reach_the_model_as_they_are_even_with_batch_size_rows():
    ids = torch.arange(B * 3).view(B, 3)  # B rows, like Flux's img_ids with B tokens
    seen = []

    def model(x, t, img_ids, y):
        seen.append((img_ids, y.shape[0], x.shape[0]))
        return -x

    y = torch.arange(B)
    rf.reflexflow_loss(
        model,
        torch.randn(B, 3, 4, 4),
        model_kwargs={"img_ids": ids, "y": y},
        unbatched_kwargs=("img_ids",),
        joint_forward=True,
    )
    assert all(s[0] is ids for s in seen)  # never sorted, indexed or concatenated
    assert all(s[1] == s[2] for s in seen)  # the labels follow the samples (B, then 2B)


class DropoutBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.Sequential(nn.Dropout(0.5)).eval()  # the user keeps this in eval
        self.modes = []

    def forward(self, x, t):
        self.modes.append((torch.is_grad_enabled(), self.training, self.frozen.training))
        return self.drop(self.bn(x))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_rollout_runs_in_eval_mode_by_default_and_restores_every_flag(mode):
    model = DropoutBN().train()
    model.frozen.eval()
    before = model.bn.num_batches_tracked.item()
    rf.reflexflow_loss(
        model,
        torch.randn(B, 3, 4, 4),
        k=torch.full((B,), 3),
        t=torch.full((B,), 0.2),
        rollout_steps=3,
        num_sampling_steps=10,
        fc_source="state",
        rollout_mode=mode,
    )
    rollout = [m for m in model.modes if not m[0]]
    assert len(rollout) == 2  # k - 1 rollout calls after the shared first call
    assert all(m[1] == (mode == "train") for m in rollout)
    assert all(m[1] for m in model.modes if m[0])  # the gradient calls: train mode
    assert all(m[2] is False for m in model.modes)  # a frozen submodule stays frozen
    assert model.training and not model.frozen.training
    updates = model.bn.num_batches_tracked.item() - before
    assert updates == (2 if mode == "eval" else 4)  # BN statistics: gradient calls only


def test_dropped_rollouts_under_the_static_fixed_k_plan_leave_their_samples_unbiased():
    """k_draw="fixed" with a user's t near 1: the static (no host sync) plan runs K steps
    for the batch and leaves the dropped rows where they were."""
    t = torch.tensor([0.1, 0.5, 0.95, 0.99, 0.2, 0.999, 0.3, 1.0])
    out = rf.reflexflow_loss(
        ConvVelocity(),
        torch.randn(B, 3, 4, 4),
        t=t,
        rollout_steps=3,
        num_sampling_steps=20,
        k_draw="fixed",
        fc_source="state",
    )
    dropped = t > 1 - 1e-3 - 3 / 20 + 1e-6
    assert torch.equal(out.k, torch.where(dropped, 0, 3))
    assert torch.equal(out.bias_norm[dropped], torch.zeros(int(dropped.sum())))
    assert bool((out.bias_norm[~dropped] > 0).all())


@pytest.mark.parametrize("preset", ["grid-direction", "defar"])
def test_no_grad_calls_never_update_batch_norm_statistics(preset):
    """The rollout and the velocity-space bias (defar) run in eval mode: only the two
    gradient-carrying calls update BatchNorm's running statistics."""
    model = DropoutBN().train()
    before = model.bn.num_batches_tracked.item()
    rf.reflexflow_loss(
        model, torch.randn(B, 3, 4, 4), preset=preset, rollout_steps=3, k_draw="fixed"
    )
    assert model.bn.num_batches_tracked.item() - before == 2


@pytest.mark.parametrize("wrap", ["bound method", "lambda"])
def test_rollout_finds_the_module_behind_a_bound_method_or_a_closure(wrap):
    model = DropoutBN().train()
    call = model.forward if wrap == "bound method" else (lambda x, t: model(x, t))
    rf.reflexflow_loss(
        call,
        torch.randn(B, 3, 4, 4),
        preset="grid-direction",
        rollout_steps=3,
        k_draw="fixed",
    )
    rollout = [m for m in model.modes if not m[0]]
    assert len(rollout) == 2 and not any(m[1] for m in rollout)
    assert model.training


def test_zero_lambdas_run_no_rollout_and_draw_times_on_the_whole_interval():
    calls = []

    def counting(x, t):
        calls.append(t)
        return -x

    out = rf.reflexflow_loss(
        counting,
        torch.randn(512, 3),
        lambda_adr=0.0,
        lambda_fc=0.0,
        rollout_steps=3,
        k_draw="fixed",
        num_sampling_steps=10,
    )
    assert len(calls) == 1 and torch.equal(out.k, torch.zeros(512, dtype=torch.long))
    assert float(out.t0.max()) > 0.9  # not narrowed to 1 - t_eps - K h = 0.699
