"""Small deterministic models shared by the rollout tests (not collected: no test_ prefix)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyNet(nn.Module):
    """v(x, t, y, emb) = conv(x) * (1 + t) + label and embedding terms; dtype-generic."""

    def __init__(self, channels: int = 3, classes: int = 5, dim: int = 4) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(0.2 * torch.randn(self.conv.weight.shape, generator=gen))
        self.label = nn.Parameter(torch.randn(classes, channels, generator=gen))
        self.proj = nn.Parameter(torch.randn(dim, channels, generator=gen))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, emb: Tensor | None = None):
        out = torch.tanh(self.conv(x)) * (1 + t.to(x.dtype).view(-1, 1, 1, 1))
        if y is not None:
            out = out + self.label.to(x.dtype)[y].view(*y.shape, -1, 1, 1)
        if emb is not None:
            out = out + (emb.to(x.dtype).mean(1) @ self.proj.to(x.dtype)).view(x.shape[0], -1, 1, 1)
        return out


class Counting:
    """Wraps a velocity function and records the batch size of every call."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.sizes: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, kwargs=None) -> Tensor:
        self.sizes.append(x.shape[0])
        return self.fn(x, t, kwargs)
