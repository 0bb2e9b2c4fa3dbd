"""The methods of the study and their ReflexFlowLoss knobs (docs/method.md sections 3, 5 and 6).

Two kinds of rows:

* the digits study's rows (fm, ip, ss, and gd-direction, gd-mse, gd-adr-only,
  gd-adr-only-mse, gd-fc-only) take the demo's shared knobs (``--lambda-adr``,
  ``--lambda-fc``, ``--rollout-steps``, ``--train-sampling-steps``) and then their own.
  They were defined on the library's earlier default, the ``grid-direction`` preset, and
  pin ``preset="grid-direction"`` (hence ``gd-``); with the shared defaults they differ
  from that preset only in the rollout step h = 1/20 (the preset's is 1/50);
* ``reflexflow`` is the library's default preset (presets.DEFAULT_PRESET, ``defar``);
  preset rows (defar, arioso, simpletuner, grid-direction) and stable-target rows
  (fm-stable, defar-stable) are complete on their own: ReflexFlowLoss(preset=...) or
  ReflexFlowLoss(method=..., target="stable") with the library's values, untouched by the
  shared knobs. ``fm-equal-compute``, ``fm-long`` and ``reflexflow-long`` are fm and the
  default trained longer (ROW_STEPS; the oracle study).

Any row takes per-row overrides written ``name:knob=value[:knob=value...]``, e.g.
``defar:lambda_adr=0.5`` (a separate row of the table, for sweeps on the validation split).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from ..presets import DEFAULT_PRESET

__all__ = [
    "METHODS",
    "SHARED_KNOB_METHODS",
    "DEFAULT_METHODS",
    "TOY_METHODS",
    "QUICK_METHODS",
    "PHOTO_METHODS",
    "PHOTO_QUICK_METHODS",
    "STABLE_REF",
    "ROW_STEPS",
    "ORACLE_METHODS",
    "ORACLE_QUICK_METHODS",
    "LEGACY_PRESET",
    "method_knobs",
    "parse_method",
    "check_method",
]

STABLE_REF = 256  # stable-target rows: samples of recent batches kept as extra references
LEGACY_PRESET = "grid-direction"  # the reading the digits rows were defined with

# name -> knobs of ReflexFlowLoss (for SHARED_KNOB_METHODS on top of the shared ones)
METHODS: dict[str, dict[str, Any]] = {
    "fm": {"method": "fm"},
    "ip": {"method": "ip"},
    "ss": {"method": "ss"},
    # the digits study's rows: grid-direction with the shared knobs (module docstring)
    "gd-direction": {"method": "reflexflow", "adr_loss": "direction"},
    "gd-mse": {"method": "reflexflow", "adr_loss": "mse"},
    "gd-adr-only": {"method": "reflexflow", "adr_loss": "direction", "lambda_fc": 0.0},
    "gd-adr-only-mse": {"method": "reflexflow", "adr_loss": "mse", "lambda_fc": 0.0},
    "gd-fc-only": {"method": "reflexflow", "lambda_adr": 0.0},
    # the library's default preset, and fm / the default trained longer (ROW_STEPS)
    "reflexflow": {"preset": DEFAULT_PRESET},
    "fm-equal-compute": {"method": "fm"},
    "fm-long": {"method": "fm"},
    "reflexflow-long": {"preset": DEFAULT_PRESET},
    # the default without its near-t = 1 remedy (mse ADR rows weighted as before)
    "reflexflow-no-remedy": {"preset": DEFAULT_PRESET, "adr_x1_from": None},
    # the library's presets (docs/method.md section 3, "The public readings")
    "defar": {"preset": "defar"},
    "arioso": {"preset": "arioso"},
    "simpletuner": {"preset": "simpletuner"},
    "grid-direction": {"preset": "grid-direction"},
    "takenoko": {"preset": "takenoko"},
    # stable (posterior-weighted) targets, without and with ADR (docs/method.md section 3)
    "fm-stable": {"method": "fm", "target": "stable", "stable_ref": STABLE_REF},
    "defar-stable": {"preset": "defar", "target": "stable", "stable_ref": STABLE_REF},
}
SHARED_KNOB_METHODS = (
    "fm",
    "ip",
    "ss",
    "fm-equal-compute",
    "fm-long",
    "gd-direction",
    "gd-mse",
    "gd-adr-only",
    "gd-adr-only-mse",
    "gd-fc-only",
)
DIGITS_METHODS = (
    "fm",
    "fm-equal-compute",
    "ip",
    "ss",
    "gd-direction",
    "gd-mse",
    "gd-adr-only",
    "gd-fc-only",
)
DEFAULT_METHODS = DIGITS_METHODS  # the 8 digits rows
TOY_METHODS = ("fm", "ss", "gd-adr-only", "gd-adr-only-mse")
QUICK_METHODS = ("fm", "ss", "gd-direction")
# row -> its training length: "equal-compute" (steps x the measured cost ratio of the
# default preset over fm) or "long" (steps x long_factor); other rows train ``steps``
ROW_STEPS = {"fm-equal-compute": "equal-compute", "fm-long": "long", "reflexflow-long": "long"}
ORACLE_METHODS = (
    "fm",
    "fm-equal-compute",
    "reflexflow",
    "reflexflow-no-remedy",
    "arioso",
    "simpletuner",
    "takenoko",
    "grid-direction",
    "ss",
    "ip",
    "fm-stable",
    "defar-stable",
    "fm-long",
    "reflexflow-long",
)
ORACLE_QUICK_METHODS = ("fm", "reflexflow", "fm-long")
PHOTO_METHODS = (
    "fm",
    "fm-equal-compute",
    "ip",
    "ss",
    "defar",
    "arioso",
    "simpletuner",
    "grid-direction",
    "fm-stable",
    "defar-stable",
)
PHOTO_QUICK_METHODS = ("fm", "defar", "defar-stable")


def _value(text: str) -> Any:
    """A knob value from text: int, float, true / false, none, else the string itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"knob values must be finite, got {text!r}")
        return value
    return text


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """'defar:lambda_adr=0.5:adr_loss=mse' -> ('defar', {'lambda_adr': 0.5, 'adr_loss': 'mse'})."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a method must be a non-empty string, got {spec!r}")
    name, *parts = spec.split(":")
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r} (in {spec!r})")
    overrides: dict[str, Any] = {}
    for part in parts:
        knob, sep, text = part.partition("=")
        if not sep or not knob.isidentifier() or not text:
            raise ValueError(f"method overrides must read knob=value, got {part!r} in {spec!r}")
        if knob in overrides:
            raise ValueError(f"knob {knob!r} is given twice in {spec!r}")
        overrides[knob] = _value(text)
    return name, overrides


def method_knobs(
    name: str,
    *,
    lambda_adr: float = 10.0,
    lambda_fc: float = 1.0,
    rollout_steps: int = 1,
    num_sampling_steps: int = 20,
) -> dict[str, Any]:
    """ReflexFlowLoss knobs of method ``name`` (a row name, overrides allowed).

    Digits rows: LEGACY_PRESET where the loss has presets, the shared rollout knobs and
    lambdas, then the row's own (the ablations override one lambda: adr-only has
    lambda_fc = 0, fc-only lambda_adr = 0). Preset and stable rows: their own knobs only.
    Then the row's ``:knob=value`` overrides.
    """
    base, overrides = parse_method(name)
    knobs: dict[str, Any] = {}
    if base in SHARED_KNOB_METHODS:
        if _loss_has_presets():
            knobs["preset"] = LEGACY_PRESET
        knobs.update(
            rollout_steps=rollout_steps,
            num_sampling_steps=num_sampling_steps,
            lambda_adr=lambda_adr,
            lambda_fc=lambda_fc,
        )
    knobs.update(METHODS[base])
    knobs.update(overrides)
    return knobs


def _loss_has_presets() -> bool:
    """Whether the installed ReflexFlowConfig has a ``preset`` field."""
    import dataclasses

    from ..config import ReflexFlowConfig

    return "preset" in {f.name for f in dataclasses.fields(ReflexFlowConfig)}


def _accepted_knobs() -> set[str]:
    """Keyword names in the signatures of ReflexFlowLoss and ReflexFlowConfig."""
    from ..config import ReflexFlowConfig
    from ..loss import ReflexFlowLoss

    names: set[str] = set()
    for fn in (ReflexFlowLoss.__init__, ReflexFlowConfig.__init__):
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.add(p.name)
    return names - {"self"}


def _used_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    """``knobs`` without those the row's configuration never reads (the study passes its
    shared knobs to every row: fm has no rollout to take rollout_steps), so the library's
    ignored-knob warning is kept for users' own mistakes."""
    import warnings

    from ..config import ReflexFlowConfig
    from ..config_checks import ignored_knobs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ignored = ignored_knobs(ReflexFlowConfig(**knobs))
    return {k: v for k, v in knobs.items() if k not in ignored}


def check_method(name: str, knobs: dict[str, Any]) -> Any:
    """Build ReflexFlowLoss(**knobs) for row ``name``; a clear ValueError if it cannot.

    When the loss rejects a keyword, names the knobs the installed reflexflow lacks (e.g.
    ``preset`` or ``target`` before the presets and stable targets landed); otherwise passes
    on the loss's own validation message.
    """
    from .. import __version__
    from ..loss import ReflexFlowLoss

    try:
        return ReflexFlowLoss(**_used_knobs(knobs))
    except TypeError as err:
        missing = sorted(set(knobs) - _accepted_knobs())
        if missing and "keyword" in str(err):
            knob_list = ", ".join(f"{k}=..." for k in missing)
            raise ValueError(
                f"method {name!r} needs ReflexFlowLoss({knob_list}), which the installed "
                f"reflexflow {__version__} does not accept ({err}); choose other methods"
            ) from err
        raise ValueError(f"method {name!r}: ReflexFlowLoss(**{knobs}) failed: {err}") from err
    except ValueError as err:
        raise ValueError(f"method {name!r}: ReflexFlowLoss(**{knobs}) failed: {err}") from err
