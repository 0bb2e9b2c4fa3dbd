"""Radially averaged power spectrum of image sets, and its error in a low and a high band.

For images x (N, C, H, W) (H = W = S):

    P(r) = mean over images, channels and frequencies f = (fy, fx) with round(|f|) = r of
           |FFT2(w * (x - mean_xy x))(f)|^2 / g(f),   g(f) = sum(w^2) - |FFT2(w)(f)|^2 / S^2

with w the separable Hann window (the FFT treats the crop as periodic; the window keeps its
edges from leaking power into every frequency) and g the exact response of this estimator
to unit white noise (removing the mean takes |W(f)|^2 / S^2 off), so white noise of
variance s^2 has P(r) = s^2 at every r, in expectation. Radius bins r = 1 .. S/2 (r = 0, the
mean colour, is left out; corners beyond Nyquist too).

Band scores of samples against data (FC's claim concerns the low band):

    low band  r <= cutoff * S/2 (cutoff = 0.25 by default, as reflexflow.diagnostics),
    high band the rest up to Nyquist;
    band error      = mean over the band's bins of |log P_samples(r) - log P_data(r)|
    band log-ratio  = log( sum_band P_samples / sum_band P_data )   (signed: < 0 = missing power)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["radial_power_spectrum", "band_masks", "band_scores", "LOW_CUTOFF"]

LOW_CUTOFF = 0.25  # fraction of Nyquist that bounds the low band


def _hann(n: int, dtype: torch.dtype) -> Tensor:
    return torch.hann_window(n, periodic=False, dtype=dtype)


def _radius_index(size: int) -> Tensor:
    f = torch.fft.fftfreq(size, d=1.0 / size)  # integer frequencies -S/2 .. S/2 - 1
    return torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2).round().long()


def radial_power_spectrum(x: Tensor, batch_size: int = 512) -> Tensor:
    """P(r), r = 1 .. S/2, of square images x (N, C, S, S) (module docstring), float64 (S/2,).

    Hann-windowed, per-image-and-channel mean removed, normalised by the white-noise response.
    """
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"x must be (N, C, S, S) square images, got {getattr(x, 'shape', x)}")
    if x.shape[-1] < 4 or x.shape[0] < 1:
        raise ValueError(f"x needs N >= 1 and S >= 4, got {tuple(x.shape)}")
    size = x.shape[-1]
    win = _hann(size, torch.float64)
    win2 = win[:, None] * win[None, :]
    radius = _radius_index(size)
    nbins = size // 2
    keep = (radius >= 1) & (radius <= nbins)
    idx = radius[keep] - 1
    counts = torch.bincount(idx, minlength=nbins).double()
    window_power = torch.fft.fft2(win2).abs().square()
    response = (win2.square().sum() - window_power / size**2)[keep]
    total = torch.zeros(nbins, dtype=torch.float64)
    for lo in range(0, x.shape[0], batch_size):
        xb = x[lo : lo + batch_size].detach().cpu().double()
        xb = (xb - xb.mean(dim=(-2, -1), keepdim=True)) * win2
        power = torch.fft.fft2(xb).abs().square().mean(dim=1).sum(0)  # (S, S), summed over N
        total += torch.bincount(idx, weights=power[keep] / response, minlength=nbins)
    return total / counts / x.shape[0]


def band_masks(bins: int, cutoff: float = LOW_CUTOFF) -> tuple[Tensor, Tensor]:
    """Boolean masks (low, high) over radius bins 1..bins: low is r <= cutoff * bins."""
    if not 0 < cutoff < 1:
        raise ValueError(f"cutoff must lie in (0, 1), got {cutoff}")
    r = torch.arange(1, bins + 1)
    low = r <= max(1, math.floor(cutoff * bins))
    return low, ~low


def band_scores(
    spec_samples: Tensor, spec_data: Tensor, cutoff: float = LOW_CUTOFF
) -> dict[str, float]:
    """Band errors and signed band log-ratios of two spectra P(r) (module docstring).

    Returns spec_low / spec_high (mean |log P_s - log P_d| over the band, 0 = same shape and
    level) and power_low / power_high (log of the band-power ratio, signed).
    """
    if spec_samples.shape != spec_data.shape or spec_samples.dim() != 1:
        raise ValueError(
            f"spectra must be two (R,) tensors, got {tuple(spec_samples.shape)} and "
            f"{tuple(spec_data.shape)}"
        )
    tiny = 1e-30
    ls, ld = spec_samples.double().clamp_min(tiny).log(), spec_data.double().clamp_min(tiny).log()
    low, high = band_masks(spec_samples.shape[0], cutoff)
    out = {}
    for name, m in (("low", low), ("high", high)):
        out[f"spec_{name}"] = float((ls[m] - ld[m]).abs().mean())
        ratio = spec_samples[m].double().sum().clamp_min(tiny) / spec_data[m].double().sum()
        out[f"power_{name}"] = float(ratio.log())
    return out
