"""ReflexFlowLoss: the drop-in training loss (docs/method.md).

One training step, canonical convention (data at t = 1), as typed stages
(:mod:`.stages`, :mod:`.targets`):

1. validate the inputs; draw eps, rollout lengths k (0 for samples not rolled out) and
   t0 (:mod:`.draws`);
2. rollout state: x_t0, and x^_t1 by the no-grad rollout (:mod:`.engine`), whose first
   call v0 = v(x_t0, t0) keeps its graph for the FM term by default;
3. the gradient-carrying calls: v0 and v1 = v(x^_t1, t1) (or one joint 2B call);
4. targets: u_t0 and v_adr = u_t1 + (s'/s)(t1) delta (conditional, or posterior-weighted
   with target="stable"), the velocity-space bias for FC, the loss weights;
5. the objective L = mean_i fm_weight_i mean(w ||v0 - u_t0||^2) + lambda_adr * L_ADR
   (:func:`reflexflow.reference.objective`, or its Triton twin);
6. the output (:class:`ReflexFlowOutput`).

What each preset sets is data (:mod:`.presets`). Baselines with the same API: method="fm"
(plain flow matching), "ip" (input perturbation), "ss" (scheduled sampling with the
unrectified target u_t1): the same objective with lambda_adr = lambda_fc = 0 on their own
(v, u) pair. memory="lean" runs the FM term's backward before the ADR term's forward
(:mod:`.lean`), so the step's peak activation memory is FM's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import finite
from .config import ReflexFlowConfig
from .conventions import from_canonical_time
from .draws import Draws, draw
from .engine import RolloutEngine
from .finite import check_stage
from .lean import LeanStep
from .objective import ObjectiveTerms
from .stages import (
    GradientCalls,
    RolloutState,
    StepContext,
    gradient_calls,
    objective_terms,
    rollout_state,
    step_context,
    validate,
)
from .targets import Targets, term_targets

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
        lean: LeanStep | None = None,
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
        done = lean.backward(lambda x: _scaled(x, scaler, loss_scale))
        self._loss, self.adr_loss, self.per_sample_loss = done
        if lean.check_finite:
            check_stage("loss", loss=done.loss)
        else:
            finite.WATCH.arm(done.loss)
        finite.WATCH.poll()

    def __repr__(self) -> str:
        value = "pending (memory='lean')" if self._loss is None else f"{float(self._loss):.6g}"
        return f"ReflexFlowOutput(loss={value}, k={self.k.tolist()})"


def _scaled(x: Tensor, scaler: Any, loss_scale: float | Tensor) -> Tensor:
    if not (isinstance(loss_scale, (int, float)) and loss_scale == 1):
        x = x * loss_scale
    return scaler.scale(x) if scaler is not None else x


def reflexflow_loss(
    model: Callable[..., Tensor],
    x1: Tensor,
    *,
    noise: Tensor | None = None,
    t: Tensor | None = None,
    k: Tensor | None = None,
    t1: Tensor | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    config: ReflexFlowConfig | None = None,
    stable_bank: Any = None,
    engine: RolloutEngine | None = None,
    **knobs: Any,
) -> ReflexFlowOutput:
    """Functional twin of :class:`ReflexFlowLoss`: L = L_FC + lambda_adr * L_ADR.

    L_FC = mean_i fm_weight_i mean(w (v(x_t0, t0) - u_t0)^2), w = 1 + lambda_fc *
    LP(|delta|)/mean; L_ADR compares v(x^_t1, t1) with v_adr = u_t1 + (s'(t1)/s(t1))
    delta (mse or direction). ``knobs`` are the fields of :class:`ReflexFlowConfig`
    (``preset=`` and any override; or pass ``config``). model is called as
    ``model(x, t, **model_kwargs)`` in the loss's convention; t (start times), k (int64
    rollout lengths) and t1 (end times: single-step schedule, biased_input "renoise")
    may be given. ``stable_bank``: a
    :class:`reflexflow.stable.StableReferenceBank` for target="stable" (else the batch).
    ``engine``: the :class:`reflexflow.engine.RolloutEngine` that runs the rollout (and
    holds its CUDA graphs); default a fresh one per call (``ReflexFlowLoss`` keeps one).
    """
    cfg = config if config is not None else ReflexFlowConfig(**knobs)
    if config is not None and knobs:
        cfg = cfg.replace(**knobs)
    validate(cfg, model, x1, noise, model_kwargs, generator, stable_bank)
    ctx = step_context(cfg, model, x1, model_kwargs, generator, stable_bank, engine)
    d = draw(cfg, x1, noise, t, k, generator, t1)
    state = rollout_state(ctx, d)
    calls = gradient_calls(ctx, d, state)
    targets = term_targets(ctx, d, state, calls)
    terms = objective_terms(ctx, d, state, calls, targets)
    if stable_bank is not None and cfg.target == "stable" and torch.is_grad_enabled():
        # after this step's reference(); a validation pass (no grad) leaves the bank alone
        stable_bank.update(ctx.data)
    return _output(ctx, d, state, calls, targets, terms)


def _output(
    ctx: StepContext,
    d: Draws,
    state: RolloutState,
    calls: GradientCalls,
    targets: Targets,
    terms: ObjectiveTerms,
) -> ReflexFlowOutput:
    """The step's output; a deferred ADR term (memory="lean") waits in a LeanStep."""
    cfg, lean = ctx.cfg, None
    if calls.deferred:
        lean = LeanStep.defer(ctx, terms, state.x_hat, d.t1, targets.v_adr, targets.adr_weight)
    elif cfg.check_finite:
        check_stage("loss", loss=terms.loss)
    else:  # the default warning: read once the flag has landed on the host, no sync
        finite.WATCH.arm(terms.loss)
    finite.WATCH.poll()
    return ReflexFlowOutput(
        loss=None if lean is not None else terms.loss,
        fc_loss=terms.fc_loss.detach(),
        adr_loss=None if lean is not None or terms.adr_loss is None else terms.adr_loss.detach(),
        bias_norm=state.bias_norm,
        t0=from_canonical_time(d.t0, cfg.convention),
        t1=from_canonical_time(d.t1, cfg.convention),
        k=d.k,
        fc_weight=None if terms.w is None else terms.w.detach(),
        per_sample_loss=None if lean is not None else terms.per_sample,
        lean=lean,
    )


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
        # the rollout's engine: its CUDA graphs (and the models they hold) live with the loss
        self.engine = RolloutEngine(cfg.rollout_backend, cuda_graph=cfg.cuda_graph)

    def forward(
        self,
        model: Callable[..., Tensor],
        x1: Tensor,
        *,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        k: Tensor | None = None,
        t1: Tensor | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> ReflexFlowOutput:
        return reflexflow_loss(
            model,
            x1,
            noise=noise,
            t=t,
            k=k,
            t1=t1,
            model_kwargs=model_kwargs,
            generator=generator,
            config=self.config,
            stable_bank=self.stable_bank,
            engine=self.engine,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"preset={c.preset!r}, method={c.method!r}, path={c.path!r}, "
            f"convention={c.convention!r}, K={c.rollout_steps}, N={c.num_sampling_steps}, "
            f"adr_loss={c.adr_loss!r}, lambda_adr={c.lambda_adr}, lambda_fc={c.lambda_fc}"
        )
