"""Moving batch-shaped model arguments along with their samples.

A model keyword argument is *batch-shaped* when it is a tensor whose first axis has the
batch size B (class labels (B,), text embeddings (B, L, D), masks (B, L), ...). Such
entries are indexed, permuted and concatenated together with the samples; everything
else (scalars, 0-dim tensors, strings, None) is passed through as is. Dicts, lists and
tuples (named tuples too) are searched recursively (e.g. diffusers' ``added_cond_kwargs``);
any other object holding a batch-shaped tensor is refused, as the loss could not move it.

The loss checks the user's model_kwargs once (:func:`prepare_kwargs`): a tensor with
ndim >= 1 whose first axis is not B is refused with an error naming it, unless its
top-level key is declared not batch-shaped (``unbatched_kwargs``, e.g. Flux's
``img_ids``): such entries are wrapped in :class:`Unbatched`, which no batching function
looks into, and unwrapped (:func:`unwrap_kwargs`) just before the model is called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "map_tensors",
    "map_batched",
    "index_batch",
    "repeat_batch",
    "prefix_batch",
    "Unbatched",
    "prepare_kwargs",
    "unwrap_kwargs",
    "attributes",
]


class Unbatched:
    """A model argument passed to the model as it is: never indexed, permuted or
    concatenated with the samples."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        v = self.value
        if isinstance(v, Tensor):  # shape, dtype and storage: a CUDA graph reads it in place
            return f"Unbatched(Tensor{tuple(v.shape)}, {v.dtype}, {v.device}, {v.data_ptr()})"
        return f"Unbatched({v!r})"


def _check_batched(obj: Any, batch: int, where: str) -> None:
    if isinstance(obj, Tensor):
        if obj.dim() >= 1 and obj.shape[0] != batch:
            raise ValueError(
                f"{where} has shape {tuple(obj.shape)}: a tensor in model_kwargs must have "
                f"the batch size {batch} as its first axis (it follows its samples through "
                "the rollout), or be declared not batch-shaped with "
                "unbatched_kwargs=(<its top-level key>, ...)"
            )
    elif isinstance(obj, Mapping):
        for key, val in obj.items():
            _check_batched(val, batch, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, val in enumerate(obj):
            _check_batched(val, batch, f"{where}[{i}]")
    elif _holds_batched_tensors(obj, batch):
        raise ValueError(
            f"{where} is a {type(obj).__name__} holding tensors with the batch size {batch} "
            "as first axis: the loss cannot move them with their samples (it looks into "
            "dicts, lists and tuples only). Pass them as dict entries or a (named) tuple, "
            "or declare the key not batch-shaped with unbatched_kwargs=(<its top-level "
            "key>, ...)"
        )


def attributes(obj: Any) -> dict[str, Any]:
    """The instance attributes of an object (``vars``); {} for objects without a
    ``__dict__`` (numbers, strings, dtypes, slotted objects)."""
    try:
        return vars(obj)
    except TypeError:
        return {}


def _holds_batched_tensors(obj: Any, batch: int) -> bool:
    """An object other than a container (a dataclass, a custom conditioning object) with
    a tensor attribute whose first axis is ``batch``; objects whose tensors are shared by
    the whole batch (first axis 1, or no batch axis) pass through as they are."""
    return any(
        isinstance(val, Tensor) and val.dim() >= 1 and val.shape[0] == batch
        for val in attributes(obj).values()
    )


def prepare_kwargs(
    model_kwargs: Mapping[str, Any] | None, batch: int, unbatched: tuple[str, ...] = ()
) -> dict[str, Any] | None:
    """The user's model_kwargs as a dict: checked, with ``unbatched`` keys wrapped.

    Every tensor with ndim >= 1 outside the ``unbatched`` keys must have first axis
    ``batch`` (ValueError naming it otherwise).
    """
    if model_kwargs is None:
        return None
    out: dict[str, Any] = {}
    for key, val in model_kwargs.items():
        if key in unbatched:
            out[key] = Unbatched(val)
        else:
            _check_batched(val, batch, f"model_kwargs[{key!r}]")
            out[key] = val
    return out


def unwrap_kwargs(kwargs: Any) -> dict[str, Any]:
    """The keyword arguments for the model call: Unbatched wrappers removed."""
    if not kwargs:
        return {}
    return {k: (v.value if isinstance(v, Unbatched) else v) for k, v in kwargs.items()}


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """Apply fn to every tensor inside obj (mappings, lists, tuples, recursively).

    Any mapping (MappingProxyType, ...) comes back a dict, a named tuple the same named
    tuple; other values are passed through as they are.
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {key: map_tensors(val, fn) for key, val in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [map_tensors(val, fn) for val in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
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
