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
import functools
import types
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config_checks import user_stacklevel

__all__ = [
    "modules_of",
    "rollout_mode",
    "mode_sensitive",
    "ddp_no_sync",
    "fsdp2_sync",
    "is_fsdp1",
]


def modules_of(fn: Any, depth: int = 1) -> list[nn.Module]:
    """The nn.Modules a callable runs: itself, a bound method's instance, a
    functools.partial's function and arguments, a function's closure cells and the
    module-level names its code reads (``fn.__globals__[name]`` for ``name`` in
    ``fn.__code__.co_names``; neither while torch.compile traces: dynamo cannot read the
    cells or globals of a function made outside the graph), and the module-valued
    attributes of a function or any other callable object (``depth`` levels deep).

    A model this cannot see (a module reached through a container, or through a helper
    function's globals) is named with the loss knob ``rollout_modules``.
    """
    found: dict[int, nn.Module] = {}

    def visit(obj: Any, depth: int) -> None:
        if isinstance(obj, nn.Module):
            found.setdefault(id(obj), obj)
        elif hasattr(obj, "__self__") and hasattr(obj, "__func__"):
            visit(obj.__self__, depth)
        elif isinstance(obj, functools.partial):
            for part in (obj.func, *obj.args, *obj.keywords.values()):
                visit(part, depth)
        elif isinstance(obj, types.FunctionType):
            if not torch.compiler.is_compiling():
                for cell in obj.__closure__ or ():
                    try:
                        visit(cell.cell_contents, depth)
                    except ValueError:  # an empty cell
                        pass
                for name in obj.__code__.co_names:
                    value = obj.__globals__.get(name)
                    if isinstance(value, nn.Module):
                        found.setdefault(id(value), value)
            if depth > 0:
                for val in vars(obj).values():
                    visit(val, depth - 1)
        elif depth > 0 and hasattr(obj, "__dict__"):
            for val in vars(obj).values():
                visit(val, depth - 1)

    visit(fn, depth)
    return list(found.values())


_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
# attributes through which modules apply dropout functionally in training mode:
# nn.MultiheadAttention.dropout, SiT's LabelEmbedder.dropout_prob, timm's DropPath.drop_prob,
# attention modules' dropout_p / attn_drop
_DROPOUT_ATTRS = ("dropout", "dropout_p", "dropout_prob", "drop_prob", "drop_rate", "attn_drop")


def _drops_functionally(m: nn.Module) -> bool:
    for name in _DROPOUT_ATTRS:
        value = getattr(m, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return True
    return False


def mode_sensitive(model: Any, extra: tuple[nn.Module, ...] = ()) -> bool:
    """True when ``model`` (or a module of ``extra``) computes differently in eval mode: a
    submodule in training mode that is a dropout (p > 0) or a batch norm (batch
    statistics, running-stat updates), or that holds a dropout probability > 0 as a
    number in one of the attributes of :data:`_DROPOUT_ATTRS` (functional dropout, as
    nn.MultiheadAttention's). Dropout written another way is not seen."""
    for root in _roots(model, extra):
        for m in root.modules():
            if not m.training:
                continue
            if isinstance(m, _STOCHASTIC) and getattr(m, "p", 1) != 0:
                return True
            if _drops_functionally(m):
                return True
    return False


def _roots(model: Any, extra: tuple[nn.Module, ...]) -> list[nn.Module]:
    roots = modules_of(model)
    seen = {id(m) for m in roots}
    return roots + [m for m in extra if id(m) not in seen]


NO_MODULE_WARNING = (
    "rollout_mode='eval' found no nn.Module in the model callable ({name}): its no-grad "
    "rollout runs the model as it is (dropout on, BatchNorm statistics updated when the "
    "model is in training mode). Name the modules with rollout_modules=(net, ...) (a "
    "ReflexFlowLoss knob), pass the module (or a bound method, partial or closure over "
    "it) as the model, or set rollout_mode='train' to keep this behaviour without this "
    "warning."
)
_warned_no_module: set[Any] = set()


def _warn_no_module(model: Any) -> None:
    """One RuntimeWarning per callable (its code object) in which eval mode found nothing."""
    key = getattr(model, "__code__", None) or type(model)
    if key in _warned_no_module:
        return
    _warned_no_module.add(key)
    name = getattr(model, "__qualname__", type(model).__name__)
    warnings.warn(NO_MODULE_WARNING.format(name=name), RuntimeWarning, stacklevel=user_stacklevel())


@contextlib.contextmanager
def rollout_mode(model: Any, mode: str, extra: tuple[nn.Module, ...] = ()) -> Iterator[None]:
    """Run the block with ``model`` in eval mode (mode "eval") or as it is ("train").

    The modules are found through bound methods, partials, closures, a function's
    globals and attributes (:func:`modules_of`), plus the modules ``extra`` (the loss's
    ``rollout_modules``); a callable that runs none has no mode, and eval mode warns once
    (RuntimeWarning, per callable) that it found none. Each submodule's own ``training``
    flag is restored on exit (a frozen submodule kept in eval stays in eval).
    """
    roots = _roots(model, extra) if mode == "eval" else []
    if mode == "eval" and not roots and not torch.compiler.is_compiling():
        _warn_no_module(model)
    flags = [(m, m.training) for root in roots for m in root.modules()]
    if not any(flag for _, flag in flags):
        yield
        return
    for root in roots:
        root.train(False)
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
    """``no_sync()`` of the DistributedDataParallel a model runs (itself, or found through
    ``torch.compile``'s ``_orig_mod`` and wrappers), else a no-op context.

    A DDP forward inside no_sync prepares no gradient reduction for its backward; the
    previous sync state is restored on exit (nested no_sync blocks of the user stay off).
    """
    ddp = _ddp_class()
    if ddp is not None:
        candidates = [model, getattr(model, "_orig_mod", None), *modules_of(model)]
        for root in candidates:
            found = [m for m in _walk(root) if isinstance(m, ddp)]
            if found:
                return found[0].no_sync()
    return contextlib.nullcontext()


def _walk(obj: Any) -> list[Any]:
    return list(obj.modules()) if isinstance(obj, nn.Module) else []


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
