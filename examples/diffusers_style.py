"""diffusers-style training (SD3 / Flux convention): noise at sigma = 1, timesteps in [0, 1000].

    python examples/diffusers_style.py --steps 100 [--family flux]

The model is a tiny transformer-shaped stand-in with diffusers' calling convention,
``transformer(hidden_states=tokens, timestep=..., encoder_hidden_states=..., return_dict=False)``
on packed (B, L, 4C) latent tokens. ``DiffusersModelAdapter`` packs the (B, C, H, W)
latents for it and unpacks its output, so the loss (and its FC filter) sees images.
``diffusers_knobs("sd3")`` sets convention="noise_at_1", timestep_scale=1000 (SD3 takes
sigma * 1000; "flux" takes sigma: timestep_scale=1) and SD3's logit-normal sigma draw.
With a real diffusers model, pass it instead of TinyTransformer.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import reflexflow as rf  # noqa: E402
from reflexflow.adapters import DiffusersModelAdapter, diffusers_knobs  # noqa: E402


class TinyTransformer(nn.Module):
    """Stand-in for SD3Transformer2DModel: tokens + timestep + text context -> tokens."""

    def __init__(self, token_dim=16, dim=32, ctx_dim=8, timestep_scale=1000.0):
        super().__init__()
        self.timestep_scale = timestep_scale  # 1000: takes SD3 timesteps; 1: takes sigma
        self.inp = nn.Linear(token_dim, dim)
        self.t_embed = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.ctx = nn.Linear(ctx_dim, dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.out = nn.Linear(dim, token_dim)

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=True):
        sigma = (timestep / self.timestep_scale).view(-1, 1).to(hidden_states.dtype)
        h = self.inp(hidden_states) + self.t_embed(sigma)[:, None]
        c = self.ctx(encoder_hidden_states)
        h = h + self.attn(h, c, c, need_weights=False)[0]
        out = self.out(h)
        return (out,) if not return_dict else {"sample": out}


def pack(x):
    """(B, C, H, W) latents -> (B, H W / 4, 4 C) tokens of 2x2 patches (Flux's packing)."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, 4 * C)


def unpack(tokens, like):
    B, C, H, W = like.shape
    out = tokens.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(B, C, H, W)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--family", default="sd3", choices=["sd3", "flux"])
    args = p.parse_args()

    torch.manual_seed(0)
    knobs = diffusers_knobs(args.family)
    transformer = TinyTransformer(timestep_scale=knobs["timestep_scale"])
    model = DiffusersModelAdapter(transformer, pack=pack, unpack=unpack)
    loss_fn = rf.ReflexFlowLoss(**knobs, num_sampling_steps=28, rollout_steps=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        latents = torch.randn(args.batch, 4, 1, 1, generator=gen).expand(-1, -1, 8, 8).clone()
        ctx = torch.randn(args.batch, 5, 8, generator=gen)
        out = loss_fn(model, latents, model_kwargs={"encoder_hidden_states": ctx}, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        print(f"step {step} loss {out.loss.item():.4f} sigma0 {out.t0.mean().item():.3f}")

    ctx = torch.randn(2, 5, 8, generator=gen)
    x = rf.sample(
        model,
        torch.randn(2, 4, 8, 8, generator=gen),
        steps=28,
        convention="noise_at_1",
        timestep_scale=knobs["timestep_scale"],
        model_kwargs={"encoder_hidden_states": ctx},
    )
    print(f"sampled latents {tuple(x.shape)}, std {x.std().item():.3f}")


if __name__ == "__main__":
    main()
