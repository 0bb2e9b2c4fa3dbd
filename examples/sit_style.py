"""SiT-style training: a class-conditional model(x, t, y) with CFG label dropout.

    python examples/sit_style.py --steps 100

In SiT's train.py the one-line change is the transport:

    transport = create_transport(args.path_type, ...)                       # before
    transport = SiTTransportAdapter(args.path_type, num_classes=args.num_classes,
                                    class_dropout_prob=0.1)                 # after

and the SiT model is built with class_dropout_prob=0 (the adapter drops labels once per
step, so the rollout and both gradient calls see the same label). The rest of the loop,
``loss_dict = transport.training_losses(model, x, model_kwargs)`` and
``loss = loss_dict["loss"].mean()``, stays as it is.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import reflexflow as rf  # noqa: E402
from reflexflow.adapters import SiTTransportAdapter, drop_labels  # noqa: E402


class TinySiT(nn.Module):
    """A SiT-shaped toy: patch tokens + time and label embeddings + an MLP block.

    forward(x, t, y): x (B, C, H, W), t (B,) in [0, 1], y (B,) int labels, where label
    num_classes is the null class used for classifier-free guidance. Like SiT's
    LabelEmbedder it can drop labels itself (class_dropout_prob); keep that 0 with the
    adapter doing the dropout.
    """

    def __init__(self, channels=4, size=8, patch=2, dim=32, num_classes=10, class_dropout_prob=0.0):
        super().__init__()
        self.patch, self.size, self.channels = patch, size, channels
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        pdim = channels * patch * patch
        self.embed = nn.Linear(pdim, dim)
        self.t_embed = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes + 1, dim)
        self.block = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        )
        self.out = nn.Linear(dim, pdim)

    def forward(self, x, t, y):
        if self.training and self.class_dropout_prob > 0:
            y = drop_labels(y, self.class_dropout_prob, self.num_classes)
        B, C, H, W = x.shape
        p = self.patch
        tok = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
        h = self.embed(tok) + (self.t_embed(t.view(-1, 1).to(x.dtype)) + self.y_embed(y))[:, None]
        h = h + self.block(h)
        out = self.out(h).view(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(B, C, H, W)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--path-type", default="Linear", choices=["Linear", "GVP", "VP"])
    args = p.parse_args()

    torch.manual_seed(0)
    num_classes = 10
    model = TinySiT(num_classes=num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    transport = SiTTransportAdapter(
        args.path_type,
        num_classes=num_classes,
        class_dropout_prob=0.1,
        num_sampling_steps=50,
        rollout_steps=1,
    )
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
        print(f"step {step} loss {loss.item():.4f} adr {loss_dict['adr_loss'].item():.4f}")

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
