"""The toy velocity models of reflexflow: one set, shared by the demo, the ``reflexflow
example`` command, the benchmarks, the examples and the tests.

Every model is called ``model(x, t, ...)`` with ``t`` a ``(B,)`` float tensor and returns
a velocity of ``x``'s shape. None is a tuned generative model; each stands in for a kind
of network users train, named in its docstring ("Mirrors: ..."), so that the loss meets
the calling conventions, shapes and layers it meets in practice.

=====================  ================================  ===============================
model                  used by                           mirrors
=====================  ================================  ===============================
MLPVelocity            tests, ``reflexflow example``,    the MLP of 2-D flow-matching
                       examples/flow_matching_paths.py   tutorials (flow_matching,
                                                         torchcfm)
ConvVelocity           tests (golden values), lean and   a class-conditional image
                       forward-mode tests                model: model(x, t, y)
TinyNet                rollout-engine tests              a conditioned model taking a
                                                         label y and a sequence
                                                         embedding emb (text encoders)
TimeChannelConv        examples/train_ddp.py             the simplest image model: t as
                                                         an extra input channel
SiTStandIn             tests (SiT contract)              SiT (willisma/SiT): label
                                                         embedder with its null row
TinySiT                examples/sit_style.py             SiT in miniature (patches)
TinyDiT, ADMUNet       the step benchmark                DiT/SiT (adaLN-Zero) and
                       (``build_model``)                 ADM/DDPM UNets
SmallUNet, SmallDiT    the rollout benchmark             a two-level UNet and a
                                                         patch transformer
TinyUNet, PatchUNet,   ``reflexflow demo``               re-exported from
ToyMLP                                                   :mod:`reflexflow.demo.model`
=====================  ================================  ===============================

Initialisation order and seeds are part of each model's contract: the tests' golden
values (tests/golden/) are recorded with ConvVelocity and MLPVelocity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import PatchUNet, TinyUNet, ToyMLP

__all__ = [
    "MLPVelocity",
    "ConvVelocity",
    "TinyNet",
    "TimeChannelConv",
    "LabelEmbedderStandIn",
    "SiTStandIn",
    "TinySiT",
    "TinyDiT",
    "ADMUNet",
    "MODEL_PRESETS",
    "build_model",
    "SmallUNet",
    "SmallDiT",
    "TinyUNet",
    "PatchUNet",
    "ToyMLP",
    "timestep_embedding",
]

_ACTIVATIONS = {"tanh": nn.Tanh, "silu": nn.SiLU}


class MLPVelocity(nn.Module):
    """v(x, t[, y]) for (B, D) vectors: an MLP on [x, t, one_hot(y)].

    Mirrors: the MLP of 2-D flow-matching tutorials (flow_matching, torchcfm). ``layers``
    hidden layers of width ``hidden`` with ``activation`` ("tanh" or "silu"); ``classes``
    > 0 adds a one-hot label input; a 0-d ``t`` (an ODE solver's) is broadcast to the
    batch. ``seed`` reseeds torch's global generator before the weights are drawn (None
    keeps the caller's state).
    """

    def __init__(
        self,
        dim: int = 5,
        hidden: int = 16,
        layers: int = 1,
        activation: str = "tanh",
        classes: int = 0,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
        if seed is not None:
            torch.manual_seed(seed)
        self.classes = classes
        act = _ACTIVATIONS[activation]
        mods: list[nn.Module] = [nn.Linear(dim + 1 + classes, hidden), act()]
        for _ in range(layers - 1):
            mods += [nn.Linear(hidden, hidden), act()]
        self.net = nn.Sequential(*mods, nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        h = [x, t[:, None].to(x.dtype)]
        if self.classes:
            h.append(F.one_hot(y, self.classes).to(x.dtype))
        return self.net(torch.cat(h, dim=1))


class ConvVelocity(nn.Module):
    """A tiny conv net v(x, t[, y]) for (B, C, H, W) data; per-sample deterministic.

    Mirrors: a class-conditional image model called ``model(x, t, y=y)`` (DiT/SiT's
    signature) with the smallest layers that make its output depend on x, t and y.
    ``seed`` reseeds torch's global generator before the weights are drawn.
    """

    def __init__(self, channels: int = 3, num_classes: int = 0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)
        self.embed = nn.Embedding(num_classes, 8) if num_classes else None

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        h = torch.tanh(self.conv1(x) + t.view(-1, 1, 1, 1).to(x.dtype))
        if self.embed is not None:
            h = h + self.embed(y).to(x.dtype)[:, :, None, None]
        return self.conv2(h)


class TinyNet(nn.Module):
    """v(x, t, y, emb) = tanh(conv(x)) (1 + t) + label and embedding terms; dtype-generic.

    Mirrors: a conditioned model with a class label ``y`` (B,) and a sequence embedding
    ``emb`` (B, L, dim), as text-conditioned models take; its weights come from a private
    generator (seed 0), so building it leaves the global generator alone.
    """

    def __init__(self, channels: int = 3, classes: int = 5, dim: int = 4) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(0.2 * torch.randn(self.conv.weight.shape, generator=gen))
        self.label = nn.Parameter(torch.randn(classes, channels, generator=gen))
        self.proj = nn.Parameter(torch.randn(dim, channels, generator=gen))

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, emb: Tensor | None = None
    ) -> Tensor:
        out = torch.tanh(self.conv(x)) * (1 + t.to(x.dtype).view(-1, 1, 1, 1))
        if y is not None:
            out = out + self.label.to(x.dtype)[y].view(*y.shape, -1, 1, 1)
        if emb is not None:
            out = out + (emb.to(x.dtype).mean(1) @ self.proj.to(x.dtype)).view(x.shape[0], -1, 1, 1)
        return out


class TimeChannelConv(nn.Module):
    """Conv velocity model v(x, t) for (B, C, H, W) data; t enters as an extra channel.

    Mirrors: the simplest image model (three 3x3 convolutions, SiLU).
    """

    def __init__(self, channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        tt = t.view(-1, 1, 1, 1).to(x.dtype).expand(-1, 1, *x.shape[2:])
        return self.net(torch.cat([x, tt], dim=1))


# ------------------------------------------------------------------ SiT's contract


class LabelEmbedderStandIn(nn.Module):
    """SiT's LabelEmbedder: the null row exists only when dropout_prob > 0.

    Mirrors willisma/SiT models.py (a87098c): ``embedding_table`` has ``num_classes + 1``
    rows when ``dropout_prob > 0`` (the last is the null class of classifier-free
    guidance), else ``num_classes``; in train mode with ``dropout_prob > 0`` each label is
    replaced by ``num_classes`` with that probability, in every call. With ``record``,
    ``looked_up`` keeps the labels embedded, after any drop.
    """

    def __init__(
        self, num_classes: int, hidden: int, dropout_prob: float, record: bool = True
    ) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.record = record
        self.looked_up: list[Tensor] = []

    def forward(self, labels: Tensor, train: bool) -> Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        if self.record:
            self.looked_up.append(labels.detach().clone())
        return self.embedding_table(labels)


class SiTStandIn(nn.Module):
    """model(x, t, y) -> velocity of x's shape, with SiT's ``y_embedder``.

    Mirrors: SiT (willisma/SiT), whose ``forward(x, t, y)`` embeds ``y`` with
    ``self.y_embedder(y, self.training)`` (default ``class_dropout_prob=0.1``).
    ``labels_seen``: the labels each call embedded (after the embedder's own dropout).
    """

    def __init__(
        self, channels: int = 2, num_classes: int = 5, class_dropout_prob: float = 0.1
    ) -> None:
        super().__init__()
        hidden = 16
        self.y_embedder = LabelEmbedderStandIn(num_classes, hidden, class_dropout_prob)
        self.t_embed = nn.Linear(1, hidden)
        self.inp = nn.Conv2d(channels, hidden, 1)
        self.out = nn.Conv2d(hidden, channels, 1)

    @property
    def labels_seen(self) -> list[Tensor]:
        return self.y_embedder.looked_up

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        c = self.t_embed(t.view(-1, 1).to(x.dtype)) + self.y_embedder(y, self.training)
        return self.out(torch.tanh(self.inp(x) + c[:, :, None, None]))


class TinySiT(nn.Module):
    """A SiT-shaped toy: patch tokens + time and label embeddings + one MLP block.

    Mirrors: SiT's architecture in miniature (patchify, adaLN-free conditioning added to
    every token) with SiT's ``y_embedder`` contract. forward(x, t, y): x (B, C, H, W), t
    (B,) in [0, 1], y (B,) int labels, where label ``num_classes`` is the null class of
    classifier-free guidance.
    """

    def __init__(
        self,
        channels: int = 4,
        size: int = 8,
        patch: int = 2,
        dim: int = 32,
        num_classes: int = 10,
        class_dropout_prob: float = 0.1,
    ) -> None:
        super().__init__()
        self.patch, self.size, self.channels = patch, size, channels
        pdim = channels * patch * patch
        self.embed = nn.Linear(pdim, dim)
        self.t_embed = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = LabelEmbedderStandIn(num_classes, dim, class_dropout_prob, False)
        self.block = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        )
        self.out = nn.Linear(dim, pdim)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        p = self.patch
        tok = x.view(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)
        tok = tok.reshape(b, -1, c * p * p)
        cond = self.t_embed(t.view(-1, 1).to(x.dtype)) + self.y_embedder(y, self.training)
        h = self.embed(tok) + cond[:, None]
        h = h + self.block(h)
        out = self.out(h).view(b, hh // p, ww // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, hh, ww)


# ------------------------------------------------------- the step benchmark's models


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
    """DiT/SiT-style transformer: (B, C, S, S) latents -> velocity of the same shape.

    Mirrors: DiT/SiT (default 4x32x32 latents): patchify (p x p conv), fixed 2-D sin-cos
    position embedding, blocks with adaLN-Zero modulation (x += g * f(LN(x) * (1 + s) +
    b), (s, b, g) from the time embedding), final adaLN layer and unpatchify; attention
    is ``F.scaled_dot_product_attention``. At size "gpu" it is SiT-S/2.
    """

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


class ADMUNet(nn.Module):
    """ADM-style UNet: (B, C, H, W) pixels -> velocity of the same shape.

    Mirrors: the DDPM/ADM UNet on pixels (default 3x32x32): one residual block (GroupNorm,
    SiLU, additive time embedding) per level, channels ``base * mult`` per level, a
    stride-2 conv between levels, a middle ResBlock-Attention-ResBlock, and a mirrored
    decoder with nearest upsampling and skip concatenation.
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
        ADMUNet,
        (3, 32, 32),
        {
            "quick": {"base": 8, "mults": (1, 2)},
            "small": {"base": 16, "mults": (1, 2, 2)},
            "gpu": {"base": 128, "mults": (1, 2, 2)},
        },
    ),
}


