"""A SiT / DiT image transformer (Ma et al. 2024, Peebles and Xie 2023), small and plain.

x (B, C, S, S) -> non-overlapping p x p patches -> T = (S / p)^2 tokens of width d, plus
fixed 2-D sin-cos positions; t -> sinusoidal embedding -> MLP -> c (B, d). Each of the
``depth`` blocks (adaLN-zero time conditioning):

    (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m) = Linear(SiLU(c))   zero-initialised
    h = h + gate_a * Attention(LN(h) * (1 + scale_a) + shift_a)
    h = h + gate_m * MLP(LN(h) * (1 + scale_m) + shift_m)

then a final adaLN and a zero-initialised linear map to p * p * C per token, unpatchified.
SiT-S/2 is p = 2, d = 384, depth 12, 6 heads (the photos study's ``--device cuda`` model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import time_embedding

__all__ = ["SiT", "SIT_S2"]

SIT_S2 = {"patch": 2, "hidden": 384, "depth": 12, "heads": 6}


def _sincos_2d(grid: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (grid^2, dim): half the channels per axis."""
    if dim % 4:
        raise ValueError(f"hidden must be a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        indexing="ij",
    )
    parts = []
    for pos in (ys.flatten(), xs.flatten()):
        arg = pos[:, None] * omega[None]
        parts += [arg.sin(), arg.cos()]
    return torch.cat(parts, dim=1).float()


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class _Block(nn.Module):
    """One transformer block with adaLN-zero conditioning (module docstring)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(c).chunk(6, dim=1)
        b, n, d = h.shape
        qkv = self.qkv(_modulate(self.norm1(h), shift_a, scale_a))
        q, k, v = qkv.view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        h = h + gate_a[:, None] * self.proj(a)
        return h + gate_m[:, None] * self.mlp(_modulate(self.norm2(h), shift_m, scale_m))


class SiT(nn.Module):
    """v(x, t) for (B, C, S, S) images: a SiT / DiT transformer (module docstring)."""

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        patch: int = 2,
        hidden: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        t_dim: int = 256,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of patch {patch}")
        if hidden % heads:
            raise ValueError(f"hidden {hidden} must be a multiple of heads {heads}")
        self.in_channels, self.image_size, self.patch = in_channels, image_size, patch
        self.hidden, self.depth, self.mlp_ratio, self.t_dim = hidden, depth, mlp_ratio, t_dim
        self.grid = image_size // patch
        self.embed = nn.Conv2d(in_channels, hidden, patch, stride=patch)
        self.register_buffer("pos", _sincos_2d(self.grid, hidden)[None], persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(_Block(hidden, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.Linear(hidden, patch * patch * in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.embed.bias)
        nn.init.normal_(self.t_mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_mlp[2].weight, std=0.02)
        for blk in self.blocks:  # adaLN-zero: every block starts as the identity
            nn.init.zeros_(blk.ada[1].weight)
            nn.init.zeros_(blk.ada[1].bias)
        for lin in (self.ada_out[1], self.out):  # and the output starts at v = 0
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        b, c, s, _ = x.shape
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)
        cond = self.t_mlp(time_embedding(t, self.t_dim).to(h.dtype))
        for blk in self.blocks:
            h = blk(h, cond)
        shift, scale = self.ada_out(cond).chunk(2, dim=1)
        h = self.out(_modulate(self.norm_out(h), shift, scale))  # (B, T, p p C)
        p, g = self.patch, self.grid
        h = h.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, c, s, s)

    def forward_flops(self) -> float:
        """Forward FLOPs per image (2 per multiply-add): token matmuls, attention, patch maps.

        Per block and token: qkv 3 d^2 + proj d^2 + MLP 2 r d^2 multiply-adds, attention
        2 T d; adaLN maps are per image (6 d^2 per block).
        """
        d, n, r = self.hidden, self.grid**2, self.mlp_ratio
        per_token = self.depth * ((4 + 2 * r) * d * d + 2 * n * d)
        per_image = self.depth * 6 * d * d + 2 * d * d + 2 * d * d  # adaLN and t-MLP
        patch_maps = 2 * n * d * self.patch**2 * self.in_channels
        return 2.0 * (n * per_token + per_image + patch_maps)
