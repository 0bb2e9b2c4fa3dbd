"""SiT-style training with a SiT stand-in (SiT is not on PyPI): model(x, t, y), CFG label dropout.

    python examples/sit_style.py --steps 100

TinySiT (reflexflow.demo.toy_models) follows SiT's contract (willisma/SiT models.py):
its ``y_embedder`` has a null-class row only when its ``class_dropout_prob`` > 0, and
drops labels itself in train mode. In SiT's train.py the one-line change is the transport:

    transport = create_transport(args.path_type, ...)                # before
    transport = SiTTransportAdapter(args.path_type)                  # after

Build the model as train.py does (class_dropout_prob=0.1). The adapter reads the label
dropout and the null class from the model's y_embedder, drops labels once per step (so
the rollout and both gradient calls see the same label) and turns the model's own
dropout off during its calls. ``loss_dict = transport.training_losses(model, x,
model_kwargs)`` and ``loss = loss_dict["loss"].mean()`` stay: "loss" is per sample, as
SiT's. With SiT's sampler, ``sample_ode(sampling_method="euler", num_steps=M)`` takes
M - 1 Euler steps: train with ``num_sampling_steps=M - 1``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import reflexflow as rf  # noqa: E402
from reflexflow.adapters import SiTTransportAdapter  # noqa: E402
from reflexflow.demo.toy_models import TinySiT  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--path-type", default="Linear", choices=["Linear", "GVP", "VP"])
    args = p.parse_args()

    torch.manual_seed(0)
    num_classes = 10
    model = TinySiT(num_classes=num_classes, class_dropout_prob=0.1)  # as SiT's train.py
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # label dropout 0.1 and null class 10 are read from model.y_embedder
    transport = SiTTransportAdapter(args.path_type, num_sampling_steps=20, rollout_steps=1)
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(num_classes, 4, 1, 1, generator=gen)  # each class: a colour
    for step in range(args.steps):
        y = torch.randint(0, num_classes, (args.batch,), generator=gen)
        x = means[y] + 0.1 * torch.randn(args.batch, 4, 8, 8, generator=gen)
        loss_dict = transport.training_losses(model, x, dict(y=y), generator=gen)
        loss = loss_dict["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        adr = loss_dict["adr_loss"]
        print(f"step {step} loss {loss.item():.4f} adr {adr.item() if adr is not None else 0:.4f}")

    # classifier-free guided sampling: v = v_uncond + scale * (v_cond - v_uncond)
    model.eval()
    y = torch.arange(4)
    null = torch.full_like(y, num_classes)

    def guided(x, t, y):
        v_c, v_u = model(x, t, y), model(x, t, null)
        return v_u + 4.0 * (v_c - v_u)

    x = rf.sample(guided, torch.randn(4, 4, 8, 8), steps=20, model_kwargs={"y": y})
    err = (x.mean((2, 3)) - means[y].flatten(1)).abs().mean()
    print(f"guided samples: mean colour error {err.item():.3f}")


if __name__ == "__main__":
    main()
