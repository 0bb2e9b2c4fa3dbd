"""``kernel``: the decorator of every Triton function of reflexflow.kernels.

On CUDA it is ``triton.jit``. Under Triton's CPU interpreter (TRITON_INTERPRET=1)
``triton.jit`` returns an ``InterpretedFunction``, which ``torch.library.wrap_triton``
hands back untouched: the ops could then not be traced (fake tensors would reach the
kernel). ``kernel`` instead returns a ``JITFunction`` whose launches (and, for device
helpers, calls from a kernel) run on the interpreter, so the very registration CUDA uses
(``triton_op`` + ``wrap_triton``, the kernel side table, the functional higher-order op
that AOTAutograd and Inductor see) is what the CPU tests exercise; only the final launch
differs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["INTERPRET", "kernel", "out_cast"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class InterpretedJIT(JITFunction):
    """A JITFunction (traceable by wrap_triton) whose launches run on the interpreter."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__(fn)
        from triton.runtime.interpreter import InterpretedFunction

        self.interpreted = InterpretedFunction(fn)

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        return self.interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # a device call inside a kernel
        return self.interpreted(*args, **kwargs)


def kernel(fn: Callable[..., Any]) -> Any:
    """``triton.jit`` for a kernel or a device helper (see the module docstring)."""
    return InterpretedJIT(fn) if INTERPRET else triton.jit(fn)


# Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even): round first
ROUND_BF16 = tl.constexpr(INTERPRET)


@kernel
def out_cast(x, dtype: tl.constexpr):
    """x (fp32) in an output dtype, rounded to nearest even (on the interpreter too)."""
    if ROUND_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
