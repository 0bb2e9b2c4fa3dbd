"""ReflexFlowLoss: the drop-in training loss (DESIGN.md sections 2 to 6).

One training step, canonical convention (data at t = 1):

1. draw eps, rollout lengths k (0 for the 1 - ss_prob samples not rolled out) and t0,
   with t0 + k h <= 1 - t_eps (grid) or t1 = t0 + (1 - t_eps - t0) U (single step);
2. roll x_t0 out k Euler steps of the model under torch.no_grad: x^_t1;
3. delta = x^_t1 - x_t1; FC weight w from LP(|delta|); ADR target v_adr;
4. v0 = v(x_t0, t0), v1 = v(x^_t1, t1) in one 2B call (or two calls);
5. L = mean(w ||v0 - u_t0||^2) + lambda_adr * L_ADR(v1, v_adr).

Baselines with the same API: method="fm" (plain flow matching), "ip" (input
perturbation), "ss" (scheduled sampling with the unrectified target u_t1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import reference as ref
from .batching import repeat_batch
from .config import ReflexFlowConfig
from .conventions import VelocityModel, from_canonical_time, to_canonical_time
from .engine import rollout
from .time_sampling import LogitNormalTime, UniformTime

__all__ = ["ReflexFlowLoss", "ReflexFlowOutput", "reflexflow_loss"]

_T_TOL = 1e-6  # slack for explicit times against 1 - t_eps - k h (float rounding)


@dataclasses.dataclass
class ReflexFlowOutput:
    """What one call of the loss returns.

    loss: scalar, differentiable. fc_loss / adr_loss: the two terms (detached), None
    when the method or a zero lambda skips them. bias_norm: (B,) per-sample
    ||x^_t1 - x_t1|| (None without a rollout). t0, t1: (B,) in the loss's convention;
    k: (B,) int64 rollout lengths (0 = not rolled out). fc_weight: the detached FC map w.
    """

    loss: Tensor
    fc_loss: Tensor | None
    adr_loss: Tensor | None
    bias_norm: Tensor | None
    t0: Tensor
    t1: Tensor
    k: Tensor
    fc_weight: Tensor | None = None


def _state_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_data(x1: Any, noise: Any) -> None:
    if not isinstance(x1, Tensor):
        raise TypeError(f"x1 must be a tensor, got {type(x1).__name__}")
    if not x1.is_floating_point():
        raise TypeError(f"x1 must be a floating-point tensor, got dtype {x1.dtype}")
    if x1.dim() < 2 or x1.shape[0] == 0:
        raise ValueError(
            f"x1 must have shape (B, ...) with B >= 1 and ndim >= 2, got {tuple(x1.shape)}"
        )
    if noise is not None:
        if not isinstance(noise, Tensor):
            raise TypeError(f"noise must be a tensor or None, got {type(noise).__name__}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
        if noise.shape != x1.shape:
            raise ValueError(
                f"noise must have x1's shape {tuple(x1.shape)}, got {tuple(noise.shape)}"
            )
        if noise.device != x1.device:
            raise ValueError(f"noise is on {noise.device}, x1 on {x1.device}")


def _check_finite(name: str, x: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite values (NaN or Inf)")


def _draw_k(
    cfg: ReflexFlowConfig, batch: int, device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """k_i = 0 with probability 1 - ss_prob, else K (fixed) or U{1..K} (uniform)."""
    kmax = 1 if cfg.step_schedule == "single" else cfg.rollout_steps
    rolled = torch.rand(batch, device=device, generator=generator) < cfg.ss_prob
    if cfg.k_draw == "fixed" or kmax == 1:
        lengths = torch.full((batch,), kmax, device=device, dtype=torch.int64)
    else:
        lengths = torch.randint(1, kmax + 1, (batch,), device=device, generator=generator)
    return torch.where(rolled, lengths, torch.zeros_like(lengths))


def _check_k(k: Any, cfg: ReflexFlowConfig, batch: int, device: torch.device) -> Tensor:
    if not isinstance(k, Tensor):
        raise TypeError(f"k must be an int64 tensor of shape ({batch},), got {type(k).__name__}")
    if k.dtype != torch.int64:
        raise TypeError(f"k must have dtype torch.int64, got {k.dtype}")
    if k.shape != (batch,):
        raise ValueError(f"k must have shape ({batch},), got {tuple(k.shape)}")
    if k.device != device:
        raise ValueError(f"k is on {k.device}, x1 on {device}")
    if not cfg.uses_rollout:
        if bool((k != 0).any()):
            raise ValueError(f"k must be all zeros for method={cfg.method!r} (no rollout)")
        return k
    if bool((k < 0).any()):
        raise ValueError(f"k must be >= 0, got min {int(k.min())}")
    if cfg.step_schedule == "single" and bool((k > 1).any()):
        raise ValueError("k must be 0 or 1 with step_schedule='single' (one Euler step)")
    if cfg.rollout_grad and bool((k > 1).any()):
        raise ValueError("k must be 0 or 1 with rollout_grad=True")
    if cfg.step_schedule == "grid":
        too_long = k.to(torch.float64) * cfg.step > 1 - cfg.t_eps + _T_TOL
        if bool(too_long.any()):
            i = int(too_long.nonzero()[0, 0])
            raise ValueError(
                f"k[{i}] = {int(k[i])} Euler steps of h = {cfg.step:.6g} do not fit before "
                f"t = 1 - t_eps = {1 - cfg.t_eps:.6g}"
            )
    return k


def _check_sampler_output(u: Any, batch: int, device: torch.device) -> Tensor:
    """A time sampler must return a floating (B,) tensor on x1's device, in [0, 1]."""
    if not isinstance(u, Tensor) or not u.is_floating_point():
        raise TypeError(f"time_sampler must return a floating-point tensor, got {u!r:.80}")
    if u.shape != (batch,):
        raise ValueError(f"time_sampler must return shape ({batch},), got {tuple(u.shape)}")
    if u.device != device:
        raise ValueError(f"time_sampler returned a tensor on {u.device}, x1 is on {device}")
    return u


