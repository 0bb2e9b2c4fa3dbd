"""Pure-PyTorch reference of every ReflexFlow formula (docs/method.md sections 1 to 7).

Plain, readable, float64-capable code: the oracle every fast path (Triton, C++/CUDA)
is tested against, and the implementation behind ``backend="torch"``.
Everything here is in the canonical convention: data x1 at t = 1, noise eps at t = 0.

Layout of a batch ``x`` of shape (B, *S):

* (B, D)            vectors: no spatial axes, no channel mean, no filter
* (B, C, L)         1-D signals: filter over L
* (B, C, H, W)      images: filter over (H, W)
* (B, C, T, H, W)   video: filter over (H, W) for each frame
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .batching import index_batch
from .paths import PathLike

__all__ = [
    "bcast",
    "interpolate",
    "velocity_target",
    "adr_target",
    "adr_target_linear",
    "lowpass",
    "fc_weight",
    "fm_loss",
    "fc_loss",
    "adr_mse_loss",
    "adr_direction_loss",
    "objective",
    "euler_rollout_per_sample",
    "low_frequency_share",
    "FILTERS",
    "NORM_EPS",
    "NORM_FLOOR",
    "TINY",
]

FILTERS = ("gaussian", "box", "fft")
NORM_EPS = 1e-6  # absolute lower bound of the per-sample norms in the direction loss
# |v1| is also bounded below by NORM_FLOOR * |v_adr|: a model whose output starts at zero
# (SiT/DiT zero-initialise their last layer) would otherwise see gradients ~ 1/NORM_EPS.
# 0.01 rather than 0.1: a larger floor also binds in normal training near t = 1, where
# |v_adr| = |x1 - x^| / (1 - t1) is large (docs/demo.md).
NORM_FLOOR = 0.01
TINY = 1e-12  # added to the per-sample mean of the FC map before dividing


def bcast(t: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample values (B,) to (B, 1, ..., 1) so they broadcast against x."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(path: PathLike, x1: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = a(t) * x1 + s(t) * eps."""
    return bcast(path.a(t), x1) * x1 + bcast(path.s(t), x1) * eps


