"""Meta's flow_matching and torchcfm with ReflexFlowLoss, on the real packages.

    pip install flow_matching pot && pip install --no-deps torchcfm   # or the peers extra
    python examples/flow_matching_paths.py --steps 300

flow_matching: ``path_from_scheduler(scheduler)`` turns any of its schedulers
(``scheduler(t) -> alpha_t, sigma_t, d_alpha_t, d_sigma_t``, x_t = sigma_t x_0 +
alpha_t x_1, x_0 the noise) into a reflexflow path; here PolynomialConvexScheduler(2),
sampled at the end with flow_matching's own ``ODESolver`` (Euler, step 1 / N: N steps,
the ``num_sampling_steps`` the loss trains for).

torchcfm: ``torchcfm_path(matcher)`` gives the matcher's path. The exact-OT matcher
re-draws both sides of the batch from its plan, so the loss gets its x1 as the data,
its x0 as ``noise=`` and the labels re-indexed with them
(``ot_sampler.sample_plan_with_labels``); here a ring conditioned on its half.

Both print the mean radius of the samples (the data's is 2). ``--method fm`` trains plain
flow matching for comparison: on 2-D toys ADR is expected to do no better than FM
(docs/method.md section 3).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import reflexflow as rf  # noqa: E402
from reflexflow.adapters import path_from_scheduler, torchcfm_path  # noqa: E402
from reflexflow.demo.toy_models import MLPVelocity  # noqa: E402

try:
    from flow_matching.path.scheduler import PolynomialConvexScheduler
    from flow_matching.solver import ODESolver
    from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher
except ImportError as err:  # the example is about the real packages
    raise SystemExit(
        "this example needs flow_matching and torchcfm: pip install flow_matching pot && "
        f"pip install --no-deps torchcfm ({err})"
    ) from err

N = 20  # sampling steps: the loss's rollout step is h = 1 / N


def toy_mlp(classes: int = 0) -> nn.Module:
    """v(x, t[, y]) for 2-D points; t may be a scalar (flow_matching's ODE solver)."""
    return MLPVelocity(dim=2, hidden=128, layers=2, activation="silu", classes=classes, seed=None)


def ring(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Points on a circle of radius 2; label 0 for the upper half, 1 for the lower."""
    angle = torch.rand(batch, generator=gen) * 2 * math.pi
    x = 2 * torch.stack([angle.cos(), angle.sin()], 1) + 0.05 * torch.randn(batch, 2, generator=gen)
    return x, (angle > math.pi).long()


def train_flow_matching_path(steps: int, method: str) -> None:
    torch.manual_seed(0)
    model = toy_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    path = path_from_scheduler(PolynomialConvexScheduler(n=2.0))  # alpha = t^2
    loss_fn = rf.ReflexFlowLoss(method=method, path=path, num_sampling_steps=N, rollout_steps=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x1, _ = ring(256, gen)
        out = loss_fn(model, x1, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    x0 = torch.randn(512, 2, generator=gen)
    samples = ODESolver(velocity_model=model).sample(x_init=x0, step_size=1 / N, method="euler")
    radius = samples.norm(dim=1).mean()
    print(
        f"flow_matching PolynomialConvex(2): final loss {out.loss.item():.4f}, "
        f"{N}-step samples' mean radius {radius.item():.2f} (data: 2.00)"
    )


def train_torchcfm_exact_ot(steps: int, method: str) -> None:
    torch.manual_seed(0)
    model = toy_mlp(classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    matcher = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    loss_fn = rf.ReflexFlowLoss(method=method, path=torchcfm_path(matcher), num_sampling_steps=N)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x1, y = ring(256, gen)
        x0 = torch.randn(256, 2, generator=gen)
        # the OT plan re-draws x0 AND x1 (pairs (i, j)); labels follow their x1
        x0, x1, _, y = matcher.ot_sampler.sample_plan_with_labels(x0, x1, y1=y)
        out = loss_fn(model, x1, noise=x0, model_kwargs={"y": y}, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    y = torch.arange(512) % 2
    samples = rf.sample(model, torch.randn(512, 2, generator=gen), N, model_kwargs={"y": y})
    radius = samples.norm(dim=1).mean()
    print(
        f"torchcfm exact-OT CFM: final loss {out.loss.item():.4f}, "
        f"{N}-step samples' mean radius {radius.item():.2f} (data: 2.00)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--method", default="reflexflow", choices=["reflexflow", "fm", "ip", "ss"])
    args = p.parse_args()
    train_flow_matching_path(args.steps, args.method)
    train_torchcfm_exact_ot(args.steps, args.method)


if __name__ == "__main__":
    main()
