import torch

import reflexflow as rf


def test_loss_runs_and_backpropagates_into_model():
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    x1 = torch.randn(4, 3, 8, 8)
    out = rf.ReflexFlowLoss(rollout_steps=2, num_sampling_steps=10)(
        lambda x, t: net(x), x1, generator=torch.Generator().manual_seed(0)
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
