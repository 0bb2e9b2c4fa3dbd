"""ReflexFlowLoss: the drop-in training loss (docs/method.md).

One training step, canonical convention (data at t = 1):

1. draw eps, rollout lengths k (0 for samples not rolled out) and t0 (:mod:`.draws`);
2. v0 = v(x_t0, t0) with grad (the FM term's call, shared with the rollout's first step
   by default); the rollout continues under torch.no_grad to x^_t1 (:mod:`.engine`);
3. delta = x^_t1 - x_t1 (or the velocity-space bias); FC weight w; ADR target v_adr
   (conditional, or posterior-weighted with target="stable");
4. v1 = v(x^_t1, t1) with grad;
5. L = mean_i fm_weight_i mean(w ||v0 - u_t0||^2) + lambda_adr * L_ADR(v1, v_adr)
   (:func:`reflexflow.reference.objective`, or its Triton twin).

What each preset sets is data (:mod:`.presets`); this module only combines the terms.
Baselines with the same API: method="fm" (plain flow matching), "ip" (input
perturbation), "ss" (scheduled sampling with the unrectified target u_t1).
memory="lean" runs the FM term's backward before the ADR term's forward
(:meth:`ReflexFlowOutput.backward`), so the step's peak activation memory is FM's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import reference as ref
from .batching import prepare_kwargs, repeat_batch
from .config import ReflexFlowConfig
from .conventions import VelocityModel, from_canonical_time
from .draws import Draws, draw, state_dtype
from .engine import rollout
from .model_state import ddp_no_sync, fsdp2_sync, is_fsdp1, mode_sensitive
from .weighting import loss_weights

__all__ = ["ReflexFlowLoss", "ReflexFlowOutput", "reflexflow_loss"]


class ReflexFlowOutput:
    """What one call of the loss returns.

    loss: scalar, differentiable. fc_loss / adr_loss: the two terms (detached), None when
    the method or a zero lambda skips them. per_sample_loss: (B,), differentiable, its
    mean is ``loss`` (up to float rounding; with memory="lean" it is filled, detached, by
    ``backward()``). bias_norm: (B,) per-sample ||x^_t1 - x_t1|| (None
    without a rollout). t0, t1: (B,) in the loss's convention; k: (B,) int64 rollout
    lengths (0 = not rolled out). fc_weight: the detached FC map w.

    ``out.backward()`` backpropagates the step (``scaler=`` a torch.amp.GradScaler,
    ``loss_scale=`` e.g. 1 / accumulation steps); with memory="lean" it is the way to
    backpropagate, and it fills ``loss``, ``adr_loss`` and ``per_sample_loss``.
    """

    def __init__(
        self,
        *,
        loss: Tensor | None,
        fc_loss: Tensor | None,
        adr_loss: Tensor | None,
        bias_norm: Tensor | None,
        t0: Tensor,
        t1: Tensor,
        k: Tensor,
        fc_weight: Tensor | None = None,
        per_sample_loss: Tensor | None = None,
        lean: _LeanStep | None = None,
    ) -> None:
        self._loss = loss
        self.fc_loss, self.adr_loss, self.bias_norm = fc_loss, adr_loss, bias_norm
        self.t0, self.t1, self.k = t0, t1, k
        self.fc_weight, self.per_sample_loss = fc_weight, per_sample_loss
        self._lean, self._lean_done = lean, False

    @property
    def loss(self) -> Tensor:
        if self._loss is None:
            raise RuntimeError(
                "memory='lean': the ADR term's forward runs inside out.backward(); call "
                "out.backward() (not out.loss.backward()); out.loss holds the value after it"
            )
        return self._loss

    def backward(self, scaler: Any = None, *, loss_scale: float | Tensor = 1.0) -> None:
        """Backpropagate ``loss_scale * loss`` (through ``scaler.scale`` when given).

        Default mode: ``(scaler.scale(loss * loss_scale)).backward()``. memory="lean":
        the FM term's backward (no gradient sync under DDP/FSDP2), then the ADR term's
        forward and backward (the gradient sync), each part scaled alike.
        """
        if self._lean_done:
            raise RuntimeError("out.backward() was already called for this lean step")
        if self._lean is None:
            _scaled(self.loss, scaler, loss_scale).backward()
            return
        lean, self._lean, self._lean_done = self._lean, None, True
        adr_rows = lean.backward(lambda x: _scaled(x, scaler, loss_scale))
        self.adr_loss = lean.adr_value.detach()
        self.per_sample_loss = (lean.fc_rows + lean.lambda_adr * adr_rows).detach()
        self._loss = (lean.fc_value + lean.lambda_adr * lean.adr_value).detach()

    def __repr__(self) -> str:
        value = "pending (memory='lean')" if self._loss is None else f"{float(self._loss):.6g}"
        return f"ReflexFlowOutput(loss={value}, k={self.k.tolist()})"


def _scaled(x: Tensor, scaler: Any, loss_scale: float | Tensor) -> Tensor:
    if not (isinstance(loss_scale, (int, float)) and loss_scale == 1):
        x = x * loss_scale
    return scaler.scale(x) if scaler is not None else x


class _LeanStep:
    """The deferred half of a memory="lean" step: the FM term's graph (kept) and what the
    ADR term's forward needs (state, times, kwargs, target, autocast state)."""

    def __init__(
        self,
        *,
        model: Any,
        velocity: VelocityModel,
        fm_loss: Tensor,
        fc_rows: Tensor,
        x_hat: Tensor,
        t1: Tensor,
        kwargs: Any,
        v_adr: Tensor,
        adr_weight: Tensor | None,
        cfg: ReflexFlowConfig,
    ) -> None:
        self.model, self.velocity = model, velocity
        self.fm_loss, self.fc_rows, self.fc_value = fm_loss, fc_rows.detach(), fm_loss.detach()
        self.x_hat, self.t1, self.kwargs, self.v_adr = x_hat, t1, kwargs, v_adr
        self.adr_weight, self.cfg = adr_weight, cfg
        self.lambda_adr = cfg.lambda_adr
        device = x_hat.device.type
        self.autocast = (
            device,
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
        )
        self.adr_value: Tensor = fm_loss.new_zeros(())

    def backward(self, scale: Callable[[Tensor], Tensor]) -> Tensor:
        """FM backward (sync off), then ADR forward + backward (sync on); ADR rows."""
        with fsdp2_sync(self.model, False):
            scale(self.fm_loss).backward()
        self.fm_loss = None  # the FM graph is freed before the ADR forward
        device, enabled, dtype = self.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            v1 = self.velocity(self.x_hat, self.t1, self.kwargs)
        with torch.autocast(device, enabled=False):
            cfg = self.cfg
            rows = ref.per_sample_adr(v1, self.v_adr, cfg.adr_loss, cfg.norm_eps, cfg.norm_floor)
            if self.adr_weight is not None:
                rows = self.adr_weight.to(rows.dtype) * rows
            adr = rows.mean()
        scale(self.lambda_adr * adr).backward()
        self.adr_value = adr.detach()
        return rows.detach()


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
    stable_bank: Any = None,
    **knobs: Any,
) -> ReflexFlowOutput:
    """Functional twin of :class:`ReflexFlowLoss`: L = L_FC + lambda_adr * L_ADR.

    L_FC = mean_i fm_weight_i mean(w (v(x_t0, t0) - u_t0)^2), w = 1 + lambda_fc *
    LP(|delta|)/mean; L_ADR compares v(x^_t1, t1) with v_adr = u_t1 + (s'(t1)/s(t1))
    delta (mse or direction). ``knobs`` are the fields of :class:`ReflexFlowConfig`
    (``preset=`` and any override; or pass ``config``). model is called as
    ``model(x, t, **model_kwargs)`` in the loss's convention; t (start times) and k (int64
    rollout lengths) may be given. ``stable_bank``: a
    :class:`reflexflow.stable.StableReferenceBank` for target="stable" (else the batch).
    """
    cfg = config if config is not None else ReflexFlowConfig(**knobs)
    if config is not None and knobs:
        cfg = cfg.replace(**knobs)
    _check_data(x1, noise)
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")
    if generator is not None and generator.device.type != x1.device.type:
        raise ValueError(f"generator is on {generator.device}, x1 on {x1.device}")
    if cfg.target == "stable" and stable_bank is None and (cfg.stable_ref or cfg.stable_gather):
        raise ValueError(
            "stable_ref > 0 or stable_gather=True needs a reference bank across steps: use "
            "ReflexFlowLoss (it keeps one) or pass stable_bank=StableReferenceBank(...)"
        )
    if cfg.memory == "lean" and is_fsdp1(model):
        raise ValueError(
            "memory='lean' does not support FSDP1 (FullyShardedDataParallel): its no_sync "
            "keeps unsharded gradients; use FSDP2 fully_shard, or memory='default'"
        )
    if cfg.check_finite:
        _check_finite("x1", x1)
        if noise is not None:
            _check_finite("noise", noise)
    kwargs = prepare_kwargs(model_kwargs, x1.shape[0], cfg.unbatched_kwargs)

    dtype = state_dtype(x1)
    d = draw(cfg, x1, noise, t, k, generator)
    data = x1.to(dtype)
    velocity = VelocityModel(
        model, cfg.convention, input_dtype=x1.dtype, timestep_scale=cfg.timestep_scale
    )
    step = _Step(cfg, model, velocity, data, d, kwargs, generator, stable_bank)
    out = _fm_like(step) if not cfg.rolls_out else _rolled_out(step)
    if stable_bank is not None and cfg.target == "stable" and torch.is_grad_enabled():
        # after this step's reference(); a validation pass (no grad) leaves the bank alone
        stable_bank.update(data)
    if cfg.check_finite and out.get("loss") is not None:
        _check_finite("loss", out["loss"])
    return ReflexFlowOutput(
        loss=out.get("loss"),
        fc_loss=_detach(out.get("fc_loss")),
        adr_loss=_detach(out.get("adr_loss")),
        bias_norm=_detach(out.get("bias_norm")),
        t0=from_canonical_time(d.t0, cfg.convention),
        t1=from_canonical_time(d.t1, cfg.convention),
        k=d.k,
        fc_weight=_detach(out.get("w")),
        per_sample_loss=out.get("per_sample"),
        lean=out.get("lean"),
    )