def velocity_target(path: PathLike, x1: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """u_t = a'(t) * x1 + s'(t) * eps (conditional velocity)."""
    return bcast(path.da(t), x1) * x1 + bcast(path.ds(t), x1) * eps


def adr_target(path: PathLike, x1: Tensor, eps: Tensor, x_hat: Tensor, t1: Tensor) -> Tensor:
    """ADR target v_adr = u_t1 + (s'(t1) / s(t1)) * (x^_t1 - x_t1).

    Equivalent to a'(t1) x1 + s'(t1) eps^ with eps^ = (x^_t1 - a(t1) x1) / s(t1): the
    velocity that carries the biased state back onto the path towards the same x1.
    Requires s(t1) > 0 (t1 <= 1 - t_eps).
    """
    delta = x_hat - interpolate(path, x1, eps, t1)
    ratio = path.ds(t1) / path.s(t1)
    return velocity_target(path, x1, eps, t1) + bcast(ratio, x1) * delta


def adr_target_linear(x1: Tensor, x_hat: Tensor, t1: Tensor) -> Tensor:
    """Closed form of the ADR target on the linear path: (x1 - x^_t1) / (1 - t1)."""
    return (x1 - x_hat) / bcast(1 - t1, x1)


def _spatial_ndim(x: Tensor) -> int:
    """Number of trailing axes the FC filter runs over (0 for vectors)."""
    return {2: 0, 3: 1}.get(x.dim(), 2)


def _gaussian_taps(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).to(dtype)


def _separable_conv(m: Tensor, taps: Tensor, n_axes: int) -> Tensor:
    """Convolve the last n_axes of m with a 1-D odd-length kernel, replicate padding."""
    radius = (taps.numel() - 1) // 2
    for axis in range(1, n_axes + 1):
        moved = m.movedim(-axis, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        flat = F.pad(flat, (radius, radius), mode="replicate")
        flat = F.conv1d(flat, taps.view(1, 1, -1))
        m = flat.reshape(shape).movedim(-1, -axis)
    return m


def _fft_lowpass(m: Tensor, cutoff: float, n_axes: int) -> Tensor:
    dims = tuple(range(-n_axes, 0))
    sizes = m.shape[-n_axes:]
    spec = torch.fft.rfftn(m, dim=dims)
    freqs = [torch.fft.fftfreq(n, device=m.device, dtype=m.dtype) for n in sizes[:-1]]
    freqs.append(torch.fft.rfftfreq(sizes[-1], device=m.device, dtype=m.dtype))
    grids = torch.meshgrid(*freqs, indexing="ij")
    radius = torch.sqrt(sum(g * g for g in grids))  # cycles per sample; Nyquist = 0.5
    mask = (radius <= 0.5 * cutoff).to(spec.dtype)
    out = torch.fft.irfftn(spec * mask, s=sizes, dim=dims)
    return out.clamp_min(0)  # an ideal low-pass rings; the FC map must stay >= 0


def lowpass(
    m: Tensor,
    *,
    kind: str = "gaussian",
    n_axes: int = 2,
    sigma: float = 2.0,
    size: int = 5,
    cutoff: float = 0.25,
) -> Tensor:
    """Low-pass filter over the last n_axes axes of m.

    gaussian: separable, taps exp(-o^2 / (2 sigma^2)) for |o| <= ceil(3 sigma), normalised;
    box: separable mean over an odd window of ``size``; both with replicate padding, so a
    constant map stays constant. fft: ideal low-pass keeping frequencies with radius
    <= cutoff * Nyquist, clamped at 0 afterwards.
    """
    if n_axes == 0:
        return m
    if kind == "gaussian":
        if sigma <= 0:
            return m
        return _separable_conv(m, _gaussian_taps(sigma, m.dtype, m.device), n_axes)
    if kind == "box":
        taps = torch.full((size,), 1.0 / size, dtype=m.dtype, device=m.device)
        return _separable_conv(m, taps, n_axes)
    if kind == "fft":
        return _fft_lowpass(m, cutoff, n_axes)
    raise ValueError(f"fc_filter must be one of {FILTERS}, got {kind!r}")


def fc_weight(
    delta: Tensor,
    *,
    lambda_fc: float = 1.0,
    active: Tensor | None = None,
    per_channel: bool = False,
    kind: str = "gaussian",
    sigma: float = 2.0,
    size: int = 5,
    cutoff: float = 0.25,
) -> Tensor:
    """Frequency-compensation weight w = 1 + lambda_fc * m / (mean(m) + tiny).

    m = LP(mean over channels of |delta|) (or per channel), the mean taken per sample
    (and per channel when per_channel) over the remaining axes. Rows with active False
    (k = 0, or outside fc_t_max) get w = 1. Shape: (B, 1, *S) broadcasting over
    channels, (B, C, *S) per channel, (B, D) for vectors. The result carries no gradient.
    """
    delta = delta.detach()
    n_axes = _spatial_ndim(delta)
    m = delta.abs()
    if delta.dim() > 2 and not per_channel:
        m = m.mean(dim=1, keepdim=True)
    m = lowpass(m, kind=kind, n_axes=n_axes, sigma=sigma, size=size, cutoff=cutoff)
    norm_dims = tuple(range(2 if delta.dim() > 2 else 1, m.dim()))
    m = m / (m.mean(dim=norm_dims, keepdim=True) + TINY)
    w = 1 + lambda_fc * m
    if active is not None:
        w = torch.where(bcast(active, w).bool(), w, torch.ones_like(w))
    return w


def fm_loss(v: Tensor, u: Tensor) -> Tensor:
    """Plain flow-matching loss mean ||v - u||^2 (mean over all elements)."""
    return (v - u).square().mean()


def fc_loss(v0: Tensor, u0: Tensor, w: Tensor) -> Tensor:
    """L_FC = mean(w * (v0 - u0)^2), w broadcast over channels and detached."""
    return (w.detach() * (v0 - u0).square()).mean()


def adr_mse_loss(v1: Tensor, v_adr: Tensor) -> Tensor:
    """L_ADR (mse) = mean ||v1 - v_adr||^2, v_adr detached."""
    return (v1 - v_adr.detach()).square().mean()


def adr_direction_loss(
    v1: Tensor, v_adr: Tensor, norm_eps: float = NORM_EPS, norm_floor: float = NORM_FLOOR
) -> Tensor:
    """L_ADR (direction) = mean over samples || v1/n - v_adr/n_a ||^2, v_adr detached.

    Norms over all non-batch axes: n = max(|v1|, norm_floor |v_adr|, norm_eps) and
    n_a = max(|v_adr|, norm_eps). Where |v1| is below the floor, n is a constant, so the
    gradient stays bounded by about 2 lambda / (B norm_floor |v_adr|).
    """
    v = v1.flatten(1)
    a = v_adr.detach().flatten(1)
    a_norm = a.norm(dim=1, keepdim=True)
    floor = (norm_floor * a_norm).clamp_min(norm_eps)
    d = v / torch.maximum(v.norm(dim=1, keepdim=True), floor) - a / a_norm.clamp_min(norm_eps)
    return d.square().sum(dim=1).mean()


def objective(
    path: PathLike,
    *,
    v0: Tensor,
    v1: Tensor | None,
    x1: Tensor,
    eps: Tensor,
    x_hat: Tensor,
    t0: Tensor,
    t1: Tensor,
    k: Tensor,
    lambda_adr: float = 10.0,
    lambda_fc: float = 1.0,
    adr_loss: str = "direction",
    fc_active: Tensor | None = None,
    fc_delta: Tensor | None = None,
    per_channel: bool = False,
    fc_filter: str = "gaussian",
    fc_sigma: float = 2.0,
    fc_size: int = 5,
    fc_cutoff: float = 0.25,
    norm_eps: float = NORM_EPS,
    norm_floor: float = NORM_FLOOR,
) -> dict[str, Tensor | None]:
    """The ReflexFlow objective L = L_FC + lambda_adr * L_ADR (docs/method.md section 5).

    v0 = v(x_t0, t0) and v1 = v(x^_t1, t1) are the two gradient-carrying model outputs;
    delta = x^_t1 - x_t1 (or fc_delta, e.g. the velocity-space bias) drives the FC map;
    fc_active (B,) bool defaults to k > 0. Returns loss, fc_loss, adr_loss, w, v_adr, delta;
    with v1 None the ADR term is skipped (lambda_adr = 0), with lambda_fc = 0 w is None.
    This is the contract of the fused kernels: same inputs, same outputs and gradients.
    """
    delta = x_hat - interpolate(path, x1, eps, t1)
    u0 = velocity_target(path, x1, eps, t0)
    out: dict[str, Tensor | None] = {"delta": delta, "w": None, "v_adr": None, "adr_loss": None}
    if lambda_fc != 0:
        active = (k > 0) if fc_active is None else fc_active
        out["w"] = fc_weight(
            delta if fc_delta is None else fc_delta,
            lambda_fc=lambda_fc,
            active=active,
            per_channel=per_channel,
            kind=fc_filter,
            sigma=fc_sigma,
            size=fc_size,
            cutoff=fc_cutoff,
        )
        out["fc_loss"] = fc_loss(v0, u0, out["w"])
    else:
        out["fc_loss"] = fm_loss(v0, u0)
    out["loss"] = out["fc_loss"]
    if v1 is not None:
        out["v_adr"] = v_adr = adr_target(path, x1, eps, x_hat, t1)
        if adr_loss == "direction":
            out["adr_loss"] = adr_direction_loss(v1, v_adr, norm_eps, norm_floor)
        elif adr_loss == "mse":
            out["adr_loss"] = adr_mse_loss(v1, v_adr)
        else:
            raise ValueError(f"adr_loss must be 'direction' or 'mse', got {adr_loss!r}")
        out["loss"] = out["fc_loss"] + lambda_adr * out["adr_loss"]
    return out


VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]


@torch.no_grad()
def euler_rollout_per_sample(
    velocity: VelocityFn,
    x_t0: Tensor,
    t0: Tensor,
    k: Tensor,
    step: Tensor,
    model_kwargs: Any = None,
) -> Tensor:
    """Scheduled-sampling rollout, one sample at a time (the slow, obvious oracle).

    For each sample i: x = x_t0[i], tau = t0[i]; repeat k[i] times:
    x = x + step[i] * v(x, tau); tau = tau + step[i]. ``velocity(x, t, kwargs)`` is the
    canonical velocity; batch-shaped entries of model_kwargs are sliced to the sample.
    """
    batch = x_t0.shape[0]
    out = x_t0.clone()
    for i in range(batch):
        idx = torch.tensor([i], device=x_t0.device)
        x = x_t0[i : i + 1].clone()
        tau = t0[i : i + 1].clone()
        h = step[i : i + 1]
        kwargs = index_batch(model_kwargs, batch, idx)
        for _ in range(int(k[i])):
            x = x + bcast(h, x) * velocity(x, tau, kwargs)
            tau = tau + h
        out[i] = x[0]
    return out


def low_frequency_share(delta: Tensor, cutoff: float = 0.25) -> Tensor:
    """Per-sample share of delta's power at spatial frequencies <= cutoff * Nyquist.

    Power |FFT(delta)|^2 over the spatial axes (summed over channels and frames);
    vectors have no spatial axes and return NaN.
    """
    n_axes = _spatial_ndim(delta)
    if n_axes == 0:
        return torch.full((delta.shape[0],), float("nan"), dtype=delta.dtype, device=delta.device)
    dims = tuple(range(-n_axes, 0))
    power = torch.fft.fftn(delta, dim=dims).abs().square()
    freqs = [
        torch.fft.fftfreq(n, device=delta.device, dtype=delta.dtype) for n in delta.shape[-n_axes:]
    ]
    radius = torch.sqrt(sum(g * g for g in torch.meshgrid(*freqs, indexing="ij")))
    low = (radius <= 0.5 * cutoff).to(power.dtype)
    total = power.flatten(1).sum(1)
    return (power * low).flatten(1).sum(1) / total.clamp_min(torch.finfo(power.dtype).tiny)
