"""Two small velocity models users recognise, for the step benchmark.

* :class:`TinyDiT`: a DiT/SiT-style transformer on latents (default 4x32x32): patchify
  (p x p conv), fixed 2-D sin-cos position embedding, blocks with adaLN-Zero modulation
  (x += g * f(LN(x) * (1 + s) + b), with (s, b, g) from the time embedding), final
  adaLN layer and unpatchify. Attention is ``F.scaled_dot_product_attention``.
* :class:`TinyUNet`: a DDPM/ADM-style UNet on pixels (default 3x32x32): residual blocks
  with GroupNorm, SiLU and an additive time embedding, strided-conv downsampling,
  nearest upsampling with skip concatenation, one self-attention block at the bottom.

Both are called as ``model(x, t)`` with x (B, C, H, W) and t (B,) and return a velocity
of x's shape. They are benchmark workloads, not tuned generative models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TinyDiT", "TinyUNet", "timestep_embedding", "MODEL_PRESETS", "build_model"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim/2)).

    t is scaled by 1000 first so that t in [0, 1] spans the usual DDPM range.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbed(nn.Module):
    """t -> MLP(sinusoidal(t)): (B,) -> (B, dim)."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def _sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding, (grid * grid, dim) (as in MAE / DiT)."""
    coords = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for pos in (yy.flatten(), xx.flatten()):
        out = pos[:, None] * omega[None]
        parts += [out.sin(), out.cos()]
    return torch.cat(parts, dim=1)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero: six modulation vectors from c."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU("tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        b, n, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        h = _modulate(self.norm1(x), sh1, sc1)
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + g1[:, None] * self.proj(a)
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class TinyDiT(nn.Module):
    """DiT/SiT-style transformer: (B, C, S, S) latents -> velocity of the same shape."""

    def __init__(
        self,
        in_channels: int = 4,
        input_size: int = 32,
        patch: int = 2,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
    ) -> None:
        super().__init__()
        if input_size % patch:
            raise ValueError(f"input_size {input_size} must be divisible by patch {patch}")
        if dim % heads or dim % 4:
            raise ValueError(f"dim {dim} must be divisible by heads {heads} and by 4")
        self.c, self.p, self.grid = in_channels, patch, input_size // patch
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.register_buffer("pos", _sincos_2d(dim, self.grid)[None], persistent=False)
        self.t_embed = TimeEmbed(dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, patch * patch * in_channels)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)
        c = self.t_embed(t)
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.ada(c).chunk(2, dim=-1)
        h = self.out(_modulate(self.norm(h), shift, scale))  # (B, N, p*p*C)
        g, p = self.grid, self.p
        h = h.view(b, g, g, p, p, self.c).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, self.c, g * p, g * p)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-conv, + skip (1x1 conv if channels change)."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int = 8) -> None:
        super().__init__()
        self.n1 = nn.GroupNorm(min(groups, cin), cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.t = nn.Linear(temb, cout)
        self.n2 = nn.GroupNorm(min(groups, cout), cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.c1(F.silu(self.n1(x))) + self.t(F.silu(temb))[:, :, None, None]
        h = self.c2(F.silu(self.n2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head-group self-attention over the H*W positions, residual."""

    def __init__(self, ch: int, heads: int = 4, groups: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(min(groups, ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x)).view(b, 3, self.heads, c // self.heads, hh * ww)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, HW, c/heads)
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(a.transpose(-1, -2).reshape(b, c, hh, ww))


class TinyUNet(nn.Module):
    """ADM-style UNet: (B, C, H, W) pixels -> velocity of the same shape.

    One ResBlock per level, channels ``base * mult`` per level, a stride-2 conv between
    levels, a middle ResBlock-Attention-ResBlock, and a mirrored decoder with skips.
    """

    def __init__(
        self, in_channels: int = 3, base: int = 32, mults: tuple[int, ...] = (1, 2, 2)
    ) -> None:
        super().__init__()
        temb = 4 * base
        self.t_embed = TimeEmbed(temb, freq_dim=base)
        self.inp = nn.Conv2d(in_channels, base, 3, padding=1)
        chans = [base * m for m in mults]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        cin = base
        for i, ch in enumerate(chans):
            self.down.append(ResBlock(cin, ch, temb))
            last = i == len(chans) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, 2, 1))
            cin = ch
        self.mid1, self.attn, self.mid2 = (
            ResBlock(cin, cin, temb),
            AttnBlock(cin),
            ResBlock(cin, cin, temb),
        )
        self.up = nn.ModuleList()
        for ch in reversed(chans):
            self.up.append(ResBlock(cin + ch, ch, temb))
            cin = ch
        self.out_norm = nn.GroupNorm(min(8, cin), cin)
        self.out = nn.Conv2d(cin, in_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = self.t_embed(t)
        h = self.inp(x)
        skips = []
        for blk, ds in zip(self.down, self.downsample, strict=True):
            h = blk(h, temb)
            skips.append(h)
            h = ds(h)
        h = self.mid2(self.attn(self.mid1(h, temb)), temb)
        for i, blk in enumerate(self.up):
            skip = skips.pop()
            if i > 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = blk(torch.cat([h, skip], dim=1), temb)
        return self.out(F.silu(self.out_norm(h)))


# name -> (class, data shape (C, H, W), {size preset: constructor kwargs})
MODEL_PRESETS: dict[str, tuple[type[nn.Module], tuple[int, int, int], dict[str, dict]]] = {
    "dit": (
        TinyDiT,
        (4, 32, 32),
        {
            "quick": {"dim": 32, "depth": 1, "heads": 2, "patch": 4},
            "small": {"dim": 96, "depth": 2, "heads": 3, "patch": 2},
            "gpu": {"dim": 384, "depth": 12, "heads": 6, "patch": 2},  # SiT-S/2
        },
    ),
    "unet": (
        TinyUNet,
        (3, 32, 32),
        {
            "quick": {"base": 8, "mults": (1, 2)},
            "small": {"base": 16, "mults": (1, 2, 2)},
            "gpu": {"base": 128, "mults": (1, 2, 2)},
        },
    ),
}


def build_model(name: str, size: str) -> tuple[nn.Module, tuple[int, int, int]]:
    """The benchmark model ``name`` ("dit" or "unet") at ``size`` and its data shape."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"model must be one of {tuple(MODEL_PRESETS)}, got {name!r}")
    cls, shape, sizes = MODEL_PRESETS[name]
    if size not in sizes:
        raise ValueError(f"size must be one of {tuple(sizes)}, got {size!r}")
    return cls(in_channels=shape[0], **sizes[size]), shape
