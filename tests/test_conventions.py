"""The model boundary (reflexflow/conventions.py): what the model returns, its dtype and
device against the data's, each mismatch named with its fix."""

from __future__ import annotations

import pytest
import torch

import reflexflow as rf
from tests.helpers import ConvVelocity

B = 4
X = torch.randn(B, 3, 8, 8)


@pytest.fixture
def x1():
    return torch.randn(B, 3, 4, 4)


def test_model_returning_the_wrong_shape_is_rejected(x1):
    with pytest.raises(ValueError, match="model returned shape"):
        rf.reflexflow_loss(lambda x, t: x[:, :1], x1)
    with pytest.raises(TypeError, match="model must return a tensor"):
        rf.reflexflow_loss(lambda x, t: (x,), x1)
    with pytest.raises(TypeError, match="model must be callable"):
        rf.reflexflow_loss("not a model", x1)


@pytest.mark.parametrize(
    "x_dtype, model_dtype",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float32),
        (torch.float32, torch.float64),
    ],
)
def test_x1_dtype_other_than_the_models_names_both_and_the_fix(x_dtype, model_dtype):
    model = ConvVelocity().to(model_dtype)
    match = (
        rf"x1's dtype {x_dtype}, but its parameters are {model_dtype}.*"
        rf"x1\.to\({model_dtype}\).*torch\.autocast"
    )
    with pytest.raises(TypeError, match=match) as info:
        rf.reflexflow_loss(model, X.to(x_dtype))
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error is kept


def test_meta_tensors_are_named():
    with pytest.raises(ValueError, match="x1 is on the meta device"):
        rf.reflexflow_loss(ConvVelocity(), X.to("meta"))
    with pytest.raises(
        ValueError,
        match=r"model's parameters are on the meta device, x1 on cpu",
    ):
        rf.reflexflow_loss(ConvVelocity().to("meta"), X)
    labels = torch.zeros(B, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\] is on the meta device, x1 on cpu"):
        rf.reflexflow_loss(ConvVelocity(num_classes=3), X, model_kwargs={"y": labels})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_model_on_another_device_is_named():
    with pytest.raises(ValueError, match=r"the model's parameters are on cuda:0, x1 on cpu"):
        rf.reflexflow_loss(ConvVelocity().cuda(), X)
    labels = torch.zeros(B, dtype=torch.long)
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\] is on cpu, x1 on cuda:0"):
        rf.reflexflow_loss(ConvVelocity(num_classes=3).cuda(), X.cuda(), model_kwargs={"y": labels})


def test_a_model_returning_a_non_floating_tensor_is_refused():
    with pytest.raises(TypeError, match="floating-point velocity.*torch.int64"):
        rf.reflexflow_loss(lambda x, t: x.long(), X)
    with pytest.raises(TypeError, match=r"got tuple.*DiffusersModelAdapter"):
        rf.reflexflow_loss(lambda x, t: (x,), X)
