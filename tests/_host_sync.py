"""Counting host reads and host-to-device transfers on CPU (not collected: no test_ prefix).

On a GPU each of these blocks the CPU until the device has caught up (a host sync). On CPU
nothing blocks, so the tests count the calls that would: the Python-level reads of tensor
values (``item``, ``tolist``, ``numpy``, ``cpu``, ``bool``/``int``/``float``/index of a
tensor, ``torch.tensor``/``torch.as_tensor`` with a device) by patching them, and the aten
ops that read the device inside C++ (``_local_scalar_dense``, ``nonzero``, ``equal``, ...)
with torch.profiler, which records every op that goes through the dispatcher.
On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` checks the real thing
(tests/test_sync_cuda.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

TENSOR_READS = (
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
)
# host-to-device copies when given a device
TENSOR_FACTORIES = ("tensor", "as_tensor")
# aten ops that copy device values to the host (or size their output by them) on CUDA
SYNCING_OPS = (
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
    "aten::bincount",
    "aten::repeat_interleave",
    "aten::equal",
    "aten::allclose",
)


@contextlib.contextmanager
def patched_host_reads(record: Callable[[str, dict[str, Any]], None]) -> Iterator[None]:
    """While inside, every call of a TENSOR_READS method or of torch.tensor /
    torch.as_tensor first runs record(name, kwargs), name "Tensor.<method>" or
    "torch.<factory>"; the originals are put back on exit."""
    saved = [(torch.Tensor, "Tensor", name, getattr(torch.Tensor, name)) for name in TENSOR_READS]
    saved += [(torch, "torch", name, getattr(torch, name)) for name in TENSOR_FACTORIES]

    def wrap(label, fn):
        def counted(*args, **kwargs):
            record(label, kwargs)
            return fn(*args, **kwargs)

        return counted

    for owner, prefix, name, fn in saved:
        setattr(owner, name, wrap(f"{prefix}.{name}", fn))
    try:
        yield
    finally:
        for owner, _, name, fn in saved:
            setattr(owner, name, fn)


@contextlib.contextmanager
def count_host_reads() -> Iterator[list[str]]:
    """Yields a list that receives one entry per host read or transfer made inside."""
    events: list[str] = []

    def record(name: str, kwargs: dict[str, Any]) -> None:
        if name.startswith("Tensor."):
            events.append(name)
        elif kwargs.get("device") is not None:  # a factory call without one stays on host
            events.append(f"{name}(device=...)")

    with patched_host_reads(record), profile(activities=[ProfilerActivity.CPU]) as prof:
        yield events
    events.extend(e.name for e in prof.events() if e.name in SYNCING_OPS)