def _detach(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach()


class _Step:
    """One call of the loss: the draws, the model calls and the terms they feed."""

    def __init__(
        self,
        cfg: ReflexFlowConfig,
        model: Any,
        velocity: VelocityModel,
        data: Tensor,
        d: Draws,
        kwargs: Any,
        generator: torch.Generator | None,
        stable_bank: Any,
    ) -> None:
        self.cfg, self.model, self.velocity = cfg, model, velocity
        self.data, self.d, self.kwargs, self.generator = data, d, kwargs, generator
        self.path, self.batch = cfg.path, data.shape[0]
        self.x_t0 = ref.interpolate(self.path, data, d.eps, d.t0)
        # lean defers an ADR term: only then does the FM forward skip the gradient sync
        self.lean = (
            cfg.memory == "lean"
            and cfg.method == "reflexflow"
            and cfg.lambda_adr != 0
            and torch.is_grad_enabled()
        )
        self.reference_cache: Tensor | None = None
        self._stable_bank = stable_bank


# -- targets and weights ------------------------------------------------------------


def _reference_set(st: _Step) -> Tensor:
    """The stable target's reference set: the bank's (batch + recent) or the batch."""
    if st.reference_cache is None:
        bank = st._stable_bank
        st.reference_cache = st.data if bank is None else bank.reference(st.data)
    return st.reference_cache


def _stable(st: _Step, x: Tensor, t: Tensor) -> Tensor:
    """Posterior-weighted velocity target at (x, t) over the reference set."""
    from .stable import stable_target

    return stable_target(st.path, x.detach(), t, _reference_set(st))


def _weights(st: _Step, t: Tensor) -> Tensor | None:
    """Per-sample loss weights at times t, in the state dtype (None: no weighting)."""
    w = loss_weights(st.cfg.loss_weighting, t, st.cfg.convention)
    return None if w is None else w.to(st.data.dtype)


# -- methods without a rollout ---------------------------------------------------


def _fm_like(st: _Step) -> dict:
    """fm: v(x_t0, t0) against u_t0 (or the stable target); ip: the input perturbed."""
    cfg, d, x_in = st.cfg, st.d, st.x_t0
    if cfg.method == "ip":
        xi = torch.randn(
            st.data.shape,
            device=st.data.device,
            generator=st.generator,
            dtype=st.data.dtype,
        )
        x_in = st.x_t0 + cfg.ip_gamma * ref.bcast(st.path.s(d.t0), st.data) * xi
    u0 = (
        _stable(st, st.x_t0, d.t0)
        if cfg.target == "stable"
        else ref.velocity_target(st.path, st.data, d.eps, d.t0)
    )
    v0 = st.velocity(x_in, d.t0, st.kwargs)
    return _single_term(v0, u0, _weights(st, d.t0))


def _single_term(v: Tensor, u: Tensor, weight: Tensor | None) -> dict:
    """One FM-type term (fm, ip, ss): the loss of :func:`reference.fm_loss` and its
    per-sample rows, from one squared error."""
    with torch.autocast(v.device.type, enabled=False):
        sq = (v - u).square()
        rows = ref.per_sample_mean(sq)
        if weight is None:
            loss = sq.mean()
        else:
            rows = weight.to(rows.dtype) * rows
            loss = rows.mean()
    return {"loss": loss, "fc_loss": loss, "per_sample": rows}


# -- methods with a rollout ------------------------------------------------------


def _rollout_state(st: _Step) -> tuple[Tensor, Tensor | None]:
    """x^_t1, and v0 = v(x_t0, t0) with its graph when the first call is shared (or
    carries the ADR gradient with rollout_grad)."""
    cfg, d, x_t0 = st.cfg, st.d, st.x_t0
    rolled = ref.bcast(d.k > 0, x_t0).bool()
    if cfg.rollout_grad:  # one Euler step whose output keeps its graph
        v0 = st.velocity(x_t0, d.t0, st.kwargs)
        return torch.where(rolled, x_t0 + ref.bcast(d.step, x_t0) * v0, x_t0), v0
    if not cfg.shares_first_call:
        return _rollout(st, x_t0, d.t0, d.k, d.fixed_k), None
    with ddp_no_sync(st.model) if st.lean else contextlib.nullcontext():
        v0 = st.velocity(x_t0, d.t0, st.kwargs)
    x_first = torch.where(rolled, x_t0 + ref.bcast(d.step, x_t0) * v0.detach(), x_t0)
    if cfg.max_rollout_steps == 1:
        return x_first, v0
    rest = (d.k - 1).clamp_min(0)
    fixed = None if d.fixed_k is None else d.fixed_k - 1
    return _rollout(st, x_first, d.t0 + d.step, rest, fixed), v0


def _rollout(st: _Step, x: Tensor, t: Tensor, k: Tensor, fixed_k: int | None) -> Tensor:
    cfg = st.cfg
    return rollout(
        st.velocity.with_mode(cfg.rollout_mode),
        x,
        t,
        k,
        st.d.step,
        st.kwargs,
        backend=cfg.backend,
        cuda_graph=cfg.cuda_graph,
        fixed_k=fixed_k,
    )


class _Calls:
    """The gradient-carrying model outputs of one step (see :func:`_gradient_calls`).

    v0: v(x_t0, t0) for the FM term (v1 itself with fm_input "biased"); v1: v(x^_t1, t1)
    for the ADR term (None when lambda_adr = 0 or deferred by memory="lean"); v_joint:
    both as one (2B, ...) output (joint_forward); deferred: the ADR call waits for
    ``out.backward()``.
    """

    def __init__(self, v0=None, v1=None, v_joint=None, deferred=False) -> None:
        self.v0, self.v1, self.v_joint, self.deferred = v0, v1, v_joint, deferred

    def biased_output(self, batch: int) -> Tensor | None:
        """v(x^_t1, t1) when a gradient call already computed it (detached), else None."""
        if self.v1 is not None:
            return self.v1.detach()
        return None if self.v_joint is None else self.v_joint[batch:].detach()


def _gradient_calls(st: _Step, x_hat: Tensor, v0: Tensor | None) -> _Calls:
    """The FM and ADR terms' model calls: shared/separate, joint 2B, or one biased call."""
    cfg, d = st.cfg, st.d
    if cfg.fm_input == "biased":  # FM and ADR on the same prediction at the biased input
        v1 = st.velocity(x_hat, d.t1, st.kwargs)
        return _Calls(v0=v1, v1=v1)
    if cfg.joint_call:
        return _Calls(
            v_joint=st.velocity(
                torch.cat([st.x_t0, x_hat]),
                torch.cat([d.t0, d.t1]),
                repeat_batch(st.kwargs, st.batch, 2),
            )
        )
    if v0 is None:
        with ddp_no_sync(st.model) if st.lean else contextlib.nullcontext():
            v0 = st.velocity(st.x_t0, d.t0, st.kwargs)
    if cfg.lambda_adr == 0:
        return _Calls(v0=v0)
    if st.lean:
        return _Calls(v0=v0, deferred=True)
    return _Calls(v0=v0, v1=st.velocity(x_hat, d.t1, st.kwargs))


def _velocity_bias(st: _Step, x_hat: Tensor, x_t1: Tensor, calls: _Calls) -> Tensor:
    """v(x^_t1, t1) - v(x_t1, t1) without gradient: the velocity-space bias of FC.

    Both calls run in ``rollout_mode`` (they measure inference, and must not update
    BatchNorm statistics). The ADR call's own output v(x^_t1, t1) is reused for the
    biased side when the model computes the same in both modes (no dropout or batch norm
    in training mode), else the biased side costs one more no-grad forward.
    """
    velocity = st.velocity.with_mode(st.cfg.rollout_mode)
    with torch.no_grad():
        clean = velocity(x_t1, st.d.t1, st.kwargs)
        biased = calls.biased_output(st.batch)
        if biased is None or (st.cfg.rollout_mode == "eval" and mode_sensitive(st.model)):
            biased = velocity(x_hat, st.d.t1, st.kwargs)
        return biased - clean


def _fc_active(st: _Step) -> Tensor:
    """Rows whose FC weight is not 1: rolled out, and below fc_t_max when it is set."""
    active = st.d.k > 0
    if st.cfg.fc_t_max is not None:
        active = active & (st.d.t0 < st.cfg.fc_t_max)
    return active


def _rolled_out(st: _Step) -> dict:
    """ss and reflexflow: the rollout, the gradient calls, the targets and the objective."""
    cfg, d, data, path = st.cfg, st.d, st.data, st.path
    x_hat, v0 = _rollout_state(st)
    x_t1 = ref.interpolate(path, data, d.eps, d.t1)
    bias_norm = (x_hat - x_t1).detach().flatten(1).norm(dim=1)
    stable = cfg.target == "stable"

    if cfg.method == "ss":  # the unrectified target: u_t1, or the stable target at x_t1
        v1 = st.velocity(x_hat, d.t1, st.kwargs)
        u1 = _stable(st, x_t1, d.t1) if stable else ref.velocity_target(path, data, d.eps, d.t1)
        return {**_single_term(v1, u1, _weights(st, d.t1)), "bias_norm": bias_norm}

    calls = _gradient_calls(st, x_hat, v0)
    need_adr = cfg.lambda_adr != 0
    fc_delta = None
    if cfg.lambda_fc != 0 and cfg.fc_source == "velocity":
        fc_delta = _velocity_bias(st, x_hat, x_t1, calls)
    biased = cfg.fm_input == "biased"
    t_fm, x_fm = (d.t1, x_hat) if biased else (d.t0, st.x_t0)
    v_adr = _stable(st, x_hat, d.t1) if stable and need_adr else None
    u_fm = None
    if stable:  # with fm_input "biased" both terms' targets are v~(x^_t1, t1)
        u_fm = v_adr if biased and v_adr is not None else _stable(st, x_fm, t_fm)
    if calls.deferred and v_adr is None:
        v_adr = ref.adr_target(path, data, d.eps, x_hat.detach(), d.t1)
    adr_weight = _weights(st, d.t1) if cfg.weight_adr and need_adr else None
    knobs = dict(
        x1=data,
        eps=d.eps,
        x_hat=x_hat.detach(),
        t0=t_fm,
        t1=d.t1,
        k=d.k,
        lambda_adr=cfg.lambda_adr,
        lambda_fc=cfg.lambda_fc,
        adr_loss=cfg.adr_loss,
        fc_active=_fc_active(st),
        fc_delta=fc_delta,
        per_channel=cfg.fc_per_channel,
        fc_signed=cfg.fc_signed,
        fc_form=cfg.fc_form,
        fc_filter=cfg.fc_filter,
        fc_sigma=cfg.fc_sigma,
        fc_size=cfg.fc_size,
        fc_cutoff=cfg.fc_cutoff,
        fm_weight=_weights(st, t_fm),
        adr_weight=None if calls.deferred else adr_weight,
        u0=u_fm,
        v_adr=None if calls.deferred else v_adr,
        norm_eps=cfg.norm_eps,
        norm_floor=cfg.norm_floor,
    )
    if calls.v_joint is not None:
        knobs["v_joint"] = calls.v_joint
    else:
        knobs["v0"], knobs["v1"] = calls.v0, calls.v1
    # The model may run under torch.autocast; the loss's own math must not (the FC
    # filter's conv would run in bf16/fp16): w, v_adr and the loss stay in the state dtype.
    with torch.autocast(data.device.type, enabled=False):
        terms = _objective_fn(cfg, data, knobs)(path, **knobs)
    terms["bias_norm"] = bias_norm
    if calls.deferred:
        terms["lean"] = _LeanStep(
            model=st.model,
            velocity=st.velocity,
            fm_loss=terms["loss"],
            fc_rows=terms["per_sample"],
            x_hat=x_hat.detach(),
            t1=d.t1,
            kwargs=st.kwargs,
            v_adr=v_adr,
            adr_weight=adr_weight,
            cfg=cfg,
        )
        terms["loss"] = terms["per_sample"] = terms["adr_loss"] = None
    return terms


def _objective_fn(
    cfg: ReflexFlowConfig, data: Tensor, knobs: dict | None = None
) -> Callable[..., dict]:
    """reference.objective, or its Triton twin kernels.fused_objective (docs/method.md).

    backend="triton" forces the kernels (CUDA, or CPU under TRITON_INTERPRET=1); "auto"
    takes them for CUDA data when triton imports, and falls back to the reference (one
    warning) if they fail to compile or launch. Arguments the kernels do not cover
    (``kernels.supports(**knobs)`` False: float64, inputs that need a gradient) run on
    the reference.
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
        if knobs is not None and not kernels.supports(**knobs):
            return ref.objective
        return kernels.fused_objective
    fast = (
        data.device.type == "cuda"
        and kernels.triton_available()
        and (knobs is None or kernels.supports(**knobs))
    )
    if not fast:
        return ref.objective
    # MERGE ADAPTER (kernels branch): backend="auto" is fused_objective(fail_soft=True)
    return lambda path, **knobs: kernels.fused_objective(path, fail_soft=True, **knobs)


class ReflexFlowLoss(nn.Module):
    """ReflexFlow training loss as an nn.Module (see :func:`reflexflow_loss`).

    Construct with a preset and any knob of :class:`ReflexFlowConfig`, e.g.
    ``ReflexFlowLoss()`` (preset "defar"), ``ReflexFlowLoss(preset="arioso",
    lambda_adr=0.5)``; call as ``loss_fn(model, x1, model_kwargs={"y": labels})`` and
    backpropagate ``out.loss`` (or call ``out.backward()``, required with memory="lean").
    With target="stable" and stable_ref > 0 (or stable_gather) the module keeps the
    reference bank of recent batches.
    """

    def __init__(self, **knobs: Any) -> None:
        super().__init__()
        self.config = ReflexFlowConfig(**knobs)
        cfg = self.config
        self.stable_bank = None
        if cfg.target == "stable" and (cfg.stable_ref > 0 or cfg.stable_gather):
            from .stable import StableReferenceBank

            self.stable_bank = StableReferenceBank(cfg.stable_ref, gather=cfg.stable_gather)

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
            stable_bank=self.stable_bank,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"preset={c.preset!r}, method={c.method!r}, path={c.path!r}, "
            f"convention={c.convention!r}, K={c.rollout_steps}, N={c.num_sampling_steps}, "
            f"adr_loss={c.adr_loss!r}, lambda_adr={c.lambda_adr}, lambda_fc={c.lambda_fc}"
        )
