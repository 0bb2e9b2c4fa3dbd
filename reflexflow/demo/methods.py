"""The methods of the study and their ReflexFlowLoss knobs (docs/method.md sections 5 and 6)."""

from __future__ import annotations

from typing import Any

__all__ = ["METHODS", "method_knobs", "DEFAULT_METHODS", "TOY_METHODS", "QUICK_METHODS"]

# name -> knobs of ReflexFlowLoss on top of the shared ones (rollout, lambdas)
METHODS: dict[str, dict[str, Any]] = {
    "fm": {"method": "fm"},
    "ip": {"method": "ip"},
    "ss": {"method": "ss"},
    "reflexflow": {"method": "reflexflow", "adr_loss": "direction"},
    "reflexflow-mse": {"method": "reflexflow", "adr_loss": "mse"},
    "adr-only": {"method": "reflexflow", "adr_loss": "direction", "lambda_fc": 0.0},
    "adr-only-mse": {"method": "reflexflow", "adr_loss": "mse", "lambda_fc": 0.0},
    "fc-only": {"method": "reflexflow", "lambda_adr": 0.0},
}
DEFAULT_METHODS = tuple(m for m in METHODS if m != "adr-only-mse")  # 7 rows
TOY_METHODS = ("fm", "ss", "adr-only", "adr-only-mse")
QUICK_METHODS = ("fm", "ss", "reflexflow")


def method_knobs(
    name: str,
    *,
    lambda_adr: float = 10.0,
    lambda_fc: float = 1.0,
    rollout_steps: int = 1,
    num_sampling_steps: int = 20,
) -> dict[str, Any]:
    """ReflexFlowLoss knobs of method ``name``: shared rollout knobs, then the method's own.

    The ablations override one lambda: adr-only has lambda_fc = 0 (L = L_FM + lambda_adr
    L_ADR), fc-only has lambda_adr = 0 (L = L_FC).
    """
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    knobs: dict[str, Any] = {
        "rollout_steps": rollout_steps,
        "num_sampling_steps": num_sampling_steps,
        "lambda_adr": lambda_adr,
        "lambda_fc": lambda_fc,
    }
    knobs.update(METHODS[name])
    return knobs
