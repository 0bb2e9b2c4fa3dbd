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
from .objective import (
    FC_FILTERS,
    NORM_EPS,
    NORM_FLOOR,
    FCSpec,
    ObjectiveInputs,
    ObjectiveSpec,
    ObjectiveTerms,
)
from .paths import PathLike

__all__ = [
    "bcast",
    "interpolate",
    "velocity_target",
    "adr_target",
    "adr_target_linear",
    "data_error_scale",
    "adr_x1_weight",
    "lowpass",
    "adr_ratio",
    "fc_weight",
    "per_sample_mean",
    "weighted_mean",
    "fm_loss",
    "fc_loss",
    "per_sample_fc",
    "per_sample_adr_direction",
    "per_sample_adr",
    "adr_mse_loss",
    "adr_direction_loss",
    "fc_term",
    "adr_term",
    "fc_map",
    "objective",
    "euler_rollout_per_sample",
    "low_frequency_share",
    "FILTERS",
    "NORM_EPS",
    "NORM_FLOOR",
    "TINY",
]

FILTERS = FC_FILTERS  # one definition each, in reflexflow.objective
TINY = 1e-12  # added to the per-sample mean of the FC map before dividing
PEER_NORM_MIN = 1e-6  # the peers' clamp of the FC map's sum and channel norm


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
    Rolled-out samples have s(t1) > 0 (t1 <= 1 - t_eps); where s(t1) = 0 (t1 = 1, only
    for samples that were not rolled out, whose delta is 0) the ratio is taken as 0, so
    v_adr = u_t1 and nothing divides by zero.
    """
    delta = x_hat - interpolate(path, x1, eps, t1)
    return velocity_target(path, x1, eps, t1) + bcast(adr_ratio(path, t1), x1) * delta


def adr_ratio(path: PathLike, t1: Tensor) -> Tensor:
    """s'(t1) / s(t1), and 0 where s(t1) = 0 (the coefficient of delta in v_adr)."""
    s1 = path.s(t1)
    safe = torch.where(s1 != 0, s1, torch.ones_like(s1))
    return torch.where(s1 != 0, path.ds(t1) / safe, torch.zeros_like(s1))


def data_error_scale(path: PathLike, t: Tensor) -> Tensor:
    """c(t) = s(t) / (a'(t) s(t) - a(t) s'(t)): the factor that turns a velocity error at
    (x, t) into the error of the data prediction it implies (x1^ = (s v - s' x) / (a' s -
    a s'), so d x1^ = c dv). Linear path: c = 1 - t. 0 where s(t) = 0."""
    a, s = path.a(t), path.s(t)
    # at s = 0 (t = 1) c is 0; s' may be infinite there (vp), so the ratio is not formed
    safe = torch.where(s > 0, s, torch.ones_like(s))
    c = safe / (path.da(t) * safe - a * torch.where(s > 0, path.ds(t), torch.zeros_like(s)))
    return torch.where(s > 0, c, torch.zeros_like(s))


def adr_x1_weight(path: PathLike, t1: Tensor, t_c: float) -> Tensor:
    """(B,) min(1, (c(t1) / c(t_c))^2), c of :func:`data_error_scale`: the near-t = 1
    remedy of the mse ADR term (docs/peer-readings.md). Rows with t1 <= t_c keep weight 1
    (the velocity error); beyond t_c the row is the data-space error c(t1) (v1 - v_adr)
    scaled by 1 / c(t_c) to meet it, bounded as t1 -> 1 where |v1 - v_adr| grows like
    |delta| / (1 - t1). Detached."""
    t1 = t1.detach()
    c_c = data_error_scale(path, torch.full_like(t1, t_c))
    return (data_error_scale(path, t1) / c_c).square().clamp_max(1.0)


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


