"""Paths of Meta's flow_matching and of torchcfm, as reflexflow paths (no dependency).

    python examples/flow_matching_paths.py --steps 100

flow_matching: ``scheduler(t)`` returns alpha_t, sigma_t, d_alpha_t, d_sigma_t and
x_t = sigma_t x_0 + alpha_t x_1 (x_0 noise, x_1 data): ``path_from_scheduler(scheduler)``
gives a = alpha_t, s = sigma_t, a' = d_alpha_t, s' = d_sigma_t. With flow_matching
installed, pass ``flow_matching.path.scheduler.CondOTScheduler()`` itself.
torchcfm: ``torchcfm_path(matcher)``; the source sample x0 is reflexflow's ``noise``
(pass the OT-paired x0 of ExactOptimalTransportConditionalFlowMatcher as ``noise=``).
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import reflexflow as rf  # noqa: E402
from reflexflow.adapters import path_from_scheduler, torchcfm_path  # noqa: E402


class PolynomialConvexScheduler:
    """flow_matching's PolynomialConvexScheduler(n): alpha = t^n, sigma = 1 - t^n."""

    def __init__(self, n: float = 2.0) -> None:
        self.n = n

    def __call__(self, t):
        n = self.n
        return SimpleNamespace(
            alpha_t=t**n, sigma_t=1 - t**n, d_alpha_t=n * t ** (n - 1), d_sigma_t=-n * t ** (n - 1)
        )


class ConditionalFlowMatcher:  # stands in for torchcfm.ConditionalFlowMatcher(sigma=0)
    sigma = 0.0


class MLP(nn.Module):
    def __init__(self, dim=2, width=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], 1))


def train(path, steps: int, label: str) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = rf.ReflexFlowLoss(path=path, num_sampling_steps=20, rollout_steps=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        angle = torch.rand(64, generator=gen) * 6.2832
        x1 = torch.stack([angle.cos(), angle.sin()], 1) * 2  # a ring
        x0 = torch.randn(64, 2, generator=gen)  # torchcfm's source sample / the noise
        out = loss_fn(model, x1, noise=x0, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    print(f"{label}: final loss {out.loss.item():.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    train(path_from_scheduler(PolynomialConvexScheduler(2.0)), args.steps, "flow_matching poly2")
    train(torchcfm_path(ConditionalFlowMatcher()), args.steps, "torchcfm CFM (linear)")


if __name__ == "__main__":
    main()
