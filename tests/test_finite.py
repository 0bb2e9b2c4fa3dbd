"""Non-finite values (reflexflow/finite.py): check_finite names the stage that made them;
without it, one warning."""

import pytest
import torch

import reflexflow as rf
from tests.helpers import negative_velocity as model

B = 4


@pytest.fixture
def x1():
    return torch.randn(B, 3, 4, 4)


def test_check_finite_catches_nan_data_and_nan_model_output(x1):
    bad = x1.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x1 has non-finite values"):
        rf.reflexflow_loss(model, bad, check_finite=True)
    with pytest.raises(ValueError, match="x_hat has non-finite values .* 'rollout state'"):
        rf.reflexflow_loss(lambda x, t: x * float("inf"), x1, check_finite=True)
    # off by default: no host sync, the NaN comes back in the loss
    assert torch.isnan(rf.reflexflow_loss(model, bad).loss)
