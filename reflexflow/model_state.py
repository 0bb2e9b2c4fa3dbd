"""The model's state around the loss's calls: training mode of the rollout, gradient sync.

* :func:`rollout_mode`: the no-grad rollout simulates inference, so by default it runs
  the model in eval mode (no dropout; BatchNorm uses and does not update its running
  statistics), and every submodule's own training flag is restored afterwards.
* :func:`gradient_sync_off`: the lean step's first backward must not all-reduce
  (DistributedDataParallel: the forward runs inside ``no_sync``; FSDP2 ``fully_shard``:
  ``set_requires_gradient_sync(False)`` around the backward), so gradients are reduced
  once, by the last backward of the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["rollout_mode", "ddp_no_sync", "fsdp2_sync", "is_fsdp1"]


@contextlib.contextmanager
def rollout_mode(model: Any, mode: str) -> Iterator[None]:
    """Run the block with ``model`` in eval mode (mode "eval") or as it is ("train").

    Only nn.Modules have a mode; other callables run as they are. Each submodule's own
    ``training`` flag is restored on exit (a frozen submodule kept in eval stays in eval).
    """
    if mode != "eval" or not isinstance(model, nn.Module) or not model.training:
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.train(False)
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _ddp_class() -> type | None:
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DistributedDataParallel


def is_fsdp1(model: Any) -> bool:
    """True for the FSDP1 wrapper (torch.distributed.fsdp.FullyShardedDataParallel)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FullyShardedDataParallel)


def ddp_no_sync(model: Any) -> contextlib.AbstractContextManager:
    """``model.no_sync()`` for a DistributedDataParallel model, else a no-op context.

    A DDP forward inside no_sync prepares no gradient reduction for its backward; the
    previous sync state is restored on exit (nested no_sync blocks of the user stay off).
    """
    ddp = _ddp_class()
    if ddp is not None and isinstance(model, ddp):
        return model.no_sync()
    return contextlib.nullcontext()


def _fsdp2_modules(model: Any) -> list[Any]:
    if not isinstance(model, nn.Module):
        return []
    return [m for m in model.modules() if hasattr(m, "set_requires_gradient_sync")]


@contextlib.contextmanager
def fsdp2_sync(model: Any, enabled: bool) -> Iterator[None]:
    """Set FSDP2's gradient sync of every ``fully_shard`` module in ``model`` for the block.

    FSDP2 has no public getter, so the state on exit is read from each module's FSDP
    state where torch exposes it, else assumed on (the default).
    """
    modules = _fsdp2_modules(model)
    before = [_fsdp2_sync_state(m) for m in modules]
    for m in modules:
        m.set_requires_gradient_sync(enabled, recurse=False)
    try:
        yield
    finally:
        for m, state in zip(modules, before, strict=True):
            m.set_requires_gradient_sync(state, recurse=False)


def _fsdp2_sync_state(module: Any) -> bool:
    try:
        group = module._get_fsdp_state()._fsdp_param_group
    except AttributeError:
        return True
    return True if group is None else bool(group.reduce_grads)