def _fft_lowpass(m: Tensor, cutoff: float, n_axes: int, clamp: bool = True) -> Tensor:
    dims = tuple(range(-n_axes, 0))
    sizes = m.shape[-n_axes:]
    spec = torch.fft.rfftn(m, dim=dims)
    freqs = [torch.fft.fftfreq(n, device=m.device, dtype=m.dtype) for n in sizes[:-1]]
    freqs.append(torch.fft.rfftfreq(sizes[-1], device=m.device, dtype=m.dtype))
    grids = torch.meshgrid(*freqs, indexing="ij")
    radius = torch.sqrt(sum(g * g for g in grids))  # cycles per sample; Nyquist = 0.5
    mask = (radius <= 0.5 * cutoff).to(spec.dtype)
    out = torch.fft.irfftn(spec * mask, s=sizes, dim=dims)
    # an ideal low-pass rings; an unsigned FC map must stay >= 0
    return out.clamp_min(0) if clamp else out


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
    <= cutoff * Nyquist, clamped at 0 afterwards. none: m unchanged.
    """
    if n_axes == 0 or kind == "none":
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
    signed: bool = False,
    kind: str = "gaussian",
    sigma: float = 2.0,
    size: int = 5,
    cutoff: float = 0.25,
    normalize: str = "mean",
    channel_reduce: str = "mean_abs",
) -> Tensor:
    """Frequency-compensation weight w = 1 + lambda_fc * m / (mean(m) + tiny).

    Unsigned (default): m = LP(mean over channels of |delta|) (or per channel), the mean
    taken per sample (and per channel when per_channel) over the remaining axes, so each
    sample's w has mean 1 + lambda_fc. Signed: m = LP(delta) element-wise (no channel
    mean) and the denominator is the mean of |m| over all of a sample's elements, so w
    may fall below 1 or 0 (use it with fc_form="squared"). Rows with active False (k = 0,
    or outside fc_t_max) get w = 1. Shape: (B, 1, *S) broadcasting over channels,
    (B, C, *S) per channel or signed, (B, D) for vectors. The result carries no gradient.

    The peers' forms (docs/peer-readings.md): normalize "sum" divides by
    max(sum m, 1e-6) over the same axes instead of mean m + tiny (so w - 1 has size 1/N:
    SimpleTuner's signed map, takenoko's unsigned one); channel_reduce "l2" (unsigned)
    takes m = max(||delta||_2 over channels, 1e-6) instead of mean_c |delta| (takenoko).
    """
    delta = delta.detach()

    def normalised(m: Tensor, norm: Tensor, dims: tuple[int, ...]) -> Tensor:
        if normalize == "sum":
            return m / norm.sum(dim=dims, keepdim=True).clamp_min(PEER_NORM_MIN)
        return m / (norm.mean(dim=dims, keepdim=True) + TINY)

    n_axes = _spatial_ndim(delta)
    if signed:
        m = delta
        if kind == "fft":  # the ideal low-pass without the clamp that keeps |.| maps >= 0
            m = _fft_lowpass(m, cutoff, n_axes, clamp=False) if n_axes else m
        else:
            m = lowpass(m, kind=kind, n_axes=n_axes, sigma=sigma, size=size, cutoff=cutoff)
        norm_dims = tuple(range(1, m.dim()))
        m = normalised(m, m.abs(), norm_dims)
    else:
        if channel_reduce == "l2" and delta.dim() > 2 and not per_channel:
            m = delta.norm(dim=1, keepdim=True).clamp_min(PEER_NORM_MIN)
        else:
            m = delta.abs()
            if delta.dim() > 2 and not per_channel:
                m = m.mean(dim=1, keepdim=True)
        m = lowpass(m, kind=kind, n_axes=n_axes, sigma=sigma, size=size, cutoff=cutoff)
        norm_dims = tuple(range(2 if delta.dim() > 2 else 1, m.dim()))
        m = normalised(m, m, norm_dims)
    w = 1 + lambda_fc * m
    if active is not None:
        w = torch.where(bcast(active, w).bool(), w, torch.ones_like(w))
    return w


def per_sample_mean(x: Tensor) -> Tensor:
    """(B,) mean of x over all non-batch axes."""
    return x.flatten(1).mean(dim=1)


def weighted_mean(per_sample: Tensor, weight: Tensor | None = None) -> Tensor:
    """mean_i weight_i * per_sample_i (the plain mean when weight is None)."""
    if weight is None:
        return per_sample.mean()
    return (weight.to(per_sample.dtype) * per_sample).mean()


def fm_loss(v: Tensor, u: Tensor, weight: Tensor | None = None) -> Tensor:
    """Flow-matching loss mean_i weight_i mean ||v_i - u_i||^2 (plain mean when weight is
    None: mean over all elements). weight (B,) is a detached per-sample loss weighting."""
    if weight is None:
        return (v - u).square().mean()
    return weighted_mean(per_sample_mean((v - u).square()), weight.detach())


def fc_loss(v0: Tensor, u0: Tensor, w: Tensor, form: str = "weight") -> Tensor:
    """L_FC = mean(w * (v0 - u0)^2) ("weight") or mean((w * (v0 - u0))^2) ("squared");
    w broadcast over channels and detached."""
    return per_sample_fc(v0, u0, w, form).mean()


def per_sample_fc(v0: Tensor, u0: Tensor, w: Tensor | None, form: str = "weight") -> Tensor:
    """(B,) per-sample FC term: mean over a sample's elements of w (v0 - u0)^2 (or w^2 for
    form "squared"; plain squared error when w is None)."""
    sq = (v0 - u0).square()
    if w is not None:
        w = w.detach()
        sq = (w.square() if form == "squared" else w) * sq
    return per_sample_mean(sq)


def adr_mse_loss(v1: Tensor, v_adr: Tensor) -> Tensor:
    """L_ADR (mse) = mean ||v1 - v_adr||^2, v_adr detached."""
    return (v1 - v_adr.detach()).square().mean()


def per_sample_adr_direction(
    v1: Tensor,
    v_adr: Tensor,
    norm_eps: float = NORM_EPS,
    norm_floor: float = NORM_FLOOR,
    target_grad: bool = False,
) -> Tensor:
    """(B,) || v1/n - v_adr/n_a ||^2 with the norms of :func:`adr_direction_loss`; v_adr
    detached unless target_grad."""
    v = v1.flatten(1)
    a = (v_adr if target_grad else v_adr.detach()).flatten(1)
    a_norm = a.norm(dim=1, keepdim=True)
    floor = (norm_floor * a_norm).clamp_min(norm_eps)
    d = v / torch.maximum(v.norm(dim=1, keepdim=True), floor) - a / a_norm.clamp_min(norm_eps)
    return d.square().sum(dim=1)


def per_sample_adr(
    v1: Tensor,
    v_adr: Tensor,
    adr_loss: str = "direction",
    norm_eps: float = NORM_EPS,
    norm_floor: float = NORM_FLOOR,
    target_grad: bool = False,
) -> Tensor:
    """(B,) per-sample ADR term: mean (v1 - v_adr)^2 (mse) or ||v1/n - v_adr/n_a||^2
    (direction, norms as in :func:`adr_direction_loss`); v_adr detached unless
    target_grad."""
    if not target_grad:
        v_adr = v_adr.detach()
    if adr_loss == "direction":
        return per_sample_adr_direction(v1, v_adr, norm_eps, norm_floor, target_grad)
    if adr_loss == "mse":
        return per_sample_mean((v1 - v_adr).square())
    raise ValueError(f"adr_loss must be 'direction' or 'mse', got {adr_loss!r}")


def adr_direction_loss(
    v1: Tensor, v_adr: Tensor, norm_eps: float = NORM_EPS, norm_floor: float = NORM_FLOOR
) -> Tensor:
    """L_ADR (direction) = mean over samples || v1/n - v_adr/n_a ||^2, v_adr detached.

    Norms over all non-batch axes: n = max(|v1|, norm_floor |v_adr|, norm_eps) and
    n_a = max(|v_adr|, norm_eps). Where |v1| is below the floor, n is a constant, so the
    gradient stays bounded by about 2 lambda / (B norm_floor |v_adr|).
    """
    return per_sample_adr_direction(v1, v_adr, norm_eps, norm_floor).mean()


def fc_term(
    v0: Tensor,
    u0: Tensor,
    w: Tensor | None,
    form: str = "weight",
    weight: Tensor | None = None,
    adds_fm: bool = False,
    active: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(rows (B,), L_FC) of the FC (FM-type) term, from one squared error.

    e = w (v0 - u0)^2 (w^2 for form "squared"; the plain squared error when w is None),
    rows_i = weight_i * mean over sample i of e, L_FC = mean_i rows_i; without weight
    L_FC = mean of e over all elements (rounding as :func:`fm_loss` / :func:`fc_loss`).
    w and weight are detached. adds_fm (takenoko: FC on top of the base loss):
    e = (v0 - u0)^2 + [active_i] w (v0 - u0)^2 (w^2 for "squared"), so rows with an FC
    map count their FM error twice, rows without one (active False) once.
    """
    e = (v0 - u0).square()
    if w is not None:
        w = w.detach()
        weighted = (w.square() if form == "squared" else w) * e
        if adds_fm:
            if active is not None:
                weighted = bcast(active, weighted) * weighted
            e = e + weighted
        else:
            e = weighted
    rows = per_sample_mean(e)
    if weight is None:
        return rows, e.mean()
    rows = weight.detach().to(rows.dtype) * rows
    return rows, rows.mean()