def _check_t(t: Any, batch: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(
            f"t must be a floating-point tensor of shape ({batch},), got {type(t).__name__}"
        )
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor, got dtype {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"t is on {t.device}, x1 on {device}")


class _Draws:
    """The per-sample random quantities of one step, canonical convention.

    fixed_k: every k_i is known to equal it without reading k (k drawn with ss_prob = 1
    and a single possible length), else None.
    """

    def __init__(
        self, eps: Tensor, k: Tensor, t0: Tensor, t1: Tensor, step: Tensor, fixed_k: int | None
    ) -> None:
        self.eps, self.k, self.t0, self.t1, self.step = eps, k, t0, t1, step
        self.fixed_k = fixed_k


def _static_k(cfg: ReflexFlowConfig) -> int | None:
    """The one rollout length every drawn k_i takes, when the config pins it."""
    kmax = 1 if cfg.step_schedule == "single" else cfg.rollout_steps
    if cfg.uses_rollout and cfg.ss_prob == 1.0 and (cfg.k_draw == "fixed" or kmax == 1):
        return kmax
    return None


def _draw(
    cfg: ReflexFlowConfig,
    x1: Tensor,
    noise: Tensor | None,
    t: Tensor | None,
    k: Tensor | None,
    generator: torch.Generator | None,
) -> _Draws:
    batch, device, dtype = x1.shape[0], x1.device, _state_dtype(x1)
    eps = (
        torch.randn(x1.shape, device=device, generator=generator, dtype=dtype)
        if noise is None
        else noise.to(dtype)
    )
    fixed_k = _static_k(cfg) if k is None else None
    if k is None:
        k = (
            _draw_k(cfg, batch, device, generator)
            if cfg.uses_rollout
            else torch.zeros(batch, device=device, dtype=torch.int64)
        )
    else:
        k = _check_k(k, cfg, batch, device)
    h = cfg.step
    single = cfg.step_schedule == "single"
    room = (1 - cfg.t_eps) - (0 if single else h) * k.to(torch.float64)  # t0 <= room
    if t is None:
        u = cfg.time_sampler(batch, device, generator)
        if not isinstance(cfg.time_sampler, (UniformTime, LogitNormalTime)):
            u = _check_sampler_output(u, batch, device).to(torch.float64)
            if bool(((u < 0) | (u > 1) | u.isnan()).any()):  # one sync, user samplers only
                raise ValueError("time_sampler must return values in [0, 1]")
        t0 = to_canonical_time(u.to(torch.float64), cfg.convention) * room
    else:
        _check_t(t, batch, device)
        t0 = to_canonical_time(t.to(torch.float64), cfg.convention)
        bad = ~((t0 >= -_T_TOL) & (t0 <= room + _T_TOL))  # NaN is bad too
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"t[{i}] = {float(t[i]):.6g} ({cfg.convention}) with k[{i}] = {int(k[i])} "
                f"does not fit: canonical t0 + k h must lie in [0, 1 - t_eps = "
                f"{1 - cfg.t_eps:.6g}] with h = {h:.6g}"
            )
        t0 = t0.clamp(0, None).minimum(room)
    if single:
        frac = torch.rand(batch, device=device, generator=generator, dtype=torch.float64)
        t1 = torch.where(k > 0, t0 + (1 - cfg.t_eps - t0) * frac, t0)
        step = t1 - t0
    else:
        t1 = t0 + h * k.to(torch.float64)
        step = torch.full_like(t0, h)
    return _Draws(eps, k, t0.to(dtype), t1.to(dtype), step.to(dtype), fixed_k)


