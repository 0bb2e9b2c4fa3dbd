"""The tests' fixtures for toy models, in one place: the models come from
:mod:`reflexflow.demo.toy_models` (shared with the demo, benchmarks and examples); here
are the seeded generator and the call-counting wrapper the tests add to them."""

from __future__ import annotations

import torch
from torch import Tensor

from reflexflow.demo.toy_models import (
    ConvVelocity,
    MLPVelocity,
    SiTStandIn,
    TinyNet,
)

__all__ = ["ConvVelocity", "MLPVelocity", "SiTStandIn", "TinyNet", "Counting", "gen"]


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


class Counting:
    """Wraps a velocity function and records the batch size of every call."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.sizes: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, kwargs=None) -> Tensor:
        self.sizes.append(x.shape[0])
        return self.fn(x, t, kwargs)
