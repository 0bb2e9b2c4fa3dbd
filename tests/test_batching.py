"""Batch-shaped model arguments (reflexflow/batching.py): model_kwargs follow their samples,
a tensor of another batch size is named, unbatched kwargs reach the model as they are."""

from __future__ import annotations

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
