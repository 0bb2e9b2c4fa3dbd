"""MERGE ADAPTER (delete at merge): the keyword form of the objective <-> the typed one.

Until ``reference.objective(path, spec, inputs)`` and the typed loss land (parallel
branches), three callers still speak the keyword form ``objective(path, v0=..., x1=...,
lambda_adr=..., fc_filter=..., ...)`` and expect a dict back: reflexflow/loss.py,
reflexflow/bench/loss.py and kernels/compile_check.py. This module is the only place
that translates; delete it (and its uses in kernels/__init__.py and
kernels/objective.reference_objective) once every caller uses the typed API.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from ..objective import FCSpec, ObjectiveInputs, ObjectiveSpec, ObjectiveTerms

__all__ = ["from_keywords", "to_keywords", "terms_to_dict", "reference_objective"]

_INPUTS = tuple(f.name for f in dataclasses.fields(ObjectiveInputs))
_TERMS = tuple(f.name for f in dataclasses.fields(ObjectiveTerms))
# keyword of reference.objective -> FCSpec field
_FC = dict(
    lambda_fc="lambda_fc",
    fc_filter="filter",
    fc_sigma="sigma",
    fc_size="size",
    fc_cutoff="cutoff",
    per_channel="per_channel",
    fc_signed="signed",
    fc_form="form",
)
_SPEC = ("lambda_adr", "adr_loss", "norm_eps", "norm_floor")


def from_keywords(kwargs: dict[str, Any]) -> tuple[ObjectiveSpec, ObjectiveInputs]:
    """(spec, inputs) of a keyword call of reference.objective (TypeError on unknown)."""
    unknown = set(kwargs) - set(_INPUTS) - set(_FC) - set(_SPEC)
    if unknown:
        raise TypeError(f"unexpected objective argument(s) {sorted(unknown)}")
    fc = FCSpec(**{_FC[k]: v for k, v in kwargs.items() if k in _FC})
    spec = ObjectiveSpec(fc=fc, **{k: v for k, v in kwargs.items() if k in _SPEC})
    return spec, ObjectiveInputs(**{k: v for k, v in kwargs.items() if k in _INPUTS})


def to_keywords(spec: ObjectiveSpec, inputs: ObjectiveInputs) -> dict[str, Any]:
    """The keyword arguments of today's reference.objective for (spec, inputs)."""
    kw = {name: getattr(inputs, name) for name in _INPUTS}
    kw.update({name: getattr(spec, name) for name in _SPEC})
    kw.update({key: getattr(spec.fc, name) for key, name in _FC.items()})
    return kw


def terms_to_dict(terms: ObjectiveTerms) -> dict[str, Any]:
    """The dict today's keyword callers read (loss, fc_loss, adr_loss, per_sample, w, ...)."""
    return {name: getattr(terms, name) for name in _TERMS}


def reference_objective(path: Any, spec: ObjectiveSpec, inputs: ObjectiveInputs) -> ObjectiveTerms:
    """reference.objective(path, spec, inputs), on the typed reference once it lands and
    on today's keyword reference until then."""
    from .. import reference as ref

    if "spec" in inspect.signature(ref.objective).parameters:
        return ref.objective(path, spec, inputs)
    out = ref.objective(path, **to_keywords(spec, inputs))
    return ObjectiveTerms(**{name: out.get(name) for name in _TERMS})
