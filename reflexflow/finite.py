"""Non-finite values (NaN, Inf) in a loss step: which stage made them, or one warning.

check_finite=True: :func:`check_stage` after each stage reads its tensors (one host sync
each) and raises a ValueError naming the stage and the tensor.

Default (check_finite=False), no host sync added: :data:`WATCH` queues a device-side flag
"this loss is non-finite" on the steps whose rollout already reads k on the host (the
per-sample rollout plan), and reads it at the next such read, when the device has passed
it; a non-finite loss then gives one RuntimeWarning suggesting check_finite=True. Steps
without a host read (the fixed-k plan, ``k_draw="fixed"`` with ``ss_prob=1``; fm and ip)
are not watched: there, use check_finite=True.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["STAGES", "check_stage", "NonFiniteWatch", "WATCH"]

STAGES = {
    "data": "the batch x1 or the noise passed to the loss",
    "rollout state": "the model's no-grad rollout calls (in rollout_mode)",
    "model outputs": "the model's gradient-carrying calls",
    "velocity bias": "the no-grad calls of fc_source='velocity'",
    "targets": "the ADR / stable targets computed from the data and the rollout state",
    "loss": "the objective's arithmetic (its inputs were finite)",
}


def check_stage(stage: str, **tensors: Tensor | None) -> None:
    """ValueError "<name> has non-finite values (NaN or Inf) at stage '<stage>'" for the
    first given tensor with a NaN or Inf (one host sync per tensor)."""
    for name, x in tensors.items():
        if x is not None and not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"{name} has non-finite values (NaN or Inf) at stage {stage!r}: they come "
                f"from {STAGES[stage]}"
            )


class NonFiniteWatch:
    """The default warning for a non-finite loss, read only after a host sync was paid.

    ``arm(loss)`` queues ~isfinite(loss) (on CUDA copied without blocking into pinned
    host memory, behind an event); ``poll()`` reads the last armed flag once the device
    has passed it (``event.query()``, no wait), warns once per process when it is set.
    """

    def __init__(self) -> None:
        self._pending: tuple[Tensor, torch.cuda.Event | None] | None = None
        self.warned = False

    def arm(self, loss: Tensor) -> None:
        if self.warned or torch.compiler.is_compiling():
            return
        flag = torch.isfinite(loss.detach()).all().logical_not()
        event = None
        if flag.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flag = host
        self._pending = (flag, event)

    def poll(self) -> None:
        if self._pending is None or torch.compiler.is_compiling():
            return
        flag, event = self._pending
        if event is not None and not event.query():
            return  # not reached yet: read it at a later poll
        self._pending = None
        if bool(flag) and not self.warned:
            self.warned = True
            warnings.warn(
                "reflexflow: a loss step gave a non-finite loss (NaN or Inf); pass "
                "check_finite=True to have the loss name the stage that made it (data, "
                "rollout state, model outputs, velocity bias, targets)",
                RuntimeWarning,
                stacklevel=3,
            )


WATCH = NonFiniteWatch()
