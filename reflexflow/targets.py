"""The targets stage: every target and per-sample weight of one step, in one place.

* the FM-type term's target u0 at its point (x_fm, t_fm): the conditional velocity
  u_t = a'(t) x1 + s'(t) eps, or the posterior-weighted ("stable") target v~(x_fm, t_fm)
  over the reference set (docs/method.md section 3);
* the ADR target v_adr = u_t1 + (s'/s)(t1) (x^_t1 - x_t1), or v~(x^_t1, t1);
* the velocity-space bias v(x^_t1, t1) - v(x_t1, t1) that drives FC with
  fc_source="velocity";
* the FC rows (rolled out, below fc_t_max) and the loss weights at t_fm and t1, with
  the near-t = 1 remedy of the mse ADR term (adr_x1_from: rows beyond t_c weighted
  min(1, (c(t1)/c(t_c))^2), :func:`reflexflow.reference.adr_x1_weight`).

biased_input "renoise" (takenoko): the FM term's point is (x_t0, t0) while its call is
v(x^, t0); the bias is v(x^, t0) - v(x_t0, t0).

A target left None is the objective's own conditional default (the fused kernels then
compute it in registers).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import reference as ref
from .draws import Draws
from .finite import check_stage
from .model_state import mode_sensitive
from .stages import GradientCalls, RolloutState, StepContext, biased_label
from .weighting import loss_weights

__all__ = ["Targets", "term_targets", "velocity_bias", "reference_set"]


class Targets(NamedTuple):
    """What the objective compares the model outputs with, and how it weighs them.

    fm_time: t_fm, the FM-type term's time (t0; t1 for ss and fm_input "biased");
    u0: its target (None: conditional u at fm_time); v_adr: the ADR target (None:
    conditional); fc_delta: the velocity-space bias (None: x^_t1 - x_t1); fc_active: (B,)
    bool rows with an FC map; fm_weight, adr_weight: (B,) loss weights or None.
    """

    fm_time: Tensor
    u0: Tensor | None
    v_adr: Tensor | None
    fc_delta: Tensor | None
    fc_active: Tensor | None
    fm_weight: Tensor | None
    adr_weight: Tensor | None


def reference_set(ctx: StepContext) -> Tensor:
    """The stable target's reference set: the bank's (batch + recent; a collective with
    stable_gather, so called once per step) or the batch."""
    bank = ctx.stable_bank
    return ctx.data if bank is None else bank.reference(ctx.data)


def velocity_bias(ctx: StepContext, d: Draws, state: RolloutState, calls: GradientCalls) -> Tensor:
    """v(x^_t1, t1) - v(x_t1, t1) without gradient: the velocity-space bias of FC.

    Both calls run in ``rollout_mode`` (they measure inference, and must not update
    BatchNorm statistics). The ADR call's own output v(x^_t1, t1) is reused for the
    biased side when the model computes the same in both modes (no dropout or batch norm
    in training mode), else the biased side costs one more no-grad forward.
    """
    cfg = ctx.cfg
    velocity = ctx.velocity.with_mode(cfg.rollout_mode)
    label = biased_label(cfg, d)  # t1; renoise: t0, and the clean side at (x_t0, t0)
    x_clean = state.x_t0 if cfg.biased_input == "renoise" else state.x_t1
    with torch.no_grad():
        clean = velocity(x_clean, label, ctx.kwargs)
        biased = calls.biased_output(ctx.batch)
        if biased is None or (
            cfg.rollout_mode == "eval" and mode_sensitive(ctx.model, cfg.rollout_modules)
        ):
            biased = velocity(state.x_hat, label, ctx.kwargs)
        return biased - clean


def _fm_point(ctx: StepContext, d: Draws, state: RolloutState) -> tuple[Tensor, Tensor]:
    """(x_fm, t_fm) where the FM-type term's target is taken: (x_t0, t0); ss: the clean
    (x_t1, t1) (the unrectified target); fm_input "biased": (x^_t1, t1)."""
    cfg = ctx.cfg
    if not cfg.rolls_out:
        return state.x_t0, d.t0
    if cfg.method == "ss":
        return state.x_t1, d.t1
    if cfg.biased_input == "renoise":  # the call v(x^, t0) against u_t0
        return state.x_t0, d.t0
    if cfg.fm_input == "biased":
        return state.x_hat, d.t1
    return state.x_t0, d.t0


def _weights(ctx: StepContext, t: Tensor) -> Tensor | None:
    """Per-sample loss weights at times t, in the state dtype (None: no weighting)."""
    w = loss_weights(ctx.cfg.loss_weighting, t, ctx.cfg.convention)
    return None if w is None else w.to(ctx.data.dtype)


def _adr_weights(ctx: StepContext, d: Draws) -> Tensor | None:
    """(B,) weights of the ADR rows: loss_weighting at t1 (weight_adr) times the near-t = 1
    remedy min(1, (c(t1)/c(t_c))^2) of the mse term (adr_x1_from = t_c), or None."""
    cfg = ctx.cfg
    w = _weights(ctx, d.t1) if cfg.weight_adr else None
    if cfg.adr_x1_from is not None and ctx.spec.adr_loss == "mse":
        cap = ref.adr_x1_weight(ctx.path, d.t1, cfg.adr_x1_from).to(ctx.data.dtype)
        w = cap if w is None else w * cap
    return w


def _fc_active(ctx: StepContext, d: Draws) -> Tensor | None:
    """Rows whose FC map is not 1: rolled out, and below fc_t_max when it is set."""
    if ctx.spec.fc.lambda_fc == 0:
        return None
    active = d.k > 0
    if ctx.cfg.fc_t_max is not None:
        active = active & (d.t0 < ctx.cfg.fc_t_max)
    return active


def term_targets(ctx: StepContext, d: Draws, state: RolloutState, calls: GradientCalls) -> Targets:
    """The targets and weights of both terms (see the module docstring)."""
    cfg, path = ctx.cfg, ctx.path
    x_fm, t_fm = _fm_point(ctx, d, state)
    has_adr = ctx.spec.lambda_adr != 0
    fc_delta = None
    if ctx.spec.fc.lambda_fc != 0 and cfg.fc_source == "velocity":
        fc_delta = velocity_bias(ctx, d, state, calls)
        if cfg.check_finite:
            check_stage("velocity bias", fc_delta=fc_delta)
    u0 = v_adr = None
    if cfg.target == "stable":
        from .stable import stable_target

        refs = reference_set(ctx)
        if has_adr:
            v_adr = stable_target(path, state.x_hat.detach(), d.t1, refs)
        if cfg.method == "reflexflow" and cfg.fm_input == "biased":
            u0 = v_adr  # both terms' targets are v~(x^_t1, t1)
        if u0 is None:
            u0 = stable_target(path, x_fm.detach(), t_fm, refs)
    if calls.deferred and v_adr is None:  # lean: the deferred ADR term needs it explicit
        v_adr = ref.adr_target(path, ctx.data, d.eps, state.x_hat.detach(), d.t1)
    if cfg.check_finite:
        check_stage("targets", u0=u0, v_adr=v_adr)
    return Targets(
        fm_time=t_fm,
        u0=u0,
        v_adr=v_adr,
        fc_delta=fc_delta,
        fc_active=_fc_active(ctx, d),
        fm_weight=_weights(ctx, t_fm),
        adr_weight=_adr_weights(ctx, d) if has_adr else None,
    )
