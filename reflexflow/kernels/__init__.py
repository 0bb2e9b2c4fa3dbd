"""Fused Triton kernels (reflexflow.kernels), imported lazily: importing reflexflow never
imports triton. See kernels/README.md and benchmarks/README.md ("Loss kernels")."""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

__all__ = ["triton_available", "triton_usable", "fused_objective", "fused_objective_auto"]

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


def fused_objective(*args: Any, **kwargs: Any) -> dict:
    """Triton twin of reflexflow.reference.objective (see kernels.objective_op)."""
    from .objective_op import fused_objective as impl

    return impl(*args, **kwargs)


def fused_objective_auto(*args: Any, **kwargs: Any) -> dict:
    """backend="auto": fused_objective, or reference.objective once the Triton path has
    failed to compile or launch on this machine (one warning, then the reference for the
    rest of the process). Errors about the arguments (ValueError, TypeError) propagate."""
    if not _FAILED:
        try:
            return fused_objective(*args, **kwargs)
        except (ValueError, TypeError):
            raise
        except Exception as err:  # a Triton compile/launch failure: fail soft
            _FAILED.append(repr(err))
            warnings.warn(
                f"reflexflow: the Triton loss kernels failed ({err!r}); backend='auto' uses "
                "the PyTorch reference from now on (backend='triton' shows the error)",
                RuntimeWarning,
                stacklevel=2,
            )
    from ..reference import objective

    return objective(*args, **kwargs)