def reflexflow_loss(
    model: Callable[..., Tensor],
    x1: Tensor,
    *,
    noise: Tensor | None = None,
    t: Tensor | None = None,
    k: Tensor | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    config: ReflexFlowConfig | None = None,
    **knobs: Any,
) -> ReflexFlowOutput:
    """Functional twin of :class:`ReflexFlowLoss`: L = L_FC + lambda_adr * L_ADR.

    L_FC = mean(w * ||v(x_t0, t0) - u_t0||^2), w = 1 + lambda_fc * LP(|delta|)/mean;
    L_ADR compares v(x^_t1, t1) with v_adr = u_t1 + (s'(t1)/s(t1)) delta, by direction
    (default) or mse. ``knobs`` are the fields of :class:`ReflexFlowConfig` (or pass
    ``config``). model is called as ``model(x, t, **model_kwargs)`` in the loss's
    convention; t (rollout start times) and k (int64 rollout lengths) may be given.
    """
    cfg = config if config is not None else ReflexFlowConfig(**knobs)
    if config is not None and knobs:
        cfg = cfg.replace(**knobs)
    _check_data(x1, noise)
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")
    if generator is not None and generator.device.type != x1.device.type:
        raise ValueError(f"generator is on {generator.device}, x1 on {x1.device}")
    if cfg.check_finite:
        _check_finite("x1", x1)
        if noise is not None:
            _check_finite("noise", noise)

    dtype = _state_dtype(x1)
    d = _draw(cfg, x1, noise, t, k, generator)
    path = cfg.path
    data = x1.to(dtype)
    velocity = VelocityModel(
        model, cfg.convention, input_dtype=x1.dtype, timestep_scale=cfg.timestep_scale
    )
    x_t0 = ref.interpolate(path, data, d.eps, d.t0)
    out = _method_loss(cfg, velocity, data, d, x_t0, model_kwargs, generator)
    if cfg.check_finite:
        _check_finite("loss", out["loss"])
    return ReflexFlowOutput(
        loss=out["loss"],
        fc_loss=_detach(out.get("fc_loss")),
        adr_loss=_detach(out.get("adr_loss")),
        bias_norm=_detach(out.get("bias_norm")),
        t0=from_canonical_time(d.t0, cfg.convention),
        t1=from_canonical_time(d.t1, cfg.convention),
        k=d.k,
        fc_weight=_detach(out.get("w")),
    )


