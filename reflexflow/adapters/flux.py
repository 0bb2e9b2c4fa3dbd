"""Flux's latent layout: 2x2 packing of (B, C, H, W) latents into tokens and the image ids."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def flux_pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, (H / 2)(W / 2), 4 C) tokens of 2x2 patches (Flux's packing)."""
    if x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"x must be (B, C, H, W) with even H and W, got {tuple(x.shape)}")
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def flux_unpack_latents(tokens: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`flux_pack_latents`: tokens back to ``like``'s (B, C, H, W)."""
    if like.dim() != 4 or like.shape[2] % 2 or like.shape[3] % 2:
        raise ValueError(f"like must be (B, C, H, W) with even H and W, got {tuple(like.shape)}")
    b, c, h, w = like.shape
    want = (b, (h // 2) * (w // 2), 4 * c)
    if tuple(tokens.shape) != want:
        raise ValueError(
            f"tokens must have shape {want} (2x2 patches of like's {tuple(like.shape)}), got "
            f"{tuple(tokens.shape)}"
        )
    out = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(b, c, h, w)


def flux_latent_image_ids(height: int, width: int, **tensor_kwargs: Any) -> Tensor:
    """Flux's img_ids for (C, height, width) latents: ((height / 2)(width / 2), 3) rows
    (0, row, column) of the 2x2-packed token grid. Not batch-shaped: give the loss
    ``unbatched_kwargs=("img_ids", "txt_ids")`` (diffusers_knobs("flux") does)."""
    for name, n in (("height", height), ("width", width)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n % 2:
            raise ValueError(f"{name} must be an even int >= 2 (latent pixels), got {n!r}")
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, **tensor_kwargs)
    ids[..., 1] += torch.arange(h, **tensor_kwargs)[:, None]
    ids[..., 2] += torch.arange(w, **tensor_kwargs)[None, :]
    return ids.reshape(h * w, 3)
