"""Measuring exposure bias (reflexflow/diagnostics.py): zero for the exact model, positive
for a wrong one; its inputs checked as the loss checks them."""

import pytest
import torch

import reflexflow as rf
from tests.helpers import ConvVelocity, DropoutBN

B = 4
X = torch.randn(B, 3, 8, 8)


def test_exposure_bias_is_zero_for_the_exact_model_and_positive_for_a_wrong_one():
    c = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    x1 = c.expand(6, 2, 8, 8).clone()

    def exact(x, t):
        return (c - x) / (1 - t).view(-1, 1, 1, 1)

    good = rf.exposure_bias(
        exact,
        x1,
        num_sampling_steps=10,
        k=2,
        num_times=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert float(good.mse.max()) < 1e-20
    bad = rf.exposure_bias(
        lambda x, t: torch.zeros_like(x),
        x1,
        num_sampling_steps=10,
        k=2,
        num_times=4,
        generator=torch.Generator().manual_seed(0),
        batch_size=4,
    )
    assert bool((bad.mse > 1e-3).all())
    assert bad.t0.shape == (4,) and float(bad.t0[-1]) == pytest.approx(1 - 1e-3 - 0.2)
    assert bool(((bad.low_freq_share >= 0) & (bad.low_freq_share <= 1)).all())
    assert set(bad.as_dict()) == {"t0", "mse", "low_freq_share", "k", "h"}


def test_exposure_bias_rejects_rollouts_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        rf.exposure_bias(lambda x, t: x, torch.randn(2, 3), num_sampling_steps=4, k=4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x1=X[:0]), ValueError, r"x1 must have shape \(B, \.\.\.\) with B >= 1"),
        (dict(batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
        (dict(batch_size=-1), ValueError, "batch_size must be >= 1"),
        (dict(num_times=0), ValueError, "num_times must be >= 1"),
        (dict(cutoff=2.0), ValueError, "cutoff must be <= 1"),
        (dict(t_eps=-1.0), ValueError, "t_eps must be > 0"),
        (dict(t0=torch.tensor([])), ValueError, "t0 must hold at least one"),
        (dict(t0=torch.tensor([float("nan")])), ValueError, r"t0 must lie in \[0"),
        (
            dict(model_kwargs={"y": torch.zeros(B + 1, dtype=torch.long)}),
            ValueError,
            r"model_kwargs\['y'\] has shape \(5,\)",
        ),
        (dict(model_kwargs=[1]), TypeError, "model_kwargs must be a dict or None"),
        (dict(x1=X.to("meta")), ValueError, "x1 is on the meta device"),
    ],
)
def test_exposure_bias_names_bad_inputs(kwargs, error, match):
    args = {"x1": X, "num_times": 2, **kwargs}
    x1 = args.pop("x1")
    with pytest.raises(error, match=match):
        rf.exposure_bias(ConvVelocity(num_classes=3), x1, **args)


def test_exposure_bias_runs_the_model_in_eval_mode_and_restores_its_flags():
    """The bias of inference: no dropout, no BatchNorm statistics updated; the model's
    own training flags come back as they were."""
    net = DropoutBN().train()
    net.frozen.eval()  # a submodule the user keeps in eval mode stays so
    tracked = int(net.bn.num_batches_tracked)
    bias = rf.exposure_bias(net, torch.randn(4, 3, 8, 8), num_times=2)
    assert bias.mse.shape == (2,)
    assert net.modes and all(not training for _, training, _ in net.modes)
    assert net.training and not net.frozen.training
    assert int(net.bn.num_batches_tracked) == tracked


@pytest.mark.parametrize(
    "t0, error, message",
    [
        (torch.tensor([0.1 + 1j]), TypeError, "t0 must hold real times"),
        (torch.tensor([True]), TypeError, "t0 must hold real times"),
        (["a"], TypeError, "t0 must be a 1-D tensor or sequence of times"),
        (torch.tensor([[0.1, 0.2]]), ValueError, r"t0 must be 1-D .*shape \(1, 2\)"),
    ],
)
def test_start_times_that_are_not_real_1d_times_are_refused_naming_t0(t0, error, message):
    with pytest.raises(error, match=message):
        rf.exposure_bias(lambda x, t: -x, torch.randn(4, 3), t0=t0)


def test_start_times_given_as_python_floats_are_taken_exactly_up_to_the_last_one():
    # t_hi = 1 - t_eps - k h = 0.85: a float32 read of 0.85 would round past it
    eb = rf.exposure_bias(
        lambda x, t: -x, torch.randn(4, 3), t0=[0.0, 0.85], num_sampling_steps=10, t_eps=0.05
    )
    assert eb.t0.tolist() == [0.0, 0.85]
