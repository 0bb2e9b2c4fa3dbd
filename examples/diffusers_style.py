"""diffusers SD3 / Flux training with ReflexFlowLoss, on real diffusers transformers (tiny configs).

    pip install diffusers            # or: pip install -e ".[peers]"
    python examples/diffusers_style.py --steps 100 [--family flux]

Nothing is downloaded: a 1-layer ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``
is built from a config and trained on toy latents. ``diffusers_knobs(family)`` gives the
loss what diffusers' DreamBooth scripts do: noise at sigma = 1 (convention="noise_at_1"),
SD3 timesteps sigma * 1000 (Flux: sigma), the scripts' sigma draw from the scheduler's
table (SD3: logit-normal through shift 3; Flux: uniform, unshifted) and their loss
weighting (SD3: --precondition_outputs=1, a sigma^2 weight). Flux sees 2x2-packed
tokens (``flux_pack_latents``) while the loss, and its FC filter, see (B, C, H, W)
latents; its ``img_ids``/``txt_ids`` are not batch-shaped (``unbatched_kwargs``). At the
end the trained model samples with diffusers' own FlowMatchEulerDiscreteScheduler.
With a real checkpoint, load the transformer and the scheduler instead
(``diffusers_knobs(family, scheduler=noise_scheduler)``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import reflexflow as rf  # noqa: E402
from reflexflow import adapters  # noqa: E402

try:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )
except ImportError as err:  # the example is about the real package
    raise SystemExit(f"this example needs diffusers: pip install diffusers ({err})") from err

LATENT = (4, 8, 8)  # (C, H, W) toy latents
TEXT_LEN, TEXT_DIM, POOLED_DIM = 5, 32, 32


def build(family: str) -> tuple[torch.nn.Module, FlowMatchEulerDiscreteScheduler]:
    """A tiny transformer of the family and its scheduler (the published config)."""
    if family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=LATENT[1],
            patch_size=2,
            in_channels=LATENT[0],
            out_channels=LATENT[0],
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            caption_projection_dim=32,
            pooled_projection_dim=POOLED_DIM,
        )
        return transformer, FlowMatchEulerDiscreteScheduler(**adapters.SD3_SCHEDULER)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT[0],  # 2x2-packed latent channels
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    return transformer, FlowMatchEulerDiscreteScheduler(**adapters.FLUX_SCHEDULER)


def conditioning(family: str, batch: int, gen: torch.Generator) -> dict:
    kw = {
        "encoder_hidden_states": torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        "pooled_projections": torch.randn(batch, POOLED_DIM, generator=gen),
    }
    if family == "flux":  # position ids: (L, 3), shared by the whole batch
        kw["img_ids"] = adapters.flux_latent_image_ids(LATENT[1], LATENT[2])
        kw["txt_ids"] = torch.zeros(TEXT_LEN, 3)
    return kw


def toy_latents(batch: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth 'images': a random colour per sample plus a horizontal ramp."""
    colour = torch.randn(batch, LATENT[0], 1, 1, generator=gen)
    ramp = torch.linspace(-1, 1, LATENT[2]).view(1, 1, 1, -1)
    return (colour + 0.5 * ramp).expand(-1, -1, LATENT[1], -1).contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--family", default="sd3", choices=["sd3", "flux"])
    p.add_argument("--sample-steps", type=int, default=28)
    args = p.parse_args()

    torch.manual_seed(0)
    transformer, scheduler = build(args.family)
    packing = {}
    if args.family == "flux":
        packing = dict(pack=adapters.flux_pack_latents, unpack=adapters.flux_unpack_latents)
    model = adapters.DiffusersModelAdapter(transformer, **packing)
    knobs = adapters.diffusers_knobs(
        args.family,
        scheduler=copy.deepcopy(scheduler),  # the scripts' noise_scheduler_copy
        num_sampling_steps=args.sample_steps,  # the rollout step h = 1 / 28
        rollout_steps=1,
    )
    loss_fn = rf.ReflexFlowLoss(**knobs)
    opt = torch.optim.AdamW(transformer.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        latents = toy_latents(args.batch, gen)
        kw = conditioning(args.family, args.batch, gen)
        out = loss_fn(model, latents, model_kwargs=kw, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        print(f"step {step} loss {out.loss.item():.4f} mean sigma0 {out.t0.mean().item():.3f}")

    # sampling with diffusers' own scheduler: Euler from sigma = 1 to 0
    transformer.eval()
    kw = conditioning(args.family, 2, gen)
    x = torch.randn(2, *LATENT, generator=gen)
    if args.family == "flux":  # the pipeline's resolution-dependent shift
        mu = adapters.flux_shift_mu((LATENT[1] // 2) * (LATENT[2] // 2))
        scheduler.set_timesteps(args.sample_steps, mu=mu)
    else:
        scheduler.set_timesteps(args.sample_steps)
    scale = knobs["timestep_scale"] / 1000  # SD3 takes timesteps, Flux sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = model(x, (t * scale).expand(2), **kw)
            x = scheduler.step(v, t, x).prev_sample
    print(f"sampled latents {tuple(x.shape)}, std {x.std().item():.3f}")


if __name__ == "__main__":
    main()
