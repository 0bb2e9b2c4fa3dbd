"""The model's state around the loss's calls (reflexflow/model_state.py): the rollout runs
in eval mode on the modules it finds (or is told: rollout_modules), every flag restored,
and no no-grad call updates BatchNorm statistics."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import reflexflow as rf
from tests.helpers import ConvVelocity, DropoutBN

B = 4
X = torch.randn(B, 3, 8, 8)
BATCH = 8
_GLOBAL_NET = DropoutBN()


def module_level_model(x, t):
    """A model reached only through this module's globals."""
    return _GLOBAL_NET(x, t)


ROLLOUT = dict(preset="grid-direction", rollout_steps=3, k_draw="fixed", num_sampling_steps=10)


def _bn_updates(net: DropoutBN, fn) -> int:
    before = net.bn.num_batches_tracked.item()
    fn()
    return net.bn.num_batches_tracked.item() - before


def test_module_level_function_model_rolls_out_in_eval_mode():
    _GLOBAL_NET.train()
    _GLOBAL_NET.modes.clear()
    updates = _bn_updates(_GLOBAL_NET, lambda: rf.reflexflow_loss(module_level_model, X, **ROLLOUT))
    assert updates == 2  # the two gradient calls; the 2 rollout calls run in eval mode
    rollout = [train for grad, train, _ in _GLOBAL_NET.modes if not grad]
    assert rollout == [False, False]
    assert _GLOBAL_NET.training


def test_module_in_a_container_is_switched_when_named_in_rollout_modules():
    net = DropoutBN().train()
    nets = {"velocity": net}  # a dict: no attribute, closure cell or global names the module

    def model(x, t):
        return nets["velocity"](x, t)

    updates = _bn_updates(
        net, lambda: rf.reflexflow_loss(model, X, rollout_modules=(net,), **ROLLOUT)
    )
    assert updates == 2
    assert [train for grad, train, _ in net.modes if not grad] == [False, False]
    assert net.training and net.drop.training  # every flag restored


def test_named_rollout_modules_give_the_same_loss_as_passing_the_module():
    """Forward modes agree: a wrapper naming its module rolls out exactly as the module."""
    net = ConvVelocity()
    holder = {"net": net}
    knobs = dict(rollout_steps=2, k_draw="fixed", num_sampling_steps=10)
    direct = rf.reflexflow_loss(net, X, generator=torch.Generator().manual_seed(3), **knobs)
    named = rf.reflexflow_loss(
        lambda x, t: holder["net"](x, t),
        X,
        generator=torch.Generator().manual_seed(3),
        rollout_modules=(net,),
        **knobs,
    )
    torch.testing.assert_close(named.loss, direct.loss, rtol=0, atol=0)


def test_eval_rollout_that_finds_no_module_warns_once_naming_rollout_mode():
    net = DropoutBN().train()
    box = [net]

    def hidden(x, t):
        return box[0](x, t)

    with pytest.warns(
        RuntimeWarning, match=r"rollout_mode='eval' found no nn.Module.*rollout_modules"
    ):
        rf.reflexflow_loss(hidden, X, **ROLLOUT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rf.reflexflow_loss(hidden, X, **ROLLOUT)  # once per callable
        rf.reflexflow_loss(hidden, X, rollout_mode="train", **ROLLOUT)


def test_rollout_modules_must_hold_modules():
    with pytest.raises(TypeError, match="rollout_modules must be a tuple of nn.Modules"):
        rf.ReflexFlowConfig(rollout_modules=("net",))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_rollout_runs_in_eval_mode_by_default_and_restores_every_flag(mode):
    model = DropoutBN().train()
    model.frozen.eval()
    before = model.bn.num_batches_tracked.item()
    rf.reflexflow_loss(
        model,
        torch.randn(BATCH, 3, 4, 4),
        k=torch.full((BATCH,), 3),
        t=torch.full((BATCH,), 0.2),
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


@pytest.mark.parametrize("preset", ["grid-direction", "defar"])
def test_no_grad_calls_never_update_batch_norm_statistics(preset):
    """The rollout and the velocity-space bias (defar) run in eval mode: only the two
    gradient-carrying calls update BatchNorm's running statistics."""
    model = DropoutBN().train()
    before = model.bn.num_batches_tracked.item()
    rf.reflexflow_loss(
        model, torch.randn(BATCH, 3, 4, 4), preset=preset, rollout_steps=3, k_draw="fixed"
    )
    assert model.bn.num_batches_tracked.item() - before == 2


@pytest.mark.parametrize("wrap", ["bound method", "lambda"])
def test_rollout_finds_the_module_behind_a_bound_method_or_a_closure(wrap):
    model = DropoutBN().train()
    call = model.forward if wrap == "bound method" else (lambda x, t: model(x, t))
    rf.reflexflow_loss(
        call,
        torch.randn(BATCH, 3, 4, 4),
        preset="grid-direction",
        rollout_steps=3,
        k_draw="fixed",
    )
    rollout = [m for m in model.modes if not m[0]]
    assert len(rollout) == 2 and not any(m[1] for m in rollout)
    assert model.training


class _AttentionNet(nn.Module):
    """x + t * attention(x): dropout applied functionally by nn.MultiheadAttention (its
    ``dropout`` float), or by a label-embedder-style ``dropout_prob``; records the
    training flag of every call."""

    def __init__(self, mha_dropout: float = 0.0, dropout_prob: float = 0.0) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, dropout=mha_dropout, batch_first=True)
        self.dropout_prob = dropout_prob
        self.calls: list[bool] = []

    def forward(self, x, t):
        self.calls.append(self.training)
        return self.att(x, x, x)[0] + x * t.view(-1, 1, 1)


@pytest.mark.parametrize(
    "knobs, eval_calls",
    [
        (dict(), 1),  # no dropout: the ADR call's output serves the biased side
        (dict(mha_dropout=0.5), 2),  # functional dropout: one more eval forward
        (dict(dropout_prob=0.1), 2),
    ],
)
def test_velocity_bias_reruns_the_biased_side_in_eval_mode_when_dropout_is_functional(
    knobs, eval_calls
):
    net = _AttentionNet(**knobs).train()
    rf.reflexflow_loss(
        net, torch.randn(4, 5, 8), preset="defar", generator=torch.Generator().manual_seed(0)
    )
    assert net.calls.count(False) == eval_calls
    assert net.calls.count(True) == 2  # the FM and ADR calls, with grad, in training mode
