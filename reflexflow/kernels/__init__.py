"""Fused Triton kernels (reflexflow.kernels), imported lazily: importing reflexflow never
imports triton. See kernels/README.md and benchmarks/README.md ("Loss kernels")."""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

__all__ = [
    "triton_available",
    "triton_usable",
    "supports",
    "fused_objective",
    "fused_objective_auto",
    "is_out_of_memory",
    "note_failure",
]

_FAILED: list[str] = []  # the first failure of the Triton path under backend="auto"


def triton_available() -> bool:
    """True when the triton package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_usable(device_type: str) -> bool:
    """True when Triton can run kernels on tensors of ``device_type``.

    CUDA needs triton; other devices only run under Triton's interpreter
    (environment variable TRITON_INTERPRET=1, set before triton is imported).
    """
    if not triton_available():
        return False
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def supports(**kwargs: Any) -> bool:
    """True when the fused kernels compute ``reference.objective(**kwargs)`` (see
    kernels.objective.supports); route False to the reference."""
    if not triton_available():
        return False
    from .objective import supports as impl

    return impl(**kwargs)


def fused_objective(*args: Any, **kwargs: Any) -> dict:
    """Triton twin of reflexflow.reference.objective (see kernels.objective)."""
    from .objective import fused_objective as impl

    return impl(*args, **kwargs)


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation failure (torch.OutOfMemoryError, a CUDA "out of memory"): never a
    reason to leave the kernels, as the reference needs more memory still."""
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def note_failure(err: BaseException, stacklevel: int = 2) -> None:
    """Record the Triton path's failure under backend="auto": one RuntimeWarning, and
    fused_objective_auto uses the reference from now on."""
    if not _FAILED:
        warnings.warn(
            f"reflexflow: the Triton loss kernels failed ({err!r}); backend='auto' uses "
            "the PyTorch reference from now on (backend='triton' shows the error)",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
    _FAILED.append(repr(err))


def fused_objective_auto(path: Any, **kwargs: Any) -> dict:
    """backend="auto": fused_objective, or reference.objective once the Triton path has
    failed to compile or launch on this machine, forward or backward (one warning, then
    the reference for the rest of the process). Errors about the arguments (ValueError,
    TypeError) and out-of-memory errors propagate."""
    return_w = kwargs.pop("return_w", True)
    if not _FAILED:
        try:
            from .objective import fused_objective_soft

            return fused_objective_soft(path, return_w=return_w, **kwargs)
        except (ValueError, TypeError):
            raise
        except Exception as err:  # a Triton compile/launch failure: fail soft
            if is_out_of_memory(err):
                raise
            note_failure(err, stacklevel=2)
    from ..reference import objective

    return objective(path, **kwargs)
