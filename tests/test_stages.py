"""The loss call's validate stage (reflexflow/stages.py): data, noise, model_kwargs and the
generator are checked, each bad one named."""

import pytest
import torch

import reflexflow as rf
from tests.helpers import negative_velocity as model

B = 4


@pytest.fixture
def x1():
    return torch.randn(B, 3, 4, 4)


def test_integer_data_is_rejected(x1):
    with pytest.raises(TypeError, match="x1 must be a floating-point tensor"):
        rf.reflexflow_loss(model, x1.to(torch.int64))


def test_data_without_batch_axis_is_rejected():
    with pytest.raises(ValueError, match="x1 must have shape"):
        rf.reflexflow_loss(model, torch.randn(5))


def test_noise_of_another_shape_or_dtype_is_rejected(x1):
    with pytest.raises(ValueError, match="noise must have x1's shape"):
        rf.reflexflow_loss(model, x1, noise=torch.randn(B, 3, 4, 5))
    with pytest.raises(TypeError, match="noise must be a floating-point tensor"):
        rf.reflexflow_loss(model, x1, noise=torch.zeros(x1.shape, dtype=torch.int32))


def test_model_kwargs_must_be_a_mapping(x1):
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        rf.reflexflow_loss(model, x1, model_kwargs=[1, 2])


def test_generator_on_another_device_type_is_rejected(x1):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to build a mismatched generator")
    with pytest.raises(ValueError, match="generator is on"):
        rf.reflexflow_loss(model, x1, generator=torch.Generator(device="cuda"))


@pytest.mark.parametrize("generator", ["x", 0, torch.manual_seed])
def test_a_generator_that_is_not_a_torch_generator_is_refused_by_name(x1, generator):
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
        rf.reflexflow_loss(model, x1, generator=generator)


def test_the_objective_spec_lives_with_its_config_and_keeps_no_model_alive():
    """The spec is built once, with the config (no process-wide cache holding old configs
    and the rollout_modules they name)."""
    import gc
    import weakref

    from reflexflow.objective import FLOW_MATCHING, ObjectiveSpec

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x, t):
            return self.lin(x) * t[:, None]

    net = Net()
    cfg = rf.ReflexFlowConfig(rollout_modules=(net,))
    assert cfg.objective_spec == ObjectiveSpec.from_config(cfg)
    assert rf.ReflexFlowConfig(method="fm").objective_spec is FLOW_MATCHING
    rf.reflexflow_loss(net, torch.randn(4, 3), config=cfg)
    alive = weakref.ref(net)
    del net, cfg
    gc.collect()
    assert alive() is None