def _detach(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach()


def _method_loss(
    cfg: ReflexFlowConfig,
    velocity: VelocityModel,
    data: Tensor,
    d: _Draws,
    x_t0: Tensor,
    kwargs: Any,
    generator: torch.Generator | None,
) -> dict:
    path, batch = cfg.path, data.shape[0]
    u0 = ref.velocity_target(path, data, d.eps, d.t0)
    if cfg.method == "fm":
        return {"loss": ref.fm_loss(velocity(x_t0, d.t0, kwargs), u0)}
    if cfg.method == "ip":
        xi = torch.randn(data.shape, device=data.device, generator=generator, dtype=data.dtype)
        x_in = x_t0 + cfg.ip_gamma * ref.bcast(path.s(d.t0), data) * xi
        return {"loss": ref.fm_loss(velocity(x_in, d.t0, kwargs), u0)}

    need_adr = cfg.method == "ss" or cfg.lambda_adr != 0
    need_fc = cfg.method == "reflexflow" and cfg.lambda_fc != 0
    if not (need_adr or need_fc):  # lambda_adr = lambda_fc = 0: plain FM at t0
        loss = ref.fm_loss(velocity(x_t0, d.t0, kwargs), u0)
        return {"loss": loss, "fc_loss": loss}

    v0 = None
    if cfg.rollout_grad:  # one Euler step whose output keeps its graph
        v0 = velocity(x_t0, d.t0, kwargs)
        x_hat = x_t0 + ref.bcast(d.step * (d.k > 0).to(d.step.dtype), x_t0) * v0
    else:
        x_hat = rollout(
            velocity,
            x_t0,
            d.t0,
            d.k,
            d.step,
            kwargs,
            backend=cfg.backend,
            cuda_graph=cfg.cuda_graph,
            fixed_k=d.fixed_k,
        )
    x_t1 = ref.interpolate(path, data, d.eps, d.t1)
    delta = (x_hat - x_t1).detach()
    bias_norm = delta.flatten(1).norm(dim=1)

    if cfg.method == "ss":
        v1 = velocity(x_hat, d.t1, kwargs)
        u1 = ref.velocity_target(path, data, d.eps, d.t1)
        return {"loss": ref.fm_loss(v1, u1), "bias_norm": bias_norm}

    v1 = None
    if v0 is None and need_adr and cfg.joint_forward:
        v = velocity(
            torch.cat([x_t0, x_hat]), torch.cat([d.t0, d.t1]), repeat_batch(kwargs, batch, 2)
        )
        v0, v1 = v[:batch], v[batch:]
    else:
        if v0 is None:
            v0 = velocity(x_t0, d.t0, kwargs)
        if need_adr:
            v1 = velocity(x_hat, d.t1, kwargs)

    fc_delta = None
    if need_fc and cfg.fc_source == "velocity":
        with torch.no_grad():
            v_clean = velocity(x_t1, d.t1, kwargs)
            v_biased = v1.detach() if v1 is not None else velocity(x_hat, d.t1, kwargs)
            fc_delta = v_clean - v_biased
    active = d.k > 0
    if cfg.fc_t_max is not None:
        active = active & (d.t0 < cfg.fc_t_max)

    # The model may run under torch.autocast; the loss's own math must not (the FC
    # filter's conv would run in bf16/fp16): w, v_adr and the loss stay in the state dtype.
    with torch.autocast(data.device.type, enabled=False):
        terms = _objective_fn(cfg, data)(
            path,
            v0=v0,
            v1=v1,
            x1=data,
            eps=d.eps,
            x_hat=x_hat.detach(),
            t0=d.t0,
            t1=d.t1,
            k=d.k,
            lambda_adr=cfg.lambda_adr,
            lambda_fc=cfg.lambda_fc,
            adr_loss=cfg.adr_loss,
            fc_active=active,
            fc_delta=fc_delta,
            per_channel=cfg.fc_per_channel,
            fc_filter=cfg.fc_filter,
            fc_sigma=cfg.fc_sigma,
            fc_size=cfg.fc_size,
            fc_cutoff=cfg.fc_cutoff,
            norm_eps=cfg.norm_eps,
            norm_floor=cfg.norm_floor,
        )
    terms["bias_norm"] = bias_norm
    return terms


def _objective_fn(cfg: ReflexFlowConfig, data: Tensor) -> Callable[..., dict]:
    """reference.objective, or its Triton twin kernels.fused_objective (DESIGN.md section 5).

    backend="triton" forces the kernels (CUDA, or CPU under TRITON_INTERPRET=1); "auto"
    takes them for CUDA float32/16 data that needs no gradient when triton imports, and
    falls back to the reference (one warning) if they fail to compile or launch.
    """
    if cfg.backend == "torch":
        return ref.objective
    from . import kernels

    if cfg.backend == "triton":
        if not kernels.triton_usable(data.device.type):
            raise ValueError(
                f"backend='triton' cannot run on {data.device.type} tensors here: it needs "
                "the triton package and a CUDA device (or TRITON_INTERPRET=1 set before "
                "triton is imported, for Triton's CPU interpreter)"
            )
        return kernels.fused_objective
    fast = (
        data.device.type == "cuda"
        and data.dtype != torch.float64
        and not data.requires_grad
        and kernels.triton_available()
    )
    return kernels.fused_objective_auto if fast else ref.objective


class ReflexFlowLoss(nn.Module):
    """ReflexFlow training loss as an nn.Module (see :func:`reflexflow_loss`).

    Construct with the knobs of :class:`ReflexFlowConfig`, e.g.
    ``ReflexFlowLoss(path="linear", rollout_steps=2, num_sampling_steps=50)``; call as
    ``loss_fn(model, x1, model_kwargs={"y": labels}).loss.backward()``.
    """

    def __init__(self, **knobs: Any) -> None:
        super().__init__()
        self.config = ReflexFlowConfig(**knobs)

    def forward(
        self,
        model: Callable[..., Tensor],
        x1: Tensor,
        *,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        k: Tensor | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> ReflexFlowOutput:
        return reflexflow_loss(
            model,
            x1,
            noise=noise,
            t=t,
            k=k,
            model_kwargs=model_kwargs,
            generator=generator,
            config=self.config,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"method={c.method!r}, path={c.path!r}, convention={c.convention!r}, "
            f"K={c.rollout_steps}, N={c.num_sampling_steps}, adr_loss={c.adr_loss!r}, "
            f"lambda_adr={c.lambda_adr}, lambda_fc={c.lambda_fc}"
        )
