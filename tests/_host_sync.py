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
from collections.abc import Iterator

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
def count_host_reads() -> Iterator[list[str]]:
    """Yields a list that receives one entry per host read or transfer made inside."""
    events: list[str] = []
    saved = {}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            events.append(f"Tensor.{name}")
            return fn(self, *args, **kwargs)

        return counted

    for name in TENSOR_READS:
        saved[name] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, wrap(name, saved[name]))

    factories = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}

    def wrap_factory(name, fn):
        def counted(*args, **kwargs):
            if kwargs.get("device") is not None:
                events.append(f"torch.{name}(device=...)")
            return fn(*args, **kwargs)

        return counted

    for name, fn in factories.items():
        setattr(torch, name, wrap_factory(name, fn))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield events
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in factories.items():
            setattr(torch, name, fn)
    events.extend(e.name for e in prof.events() if e.name in SYNCING_OPS)
