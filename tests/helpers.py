"""The tests' fixtures for toy models, in one place: the models come from
:mod:`reflexflow.demo.toy_models` (shared with the demo, benchmarks and examples); here
are the seeded generator and the call-counting wrapper the tests add to them."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reflexflow.demo.toy_models import (
    ConvVelocity,
    MLPVelocity,
    SiTStandIn,
    TinyNet,
)

__all__ = [
    "ConvVelocity",
    "MLPVelocity",
    "SiTStandIn",
    "TinyNet",
    "Counting",
    "gen",
    "negative_velocity",
    "DropoutBN",
    "data_and_noise",
]


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def data_and_noise(
    seed: int = 0, dtype: torch.dtype = torch.float64, shape: tuple = (6, 3, 8, 8)
) -> tuple[Tensor, Tensor]:
    """(x1, noise): two standard-normal batches of ``shape`` drawn from one seeded generator."""
    g = gen(seed)
    return torch.randn(*shape, generator=g, dtype=dtype), torch.randn(
        *shape, generator=g, dtype=dtype
    )


def negative_velocity(x: Tensor, t: Tensor, **kwargs) -> Tensor:
    """v(x, t) = -x: a model with no parameters, for input checks."""
    return -x


class DropoutBN(nn.Module):
    """Dropout and BatchNorm: computes differently, and updates statistics, in train mode.

    Records (grad enabled, training, frozen.training) of every call; ``frozen`` is a
    submodule the user keeps in eval mode."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.Sequential(nn.Dropout(0.5)).eval()
        self.modes = []

    def forward(self, x, t):
        self.modes.append((torch.is_grad_enabled(), self.training, self.frozen.training))
        return self.drop(self.bn(x))


class Counting:
    """Wraps a velocity function and records the batch size of every call."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.sizes: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, kwargs=None) -> Tensor:
        self.sizes.append(x.shape[0])
        return self.fn(x, t, kwargs)
