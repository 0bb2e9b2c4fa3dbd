"""memory="lean": the FM term's backward runs before the ADR term's forward.

The loss's forward leaves the ADR call for later (:class:`LeanStep`); ``out.backward()``
backpropagates the FM half (no gradient sync under DDP/FSDP2), frees its graph, then runs
the ADR call and backpropagates lambda_adr * L_ADR (the gradient sync), so the step's
peak activation memory is the FM term's. The ADR term is the reference's own
(:func:`reflexflow.reference.adr_term`):

    L = L_FC + lambda_adr * mean_i adr_weight_i * ADR(v(x^_t1, t1), v_adr)_i
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import reference as ref
from .finite import check_stage
from .model_state import fsdp2_sync
from .objective import ObjectiveSpec, ObjectiveTerms
from .stages import StepContext

__all__ = ["LeanStep", "LeanResult"]


class LeanResult(NamedTuple):
    """The step's values once both halves ran (detached): loss, adr_loss, per_sample."""

    loss: Tensor
    adr_loss: Tensor
    per_sample: Tensor


@dataclass(frozen=True)
class LeanStep:
    """The deferred half of a memory="lean" step: the FM half's loss and rows (its graph
    kept for ``backward``) and what the ADR call needs (state, times, kwargs, target,
    weight, the autocast state of the forward)."""

    model: Any
    velocity: Callable[..., Tensor]
    spec: ObjectiveSpec
    fm_loss: Tensor
    fc_rows: Tensor
    x_hat: Tensor
    t1: Tensor
    kwargs: Any
    v_adr: Tensor
    adr_weight: Tensor | None
    autocast: tuple[str, bool, torch.dtype]
    check_finite: bool = False

    @classmethod
    def defer(
        cls,
        ctx: StepContext,
        fm_half: ObjectiveTerms,
        x_hat: Tensor,
        t1: Tensor,
        v_adr: Tensor,
        adr_weight: Tensor | None,
    ) -> LeanStep:
        """The deferred step of ``ctx`` after the objective's FM half ``fm_half`` (no v1):
        the ADR call v(x^_t1, t1) against v_adr, weighted by adr_weight."""
        device = x_hat.device.type
        return cls(
            model=ctx.model,
            velocity=ctx.velocity,
            spec=ctx.spec,
            fm_loss=fm_half.loss,
            fc_rows=fm_half.per_sample.detach(),
            x_hat=x_hat.detach(),
            t1=t1,
            kwargs=ctx.kwargs,
            v_adr=v_adr,
            adr_weight=adr_weight,
            autocast=(device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)),
            check_finite=ctx.cfg.check_finite,
        )

    def backward(self, scale: Callable[[Tensor], Tensor]) -> LeanResult:
        """FM backward (sync off), then ADR forward + backward (sync on).

        Runs with grad mode on whatever the caller's (``out.backward()`` inside
        torch.no_grad() backpropagates, as ``loss.backward()`` does there).
        """
        device, enabled, dtype = self.autocast
        with torch.enable_grad():
            with fsdp2_sync(self.model, False):
                scale(self.fm_loss).backward()  # frees the FM graph before the ADR forward
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                v1 = self.velocity(self.x_hat, self.t1, self.kwargs)
            if self.check_finite:
                check_stage("model outputs", v1=v1)
            with torch.autocast(device, enabled=False):
                rows, adr = ref.adr_term(v1, self.v_adr, self.spec, self.adr_weight)
            scale(self.spec.lambda_adr * adr).backward()
        fc_value, lam = self.fm_loss.detach(), self.spec.lambda_adr
        return LeanResult(
            loss=(fc_value + lam * adr).detach(),
            adr_loss=adr.detach(),
            per_sample=(self.fc_rows + lam * rows).detach(),
        )
