"""Batch-shaped model arguments (reflexflow/batching.py): model_kwargs follow their samples,
a tensor of another batch size is named, unbatched kwargs reach the model as they are."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
import torch

import reflexflow as rf
from tests.helpers import ConvVelocity

BATCH = 8


def test_a_kwarg_tensor_of_another_batch_size_is_named():
    y = torch.zeros(BATCH + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\] has shape \(9,\)"):
        rf.reflexflow_loss(
            ConvVelocity(num_classes=4), torch.randn(BATCH, 3, 4, 4), model_kwargs={"y": y}
        )
    nested = {"extra": {"mask": torch.ones(1, 5)}}
    with pytest.raises(ValueError, match=r"model_kwargs\['extra'\]\['mask'\]"):
        rf.reflexflow_loss(lambda x, t, extra: -x, torch.randn(BATCH, 3), model_kwargs=nested)


def test_unbatched_kwargs_reach_the_model_as_they_are_even_with_batch_size_rows():
    ids = torch.arange(BATCH * 3).view(BATCH, 3)  # B rows, like Flux's img_ids with B tokens
    seen = []

    def model(x, t, img_ids, y):
        seen.append((img_ids, y.shape[0], x.shape[0]))
        return -x

    y = torch.arange(BATCH)
    rf.reflexflow_loss(
        model,
        torch.randn(BATCH, 3, 4, 4),
        model_kwargs={"img_ids": ids, "y": y},
        unbatched_kwargs=("img_ids",),
        joint_forward=True,
    )
    assert all(s[0] is ids for s in seen)  # never sorted, indexed or concatenated
    assert all(s[1] == s[2] for s in seen)  # the labels follow the samples (BATCH, then 2B)


def test_map_tensors_reaches_tensors_in_any_mapping_and_keeps_other_values():
    from types import MappingProxyType

    from reflexflow.batching import map_batched, map_tensors

    y = torch.arange(3)
    nested = MappingProxyType({"y": y, "extra": [y, "text"], "n": 5})
    doubled = map_tensors(nested, lambda a: 2 * a)
    assert isinstance(doubled, dict) and doubled["n"] == 5 and doubled["extra"][1] == "text"
    assert torch.equal(doubled["y"], 2 * y) and torch.equal(doubled["extra"][0], 2 * y)
    other = torch.zeros(4)  # not batch-shaped for B = 3: left alone by map_batched
    assert map_batched({"o": other}, 3, lambda a: a + 1)["o"] is other


class _Cond(NamedTuple):
    labels: torch.Tensor
    scale: float


@dataclasses.dataclass
class _CondObject:
    labels: torch.Tensor


def test_a_named_tuple_in_model_kwargs_follows_its_samples():
    """The prefix plan sorts the batch by k: a NamedTuple's tensors move with their rows
    (they were passed through unmoved before), and a wrong batch size is named."""
    from reflexflow.batching import index_batch, prefix_batch

    cond = _Cond(torch.arange(BATCH), 0.5)
    order = torch.arange(BATCH - 1, -1, -1)
    moved = index_batch({"c": cond}, BATCH, order)["c"]
    assert isinstance(moved, _Cond) and moved.scale == 0.5
    assert torch.equal(moved.labels, order)
    assert torch.equal(prefix_batch({"c": cond}, BATCH, 3)["c"].labels, torch.arange(3))
    with pytest.raises(ValueError, match=r"model_kwargs\['c'\]\[0\] has shape \(9,\)"):
        rf.reflexflow_loss(
            lambda x, t, c: -x,
            torch.randn(BATCH, 3),
            model_kwargs={"c": _Cond(torch.zeros(BATCH + 1), 1.0)},
        )


def test_an_object_holding_batch_shaped_tensors_is_refused_naming_it_a_shared_one_passes():
    shared = _CondObject(torch.ones(1, 5))  # no batch axis: shared, passed through as is
    out = rf.reflexflow_loss(lambda x, t, c: -x, torch.randn(BATCH, 3), model_kwargs={"c": shared})
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match=r"model_kwargs\['c'\] is a _CondObject holding tensors"):
        rf.reflexflow_loss(
            lambda x, t, c: -x,
            torch.randn(BATCH, 3),
            model_kwargs={"c": _CondObject(torch.zeros(BATCH))},
        )
    out = rf.reflexflow_loss(  # declared not batch-shaped: passed to the model as it is
        lambda x, t, c: -x * c.labels.sum(),
        torch.randn(BATCH, 3),
        model_kwargs={"c": _CondObject(torch.ones(BATCH))},
        unbatched_kwargs=("c",),
    )
    assert torch.isfinite(out.loss)
