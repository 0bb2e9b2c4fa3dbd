"""Every setting of ``reflexflow demo``: DemoConfig and the size presets it resolves.

A field left at None takes the value of the preset that fits the dataset and size:

    oracle (the default)        ORACLE: the exact-oracle study, 14 rows x 3 seeds of a TinyUNet
                                on a 1024-d Gaussian mixture, sized for ~10 minutes on 2 cores
    digits (and the 2-D toys)   the original study: 400 steps of a TinyUNet, 500 samples
    photos on a CPU             PHOTOS_CPU: a PatchUNet, sized for 15 minutes on 2 cores
    photos with --device cuda   PHOTOS_CUDA: SiT-S/2, 20K steps, bf16 autocast
    --quick                     a smoke test of the chosen dataset, under a minute on a CPU

Explicit values always win. ``as_dict`` records the resolved values in results.json.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from .data import TOYS
from .methods import (
    DEFAULT_METHODS,
    ORACLE_METHODS,
    ORACLE_QUICK_METHODS,
    PHOTO_METHODS,
    PHOTO_QUICK_METHODS,
    QUICK_METHODS,
    TOY_METHODS,
    parse_method,
)

__all__ = [
    "DemoConfig",
    "quick_config",
    "DATASETS",
    "DEFAULT_DATASET",
    "SPLITS",
    "ARCHS",
    "preset_values",
]

DATASETS = ("oracle", "digits", "photos", *TOYS)
DEFAULT_DATASET = "oracle"
SPLITS = ("test", "val")
ARCHS = ("unet", "sit", "mlp")

DIGITS: dict[str, Any] = {
    "methods": DEFAULT_METHODS,
    "seeds": (0, 1, 2),
    "steps": 400,
    # fm-equal-compute: fm for 2x the steps, the model-FLOP ratio of a gd-direction step
    # (K = 1, shared first call: two gradient-carrying forwards and their backward) to fm's
    "equal_compute_ratio": 2.0,
    "batch_size": 64,
    "lr": 2e-3,
    "channels": (16, 32),
    "eval_steps": (10, 20, 50),
    "num_samples": 500,
    "bias_samples": 128,
    "bias_times": 6,
    "eval_size": 0,  # digits and toys: the whole held-out split
    "feature_steps": 0,  # digits: the classifier trains 30 epochs (metrics.train_classifier)
    "long_factor": 3,
}
# Sized from measured CPU time (docs/demo.md): about 8 minutes with 2 workers on 2 idle
# cores (its CPU time over 2). Rows: fm, fm at equal compute, the default preset
# (``reflexflow``), the other presets, ss, ip, stable targets, and fm / the default at
# long_factor x the steps.
ORACLE: dict[str, Any] = {
    "methods": ORACLE_METHODS,
    "seeds": (0, 1, 2),
    "steps": 200,
    "batch_size": 32,
    "lr": 2e-3,
    "channels": (16, 32),
    "eval_steps": (5, 10, 20),
    "num_samples": 400,
    "bias_samples": 128,
    "long_factor": 2,
}
ORACLE_QUICK: dict[str, Any] = {
    "methods": ORACLE_QUICK_METHODS,
    "seeds": (0, 1),
    "steps": 30,
    "channels": (8, 16),
    "eval_steps": (5, 10),
    "num_samples": 128,
    "bias_samples": 32,
    "long_factor": 2,
}
DIGITS_QUICK: dict[str, Any] = {
    "methods": QUICK_METHODS,
    "seeds": (0, 1),
    "steps": 40,
    "eval_steps": (10, 20),
    "num_samples": 100,
    "bias_samples": 64,
    "bias_times": 4,
}
PHOTOS_CPU: dict[str, Any] = {
    "methods": PHOTO_METHODS,
    "steps": 280,
    # fm-equal-compute: the model-FLOP ratio of a defar step (2 gradient-carrying forwards
    # and one no-grad forward for the velocity-space bias) to fm's
    "equal_compute_ratio": 2.33,
    "batch_size": 32,
    "lr": 2e-3,
    "channels": (24, 48),
    "num_samples": 160,
    "bias_samples": 32,
    "bias_times": 4,
    "eval_size": 1024,
    "feature_steps": 600,
}
PHOTOS_QUICK: dict[str, Any] = {
    "methods": PHOTO_QUICK_METHODS,
    "seeds": (0, 1),
    "steps": 30,
    "channels": (8, 16),
    "eval_steps": (10, 20),
    "num_samples": 64,
    "bias_samples": 16,
    "bias_times": 3,
    "eval_size": 256,
    "feature_steps": 100,
}
# Sized for the 8-minute budget of one H100 call (an estimate from FLOPs, docs/demo.md:
# about 120 PFLOP, 5 minutes at 40% of the dense bf16 peak; not measured): the two rows
# that matter most (fm and the default preset) x 3 seeds; more rows with --methods.
PHOTOS_CUDA: dict[str, Any] = {
    "arch": "sit",
    "methods": ("fm", "defar"),
    "steps": 20_000,
    "batch_size": 16,
    "lr": 1e-4,
    "num_samples": 1024,
    "bias_samples": 256,
    "bias_times": 8,
    "eval_size": 2048,
}


def preset_values(dataset: str, quick: bool, device: str) -> dict[str, Any]:
    """The preset values for a dataset, size (quick or not) and device (module docstring)."""
    values = dict(DIGITS)
    cuda = device.startswith("cuda")
    if dataset == "oracle":
        values.update(ORACLE)
        values["arch"] = "unet"
        if quick:
            values.update(ORACLE_QUICK)
    elif dataset == "photos":
        values.update(PHOTOS_CPU)
        values["arch"] = "unet"
        if cuda:
            values.update(PHOTOS_CUDA)
        if quick:
            values.update(PHOTOS_QUICK)
    else:
        values["arch"] = "unet" if dataset == "digits" else "mlp"
        if quick:
            values.update(DIGITS_QUICK)
        if dataset in TOYS:
            values["methods"] = TOY_METHODS
    values["amp"] = cuda and values["arch"] == "sit"
    return values


@dataclasses.dataclass
class DemoConfig:
    """Every setting of ``reflexflow demo`` (see ``reflexflow demo --help``).

    None means "the preset's value" (preset_values); __post_init__ resolves it.
    ``lambda_adr``, ``lambda_fc``, ``rollout_steps`` and ``train_sampling_steps`` apply to
    the digits study's rows only (methods.SHARED_KNOB_METHODS): preset and stable rows
    keep the library's values unless a row overrides them (``defar:lambda_adr=0.5``).
    """

    out: Path = Path("reflexflow-demo")
    dataset: str = DEFAULT_DATASET
    size: int = 8
    methods: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    channels: tuple[int, ...] | None = None
    eval_steps: tuple[int, ...] | None = None
    num_samples: int | None = None
    bias_samples: int | None = None
    bias_span: float = 0.2
    bias_times: int | None = None
    lambda_adr: float = 10.0
    lambda_fc: float = 1.0
    rollout_steps: int = 1
    train_sampling_steps: int = 20
    split: str = "test"
    device: str = "cpu"
    threads: int | None = 1
    workers: int = 1
    cache_dir: Path | None = None
    show_progress: bool = True
    quick: bool = False
    arch: str | None = None
    amp: bool | None = None
    eval_size: int | None = None
    feature_steps: int | None = None
    long_factor: int | None = None
    equal_compute_ratio: float | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if not isinstance(self.device, str):
            raise TypeError(f"device must be a string such as 'cpu' or 'cuda', got {self.device!r}")
        for name, value in preset_values(self.dataset, self.quick, self.device).items():
            if getattr(self, name) is None and name != "amp":
                setattr(self, name, value)
        if self.amp is None:  # follows the model in use, the preset's or --arch's
            self.amp = self.device.startswith("cuda") and self.arch == "sit"
        for name in ("methods", "seeds", "eval_steps", "channels"):
            setattr(self, name, tuple(getattr(self, name)))
        self._check()
        self.out = Path(self.out)

    def _check(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.size not in (8, 16):
            raise ValueError(f"size must be 8 or 16, got {self.size!r}")
        if not self.methods:
            raise ValueError("methods must name at least one method")
        for m in self.methods:
            try:
                parse_method(m)
            except ValueError as err:
                raise ValueError(f"methods: {err}") from err
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must not repeat, got {self.methods}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if not self.eval_steps or any(n < 1 for n in self.eval_steps):
            raise ValueError(f"eval_steps must be integers >= 1, got {self.eval_steps}")
        for name in ("steps", "batch_size", "num_samples", "bias_samples", "bias_times"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_samples < 10:
            raise ValueError(f"num_samples must be >= 10, got {self.num_samples}")
        if not 0 < self.bias_span < 1:
            raise ValueError(f"bias_span must lie in (0, 1), got {self.bias_span}")
        if self.long_factor < 1:
            raise ValueError(f"long_factor must be >= 1, got {self.long_factor}")
        if self.equal_compute_ratio is not None and not self.equal_compute_ratio > 0:
            raise ValueError(f"equal_compute_ratio must be > 0, got {self.equal_compute_ratio}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.channels is not None and not all(
            isinstance(c, int) and c >= 1 for c in self.channels
        ):
            raise ValueError(f"channels must be integers >= 1, got {self.channels}")
        if self.dataset != "oracle" and any(n < 2 for n in self.eval_steps):
            raise ValueError(
                f"eval_steps must be >= 2 for dataset {self.dataset!r} (its exposure-bias "
                f"curve rolls out k < N steps), got {self.eval_steps}"
            )
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.workers > 1 and self.device != "cpu":
            raise ValueError(f"workers > 1 needs device='cpu', got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if (self.arch == "mlp") != (self.dataset in TOYS):
            raise ValueError(
                f"arch {self.arch!r} does not fit dataset {self.dataset!r}: the 2-D toys "
                "use 'mlp', the image datasets 'unet' or 'sit'"
            )
        if not isinstance(self.amp, bool):
            raise TypeError(f"amp must be a bool, got {self.amp!r}")
        if self.dataset == "photos":
            if self.eval_size < 16:
                raise ValueError(f"eval_size must be >= 16 for photos, got {self.eval_size}")
            if self.feature_steps < 1:
                raise ValueError(f"feature_steps must be >= 1, got {self.feature_steps}")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        return d


def quick_config(**overrides: Any) -> DemoConfig:
    """The ``--quick`` preset of the chosen dataset (digits: fm, ss, reflexflow; 2 seeds;
    40 steps; N in (10, 20); 100 samples)."""
    return DemoConfig(quick=True, **overrides)
