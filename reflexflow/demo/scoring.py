"""Scores of generated samples against the evaluation split, and the exposure-bias curves.

* digits: Frechet distance, k-NN precision / recall and confidence in the features of the
  digit classifier;
* photos: Frechet distance and k-NN precision / recall in the features of the photo
  classifier, and the radially averaged power spectrum against the held-out crops, as
  band errors (spec_low, spec_high) and signed band log-ratios (power_low, power_high);
* 2-D toys: MMD^2 and precision / recall in data space;
* every dataset: the exposure-bias curve of docs/method.md section 7 (reflexflow.exposure_bias).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from ..diagnostics import exposure_bias
from . import metrics as M
from .spectrum import band_scores, radial_power_spectrum

__all__ = ["Scorer", "bias_k", "bias_curves", "autocast"]


def autocast(cfg: Any) -> contextlib.AbstractContextManager:
    """bf16 autocast on cfg.device when cfg.amp, else a no-op context."""
    if not cfg.amp:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16)


class Scorer:
    """Sample-quality scores against ``real`` (features and spectrum computed once)."""

    def __init__(self, dataset: str, real: Tensor, clf: nn.Module | None) -> None:
        self.dataset, self.real, self.clf = dataset, real, clf
        if clf is not None:
            self.real_feats, _ = M.batched_features(clf, real)
        self.real_spectrum = radial_power_spectrum(real) if dataset == "photos" else None

    def __call__(self, x: Tensor) -> dict[str, float]:
        """Scores of samples x (N, ...): FD, precision, recall, and per dataset the rest."""
        x = x.detach().float().cpu()
        scores: dict[str, float] = {}
        if self.clf is None:
            scores["mmd"] = M.mmd_rbf(x, self.real)
            scores["precision"], scores["recall"] = M.precision_recall(self.real, x)
            return scores
        x = x.clamp(-1, 1)
        feats, logits = M.batched_features(self.clf, x)
        scores["fd"] = M.frechet_distance(feats, self.real_feats)
        scores["precision"], scores["recall"] = M.precision_recall(self.real_feats, feats)
        if self.dataset == "digits":
            scores["confidence"] = M.confidence(logits)
        if self.real_spectrum is not None:
            scores.update(self.spectrum_scores(x))
        return scores

    def spectrum_scores(self, x: Tensor) -> dict[str, float]:
        """Band scores (spectrum.band_scores) of images x against the real set."""
        if self.real_spectrum is None:
            raise ValueError("spectrum scores need image data (dataset 'photos')")
        return band_scores(radial_power_spectrum(x.detach().float().cpu()), self.real_spectrum)

    def spectrum(self, x: Tensor) -> list[float] | None:
        """P(r) of samples x (clamped to [-1, 1]) for the spectrum figure; None without one."""
        if self.real_spectrum is None:
            return None
        return radial_power_spectrum(x.detach().float().cpu().clamp(-1, 1)).tolist()


def bias_k(cfg: Any, n_steps: int) -> int:
    """Rollout length of the bias curve at N steps: k = max(1, round(bias_span N)), k h < 1."""
    return max(1, min(round(cfg.bias_span * n_steps), n_steps - 1 if n_steps > 1 else 1))


def bias_curves(cfg: Any, bias_x: Tensor, model: nn.Module, seed: int) -> dict[str, Any]:
    """Exposure-bias curve (docs/method.md section 7) at every N of eval_steps, held-out data."""
    device = torch.device(cfg.device)
    curves = {}
    for n in cfg.eval_steps:
        k = bias_k(cfg, n)
        gen = torch.Generator(device=device).manual_seed(20_000 + seed)
        with autocast(cfg):
            eb = exposure_bias(
                model,
                bias_x.to(device),
                num_sampling_steps=n,
                k=k,
                num_times=cfg.bias_times,
                generator=gen,
            )
        d = eb.as_dict()
        d["mean_mse"] = float(eb.mse.mean())
        curves[str(n)] = d
    return curves
