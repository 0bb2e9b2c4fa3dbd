"""Small deterministic models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class ConvVelocity(nn.Module):
    """A tiny conv net v(x, t) with an optional class label y; per-sample deterministic."""

    def __init__(self, channels: int = 3, num_classes: int = 0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)
        self.embed = nn.Embedding(num_classes, 8) if num_classes else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        h = torch.tanh(self.conv1(x) + t.view(-1, 1, 1, 1).to(x.dtype))
        if self.embed is not None:
            h = h + self.embed(y).to(x.dtype)[:, :, None, None]
        return self.conv2(h)


class MLPVelocity(nn.Module):
    """v(x, t) for (B, D) vectors."""

    def __init__(self, dim: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim + 1, 16), nn.Tanh(), nn.Linear(16, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
