"""Moving batch-shaped model arguments along with their samples.

A model keyword argument is *batch-shaped* when it is a tensor whose first axis has the
batch size B (class labels (B,), text embeddings (B, L, D), masks (B, L), ...). Such
entries are indexed, permuted and concatenated together with the samples; everything
else (scalars, tensors of another leading size, strings, None) is passed through as is.
Dicts, lists and tuples are searched recursively (e.g. diffusers' ``added_cond_kwargs``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["map_tensors", "map_batched", "index_batch", "repeat_batch", "prefix_batch"]


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """Apply fn to every tensor inside obj (mappings, lists, tuples, recursively).

    Any mapping (MappingProxyType, ...) comes back a dict; named tuples and other values
    are passed through as they are.
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {key: map_tensors(val, fn) for key, val in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(map_tensors(val, fn) for val in obj)
    return obj


def map_batched(obj: Any, batch: int, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply fn to every batch-shaped tensor inside obj (see :func:`map_tensors`)."""
    return map_tensors(obj, lambda x: fn(x) if x.dim() >= 1 and x.shape[0] == batch else x)


def index_batch(obj: Any, batch: int, index: Tensor) -> Any:
    """Select samples ``index`` (int64) from every batch-shaped tensor."""
    return map_batched(obj, batch, lambda x: x.index_select(0, index.to(x.device)))


def prefix_batch(obj: Any, batch: int, n: int) -> Any:
    """The first n samples of every batch-shaped tensor, as zero-copy views."""
    return map_batched(obj, batch, lambda x: x[:n])


def repeat_batch(obj: Any, batch: int, times: int = 2) -> Any:
    """Concatenate every batch-shaped tensor with itself ``times`` times along axis 0."""
    return map_batched(obj, batch, lambda x: torch.cat([x] * times, dim=0))
