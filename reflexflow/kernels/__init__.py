"""Fused Triton kernels (reflexflow.kernels), imported lazily: importing reflexflow never
imports triton. See kernels/README.md and benchmarks/README.md ("Loss kernels")."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

__all__ = ["triton_available", "triton_usable", "supports", "fused_objective"]


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


def supports(path: Any, spec: Any, inputs: Any) -> bool:
    """True when ``fused_objective(path, spec, inputs)`` computes this call (see
    kernels.objective.supports); route False to the reference."""
    if not triton_available():
        return False
    from .objective import supports as impl

    return impl(path, spec, inputs)


def fused_objective(
    path: Any, spec: Any, inputs: Any, *, return_w: bool = True, fail_soft: bool = False
) -> Any:
    """Triton twin of ``reference.objective(path, spec, inputs) -> ObjectiveTerms``;
    ``fail_soft=True`` is backend="auto" (see kernels.objective.fused_objective)."""
    from .objective import fused_objective as impl

    return impl(path, spec, inputs, return_w=return_w, fail_soft=fail_soft)
