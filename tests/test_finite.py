"""Non-finite values (reflexflow/finite.py): check_finite names the stage that made them;
without it, one warning."""

import warnings

import pytest
import torch

import reflexflow as rf
from tests.helpers import ConvVelocity
from tests.helpers import negative_velocity as model

B = 4


@pytest.fixture
def x1():
    return torch.randn(B, 3, 4, 4)


def test_check_finite_catches_nan_data_and_nan_model_output(x1):
    bad = x1.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x1 has non-finite values"):
        rf.reflexflow_loss(model, bad, check_finite=True)
    with pytest.raises(ValueError, match="x_hat has non-finite values .* 'rollout state'"):
        rf.reflexflow_loss(lambda x, t: x * float("inf"), x1, check_finite=True)
    # off by default: no host sync, the NaN comes back in the loss
    assert torch.isnan(rf.reflexflow_loss(model, bad).loss)


def _checked_loss(model, **knobs):
    """The loss with check_finite=True on a (4, 3, 6, 6) batch."""
    return rf.reflexflow_loss(model, torch.randn(4, 3, 6, 6), check_finite=True, **knobs)


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
        _checked_loss(
            model,
            t=torch.full((4,), 0.3),
            k=torch.full((4,), 2),
            preset="grid-direction",
            rollout_steps=2,
        )


def test_check_finite_names_the_model_outputs_when_the_gradient_calls_return_nan():
    model = _nan_when(torch.is_grad_enabled)
    with pytest.raises(ValueError, match="v0 has non-finite values .* 'model outputs'"):
        _checked_loss(model, preset="grid-direction", share_first_call=False)


def test_check_finite_names_the_velocity_bias_when_its_no_grad_calls_return_nan():
    """k = 0 everywhere: no rollout call, so only FC's velocity-space bias calls run
    without grad."""
    model = _nan_when(lambda: not torch.is_grad_enabled())
    with pytest.raises(ValueError, match="fc_delta has non-finite values .* 'velocity bias'"):
        _checked_loss(
            model, t=torch.full((4,), 0.3), k=torch.zeros(4, dtype=torch.int64), preset="defar"
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
