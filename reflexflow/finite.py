"""Non-finite values (NaN, Inf) in a loss step: which stage made them, or one warning.

check_finite=True: :func:`check_stage` after each stage reads its tensors (one host sync
each) and raises a ValueError naming the stage and the tensor.

Default (check_finite=False), no host sync added: :data:`WATCH` copies a device-side
flag "this loss is non-finite" into host memory without blocking (CUDA: pinned memory
behind an event) and reads it once the copy has landed, at the end of this loss call or
of a later one; a non-finite loss then gives one RuntimeWarning (per process) suggesting
check_finite=True. Cost: four tiny device ops per step.
"""

from __future__ import annotations

import warnings
from collections import deque

import numpy
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
    """The default warning for a non-finite loss, without a host sync.

    ``arm(loss)`` queues the device-side flag ~isfinite(loss) into host memory (CUDA: a
    non-blocking copy into pinned memory behind an event; CPU: a copy into a numpy
    buffer, as CPU tensors have no device queue); ``poll()`` reads the flags whose copy
    has landed (``event.query()``, which never waits) and warns once per process. Other
    devices, and steps traced by torch.compile, are not watched.
    """

    def __init__(self, depth: int = 8) -> None:
        self._pending: deque[tuple[numpy.ndarray, torch.cuda.Event | None, Tensor | None]]
        self._pending = deque(maxlen=depth)
        self.warned = False

    def arm(self, loss: Tensor) -> None:
        if self.warned or torch.compiler.is_compiling():
            return
        flag = torch.isfinite(loss.detach()).all().logical_not()
        if flag.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            # on the loss's device's stream (the copy's), not the current device's
            event.record(torch.cuda.current_stream(flag.device))
            self._pending.append((host.numpy(), event, host))
        elif flag.device.type == "cpu":
            view = numpy.zeros((), dtype=bool)
            torch.from_numpy(view).copy_(flag)
            self._pending.append((view, None, None))

    def poll(self) -> None:
        while self._pending and not self.warned:
            view, event, _ = self._pending[0]
            if event is not None and not event.query():
                return  # not landed yet: read it at a later poll
            self._pending.popleft()
            if bool(view):
                self.warned = True
                warnings.warn(
                    "reflexflow: a loss step gave a non-finite loss (NaN or Inf); pass "
                    "check_finite=True to have the loss name the stage that made it "
                    "(data, rollout state, model outputs, velocity bias, targets)",
                    RuntimeWarning,
                    stacklevel=4,
                )


WATCH = NonFiniteWatch()