def build_model(name: str, size: str) -> tuple[nn.Module, tuple[int, int, int]]:
    """The step benchmark's model ``name`` ("dit" or "unet") at ``size`` and its data shape."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"model must be one of {tuple(MODEL_PRESETS)}, got {name!r}")
    cls, shape, sizes = MODEL_PRESETS[name]
    if size not in sizes:
        raise ValueError(f"size must be one of {tuple(sizes)}, got {size!r}")
    return cls(in_channels=shape[0], **sizes[size]), shape


# ---------------------------------------------------- the rollout benchmark's models


def _rollout_time_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
    ang = t.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class SmallUNet(nn.Module):
    """Two-level conv UNet with a time embedding added at every block.

    Mirrors: a UNet's cost profile (convolutions at two resolutions, a skip) at the
    rollout benchmark's small sizes.
    """

    def __init__(self, channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.temb = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2 * width))
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.out = nn.Conv2d(2 * width, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.temb(_rollout_time_embedding(t, self.width).to(x.dtype))
        h1 = self.act(self.inp(x)) + emb[:, : self.width, None, None]
        h2 = self.act(self.down(h1)) + emb[:, :, None, None]
        h2 = self.act(self.mid(h2))
        u = self.act(self.up(h2))
        return self.out(torch.cat([u, h1], dim=1))


class SmallDiT(nn.Module):
    """Patchify (4x4), a few pre-norm transformer blocks with adaLN-style time shift.

    Mirrors: a patch transformer (DiT) at the rollout benchmark's small sizes, built from
    ``nn.TransformerEncoderLayer``.
    """

    def __init__(self, channels: int = 3, size: int = 16, dim: int = 128, depth: int = 2):
        super().__init__()
        self.p, self.size, self.dim = 4, size, dim
        self.embed = nn.Linear(channels * 16, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, (size // 4) ** 2, dim))
        self.temb = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 2 * dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, channels * 16)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        p = self.p
        tok = x.reshape(b, c, hgt // p, p, wid // p, p).permute(0, 2, 4, 1, 3, 5)
        tok = self.embed(tok.reshape(b, -1, c * p * p)) + self.pos
        emb = _rollout_time_embedding(t, self.dim).to(x.dtype)
        scale, shift = self.temb(emb).chunk(2, dim=1)
        tok = tok * (1 + scale[:, None]) + shift[:, None]
        out = self.head(self.blocks(tok))
        out = out.reshape(b, hgt // p, wid // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, hgt, wid)