def adr_term(
    v1: Tensor, v_adr: Tensor, spec: ObjectiveSpec, weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(rows (B,), L_ADR) of the ADR term, v_adr detached (unless spec.adr_target_grad).

    rows_i = weight_i * (mean (v1 - v_adr)^2 (mse) or ||v1/n - v_adr/n_a||^2 (direction,
    norms of :func:`adr_direction_loss` with spec.norm_eps, spec.norm_floor)), L_ADR =
    mean_i rows_i (unweighted mse: the mean over all elements, as :func:`adr_mse_loss`).
    The one ADR term of the reference objective and of memory="lean".
    """
    if not spec.adr_target_grad:
        v_adr = v_adr.detach()
    rows = per_sample_adr(
        v1, v_adr, spec.adr_loss, spec.norm_eps, spec.norm_floor, spec.adr_target_grad
    )
    if weight is not None:
        rows = weight.detach().to(rows.dtype) * rows
        return rows, rows.mean()
    if spec.adr_loss == "mse":
        return rows, (v1 - v_adr).square().mean()
    return rows, rows.mean()


def fc_map(fc: FCSpec, delta: Tensor, active: Tensor | None = None) -> Tensor:
    """The FC map w = 1 + lambda_fc * m / (mean m + tiny) of :func:`fc_weight`, with the
    choices of ``fc`` (filter, sigma, size, cutoff, per_channel, signed, normalize,
    channel_reduce)."""
    return fc_weight(
        delta,
        lambda_fc=fc.lambda_fc,
        active=active,
        per_channel=fc.per_channel,
        signed=fc.signed,
        kind=fc.filter,
        sigma=fc.sigma,
        size=fc.size,
        cutoff=fc.cutoff,
        normalize=fc.normalize,
        channel_reduce=fc.channel_reduce,
    )


def objective(path: PathLike, spec: ObjectiveSpec, inputs: ObjectiveInputs) -> ObjectiveTerms:
    """The ReflexFlow objective L = L_FC + lambda_adr * L_ADR (docs/method.md section 5).

    inputs.v0 = v(x_t0, t0) and inputs.v1 = v(x^_t1, t1) are the two gradient-carrying
    model outputs (or inputs.v_joint, their (2B, ...) concatenation).
    delta = x^_t1 - x_t1 (or inputs.fc_delta, e.g. the velocity-space bias) drives the FC
    map w (:func:`fc_map`; fc_active (B,) bool defaults to k > 0), and
    per sample i:  fc_i  = fm_weight_i * mean(w (v0 - u0)^2)     (w^2 for form "squared")
                   adr_i = adr_weight_i * (mean (v1 - v_adr)^2  (mse)  or
                                           ||v1/|v1| - v_adr/|v_adr| ||^2  (direction))
    L_FC = mean_i fc_i, L_ADR = mean_i adr_i (:func:`fc_term`, :func:`adr_term`). The
    targets are u0 = u_t0 and v_adr = u_t1 + (s'/s)(t1) delta unless given (e.g. stable
    targets). With v1 None the ADR term is skipped; with spec.fc.lambda_fc = 0 w is None;
    with both, L is the flow-matching loss of the (v0, u0) pair (fm, ip and ss use it so)
    and delta is not computed. This is the contract of the fused kernels
    (:func:`reflexflow.kernels.fused_objective`): same inputs, outputs and gradients,
    except for the options of ``spec.reference_only`` (fc normalize "sum",
    channel_reduce "l2", adds_fm; adr_target_grad: v_adr keeps the graph of inputs.x_hat),
    which only this function implements.
    """
    v0, v1 = inputs.model_outputs()
    x1, eps, x_hat = inputs.x1, inputs.eps, inputs.x_hat
    lambda_fc = spec.fc.lambda_fc
    delta = None
    if lambda_fc != 0 or v1 is not None:
        delta = x_hat - interpolate(path, x1, eps, inputs.t1)
    u0 = inputs.u0 if inputs.u0 is not None else velocity_target(path, x1, eps, inputs.t0)
    w = active = None
    if lambda_fc != 0:
        active = (inputs.k > 0) if inputs.fc_active is None else inputs.fc_active
        w = fc_map(spec.fc, delta if inputs.fc_delta is None else inputs.fc_delta, active)
    fc_rows, fc_value = fc_term(v0, u0, w, spec.fc.form, inputs.fm_weight, spec.fc.adds_fm, active)
    if v1 is None:
        return ObjectiveTerms(loss=fc_value, fc_loss=fc_value, per_sample=fc_rows, w=w, delta=delta)
    v_adr = (
        inputs.v_adr if inputs.v_adr is not None else adr_target(path, x1, eps, x_hat, inputs.t1)
    )
    if not spec.adr_target_grad:
        v_adr = v_adr.detach()
    adr_rows, adr_value = adr_term(v1, v_adr, spec, inputs.adr_weight)
    return ObjectiveTerms(
        loss=fc_value + spec.lambda_adr * adr_value,
        fc_loss=fc_value,
        per_sample=fc_rows + spec.lambda_adr * adr_rows,  # its mean is loss up to rounding
        adr_loss=adr_value,
        w=w,
        v_adr=v_adr,
        delta=delta,
    )


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


# --- stable (posterior-weighted) targets, docs/method.md section 3 ------------------------------

__all__ += ["stable_target", "check_stable_inputs", "STABLE_S_FLOOR"]

# s(t) is floored here inside the stable target: it never divides by zero, and on every
# shipped path s(t) >= 1e-3 for t <= 1 - 1e-3, so the floor changes nothing there.
STABLE_S_FLOOR = 1e-4


def check_stable_inputs(x: Tensor, t: Tensor, ref_x1: Tensor, mask: Tensor | None) -> None:
    """Raise TypeError / ValueError unless x (B, *S), t (B,), ref_x1 (R, *S), R >= 1 and
    mask None or bool (B, R) with at least one True per row fit together."""
    for name, z in (("x", x), ("t", t), ("ref_x1", ref_x1)):
        if not isinstance(z, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {z.dtype}")
    if x.dim() < 2:
        raise ValueError(
            f"x must have shape (B, *S) with at least one data axis, got {tuple(x.shape)}"
        )
    batch = x.shape[0]
    if ref_x1.dim() != x.dim() or ref_x1.shape[1:] != x.shape[1:] or ref_x1.shape[0] < 1:
        raise ValueError(
            f"ref_x1 must have shape (R, *S) with R >= 1 and S = {tuple(x.shape[1:])} "
            f"(x's data shape), got {tuple(ref_x1.shape)}"
        )
    if t.shape != (batch,):
        raise ValueError(
            f"t must have shape ({batch},) (one time per row of x), got {tuple(t.shape)}"
        )
    if ref_x1.device != x.device or t.device != x.device:
        raise ValueError(
            f"x, t and ref_x1 must be on one device, got {x.device}, {t.device}, {ref_x1.device}"
        )
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor of shape (B, R) or None")
        if mask.shape != (batch, ref_x1.shape[0]) or mask.device != x.device:
            raise ValueError(
                f"mask must have shape ({batch}, {ref_x1.shape[0]}) on {x.device}, "
                f"got {tuple(mask.shape)} on {mask.device}"
            )
        if not bool(mask.any(dim=1).all()):  # one host sync, only when a mask is given
            raise ValueError("mask must allow at least one reference in every row")


def _stable_compute_dtype(x: Tensor, ref_x1: Tensor) -> torch.dtype:
    """float64 when x or ref_x1 is float64, else float32 (bf16 / fp16 compute in fp32)."""
    return torch.float64 if torch.float64 in (x.dtype, ref_x1.dtype) else torch.float32


@torch.no_grad()
def stable_target(
    path: PathLike,
    x: Tensor,
    t: Tensor,
    ref_x1: Tensor,
    *,
    mask: Tensor | None = None,
    s_floor: float = STABLE_S_FLOOR,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Posterior-weighted ("stable") velocity target over a reference set (Xu et al. 2023).

    For query states x_i at times t_i and references x1_j (j allowed by mask[i, j]):

        w_ij  = softmax_j( -|| x_i - a(t_i) x1_j ||^2 / (2 s_i^2) )
        x1~_i = sum_j w_ij x1_j
        v~_i  = a'(t_i) x1~_i + s'(t_i) (x_i - a(t_i) x1~_i) / s_i ,  s_i = max(s(t_i), s_floor)

    The oracle: squared distances taken literally, one query at a time (no expansion into
    inner products, so no cancellation), softmax by log-sum-exp. Computed in float64 when
    x or ref_x1 is float64, else in float32; the result has x's dtype, the weights (B, R)
    the compute dtype. No gradient flows into the result: it is a target.

    a(t) = 0 gives uniform weights; small s(t) makes them collapse onto the nearest
    reference. s_floor keeps 1 / s finite: with R = 1 (the sample's own x1 only)
    v~ = u_t on the path and v~ = v_adr at a biased state, exactly wherever s(t) >= s_floor;
    below it the residual term shrinks by s(t) / s_floor and at s(t) = 0, x = a x1 it is
    a'(t) x1~, the marginal velocity there (eps cannot be recovered from x at s = 0).
    """
    check_stable_inputs(x, t, ref_x1, mask)
    if not s_floor > 0:
        raise ValueError(f"s_floor must be > 0, got {s_floor}")
    dtype = _stable_compute_dtype(x, ref_x1)
    xf = x.detach().flatten(1).to(dtype)
    rf = ref_x1.detach().flatten(1).to(dtype)
    tt = t.detach().to(dtype)
    a, da, ds = (path.a(tt).to(dtype), path.da(tt).to(dtype), path.ds(tt).to(dtype))
    s = path.s(tt).to(dtype).clamp_min(s_floor)
    dist = torch.stack([(xf[i] - a[i] * rf).square().sum(dim=1) for i in range(xf.shape[0])])
    logits = -dist / (2 * s * s)[:, None]
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    w = torch.softmax(logits, dim=1)
    x1_tilde = w @ rf
    v = da[:, None] * x1_tilde + ds[:, None] * (xf - a[:, None] * x1_tilde) / s[:, None]
    v = v.reshape(x.shape).to(x.dtype)
    return (v, w) if return_weights else v
