"""Probes for the Triton tests: kernel launches (name, grid), host transfers, aten ops.

On CPU the kernels run on Triton's interpreter (``InterpretedFunction.run``), on CUDA
through ``JITFunction.run``; both are patched here. Work the interpreter does inside a
launch (its own tensor copies) is not counted: only what the caller's code does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from reflexflow.objective import ObjectiveSpec

from ._host_sync import patched_host_reads


def make_spec(**knobs) -> ObjectiveSpec:
    """ObjectiveSpec from flat knobs: its own fields, FC fields as fc_<field>
    (fc_filter, fc_per_channel, ...) and lambda_fc."""
    if "lambda_fc" in knobs:
        knobs["fc_lambda_fc"] = knobs.pop("lambda_fc")
    return ObjectiveSpec().replace(**knobs)


@dataclass
class Probe:
    launches: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    transfers: list[str] = field(default_factory=list)
    aten: list[str] = field(default_factory=list)
    in_kernel: int = 0


def _run_class():
    if torch.cuda.is_available():
        from triton.runtime.jit import JITFunction

        return JITFunction
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction


@contextlib.contextmanager
def launches(execute: bool = True) -> Iterator[Probe]:
    """Record (kernel name, grid) of every Triton launch; execute=False skips the kernels
    (outputs are then garbage: for grid checks only)."""
    probe = Probe()
    cls = _run_class()
    original = cls.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            g = grid(kwargs) if callable(grid) else grid
            probe.launches.append((self.fn.__name__, tuple(int(x) for x in g)))
        if not execute:
            return None
        probe.in_kernel += 1
        try:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            probe.in_kernel -= 1

    cls.run = run
    try:
        yield probe
    finally:
        cls.run = original


@contextlib.contextmanager
def host_transfers(probe: Probe) -> Iterator[Probe]:
    """Count device-to-host reads (Tensor.item, tolist, cpu, numpy, bool/int/float of a
    tensor) and host-to-device copies (torch.tensor, torch.as_tensor) made outside a
    kernel launch, into probe.transfers. Use inside ``launches()``."""

    def record(name: str, kwargs: dict) -> None:
        if not probe.in_kernel:
            probe.transfers.append(name)

    with patched_host_reads(record):
        yield probe


# aten ops that launch nothing on a GPU: allocation, metadata, views
NO_LAUNCH = {
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "view",
    "_unsafe_view",
    "reshape",
    "alias",
    "detach",
    "as_strided",
    "slice",
    "select",
    "split",
    "unsqueeze",
    "squeeze",
    "expand",
    "t",
    "permute",
    "transpose",
    "promote_types",
    "result_type",
}


class AtenRecorder(TorchDispatchMode):
    """Records the aten ops the caller's code runs (not the interpreter's own). The
    reflexflow ops are opened: their bodies run under the recorder, so the torch ops
    between their kernels show up. Thread-local: a CUDA backward (autograd's device
    thread) is not seen; the CUDA sync-debug test covers it."""

    def __init__(self, probe: Probe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._library.triton import set_wrap_triton_enabled

        from reflexflow.kernels import objective as fo

        def forward_body(*flat, **named):
            return tuple(fo._forward(fo.OpArgs.from_flat(flat, named)))

        bodies = {
            torch.ops.reflexflow.fused_objective.default: forward_body,
            torch.ops.reflexflow.fused_objective_backward.default: fo._scaled_copies,
        }
        if func in bodies:  # the op's Python body, run under the recorder
            with self, set_wrap_triton_enabled(False):
                return bodies[func](*args, **(kwargs or {}))
        if not self.probe.in_kernel:
            self.probe.aten.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def launching_ops(probe: Probe) -> list[str]:
    """The recorded aten ops that would launch a kernel on a GPU."""
    return [name for name in probe.aten if name not in NO_LAUNCH]
