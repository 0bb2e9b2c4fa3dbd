"""The adapters package (reflexflow/adapters/): its public helpers name bad arguments.

The tests of each module are tests/test_adapters_<module>.py (sit, diffusers,
flow_matching, torchcfm), against stand-ins of the third-party packages;
tests/test_peers.py runs the same adapters against the real ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reflexflow import adapters
from tests.helpers import ConvVelocity

B = 4
X = torch.randn(B, 3, 8, 8)


def test_adapter_helpers_name_bad_arguments():
    with pytest.raises(TypeError, match="y must hold integer class labels"):
        adapters.drop_labels(torch.zeros(B), 0.1, 3)
    with pytest.raises(TypeError, match="prob must be a number"):
        adapters.drop_labels(torch.zeros(B, dtype=torch.long), "0.1", 3)
    with pytest.raises(ValueError, match=r"tokens must have shape \(4, 16, 12\)"):
        adapters.flux_unpack_latents(torch.randn(4, 16, 8), torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="height must be an even int"):
        adapters.flux_latent_image_ids(7, 8)
    with pytest.raises(TypeError, match="sample_arg must be a keyword name"):
        adapters.DiffusersModelAdapter(nn.Identity(), sample_arg=None)
    with pytest.raises(TypeError, match="unpack must be callable or None"):
        adapters.DiffusersModelAdapter(nn.Identity(), pack=lambda x: x, unpack=3)
    adapter = adapters.SiTTransportAdapter("Linear", class_dropout_prob=0.0)
    with pytest.raises(TypeError, match="model_kwargs must be a dict or None, got list"):
        adapter.training_losses(ConvVelocity(), X, [1])
    with pytest.raises(TypeError, match="label_key must be a str"):
        adapters.SiTTransportAdapter("Linear", label_key=0)
