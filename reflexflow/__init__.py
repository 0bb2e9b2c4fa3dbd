"""reflexflow: the ReflexFlow / DEFAR training objective for flow-matching models.

Anti-Drift Rectification (ADR) on scheduled-sampling rollouts plus Frequency
Compensation (FC); see docs/method.md for the mathematics and README.md for usage.
"""

from . import diagnostics, objective, paths, presets, reference, stable
from .config import ReflexFlowConfig
from .conventions import VelocityModel
from .diagnostics import exposure_bias
from .loss import ReflexFlowLoss, ReflexFlowOutput, reflexflow_loss
from .paths import GVPPath, LinearPath, VPPath, get_path
from .sampler import sample

__version__ = "0.1.0"

__all__ = [
    "ReflexFlowLoss",
    "ReflexFlowOutput",
    "ReflexFlowConfig",
    "reflexflow_loss",
    "sample",
    "exposure_bias",
    "LinearPath",
    "GVPPath",
    "VPPath",
    "get_path",
    "VelocityModel",
    "diagnostics",
    "objective",
    "paths",
    "presets",
    "reference",
    "stable",
]
