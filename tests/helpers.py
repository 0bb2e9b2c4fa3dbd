"""The tests' fixtures, in one place: the toy models come from
:mod:`reflexflow.demo.toy_models` (shared with the demo, benchmarks and examples); here
are what the tests add to them: the seeded generator, batches (data and noise, rollout
inputs), small models (negative_velocity, DropoutBN), the call-counting wrapper and the
rollout oracle check."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reflexflow.demo.toy_models import (
    ConvVelocity,
    MLPVelocity,
    SiTStandIn,
    TinyNet,
)
from reflexflow.objective import ObjectiveInputs
from reflexflow.reference import euler_rollout_per_sample

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
    "rollout_inputs",
    "assert_rollout_matches_oracle",
    "hide_module",
    "assert_same_path",
    "one_step_inputs",
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


def rollout_inputs(batch: int = 7, kmax: int = 3, seed: int = 0, dtype=torch.float32):
    """(x, t0, k, h) of a rollout: x (batch, 3, 6, 6), k in {0..kmax} with k[0] = 0,
    h = 1/20, t0 uniform on [0, 1 - kmax h)."""
    g = gen(seed)
    x = torch.randn(batch, 3, 6, 6, generator=g, dtype=dtype)
    k = torch.randint(0, kmax + 1, (batch,), generator=g)
    k[0] = 0  # at least one zero
    h = torch.full((batch,), 1 / 20, dtype=dtype)
    t0 = torch.rand(batch, generator=g, dtype=dtype) * (1 - kmax * h)
    return x, t0, k, h


def one_step_inputs(
    x1: Tensor, eps: Tensor, x_hat: Tensor, t0: Tensor, t1: Tensor, **rest: Tensor
) -> ObjectiveInputs:
    """ObjectiveInputs of a batch where every sample took one rollout step:
    k = 1 (int64, on x1's device); ``rest`` are the other fields (v0, v1, v_joint, ...)."""
    k = torch.ones(x1.shape[0], dtype=torch.int64, device=x1.device)
    return ObjectiveInputs(x1=x1, eps=eps, x_hat=x_hat, t0=t0, t1=t1, k=k, **rest)


def assert_rollout_matches_oracle(engine, velocity, x, t0, k, h) -> None:
    """engine(velocity, x, t0, k, h) equals the per-sample loop oracle
    (reference.euler_rollout_per_sample) to rtol 1e-5, atol 1e-6."""
    want = euler_rollout_per_sample(velocity, x, t0, k, h)
    torch.testing.assert_close(engine(velocity, x, t0, k, h), want, rtol=1e-5, atol=1e-6)


def hide_module(monkeypatch, name: str) -> None:
    """Make importlib.util.find_spec(name) return None, as if ``name`` were not installed."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda spec_name, *a, **k: None if spec_name == name else real(spec_name, *a, **k),
    )


def assert_same_path(p, q, t: Tensor) -> None:
    """Paths p and q agree on a, s, da, ds at times t (to 1e-12)."""
    for name in ("a", "s", "da", "ds"):
        torch.testing.assert_close(getattr(p, name)(t), getattr(q, name)(t), rtol=1e-12, atol=1e-12)


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
