"""TEMPORARY test-side adapter (branch `loss`): the kernel tests still call
reference.objective with the legacy keywords and read a string-keyed dict. This maps that
form onto the typed contract (reflexflow.objective). The kernels engineer's typed tests
replace it; delete it then."""

from __future__ import annotations

from typing import Any

from reflexflow import reference as ref
from reflexflow.objective import TERM_NAMES, ObjectiveInputs, ObjectiveSpec

_SPEC_KEYS = {
    "lambda_adr": "lambda_adr",
    "adr_loss": "adr_loss",
    "norm_eps": "norm_eps",
    "norm_floor": "norm_floor",
    "lambda_fc": "fc_lambda_fc",
    "per_channel": "fc_per_channel",
    "fc_signed": "fc_signed",
    "fc_form": "fc_form",
    "fc_filter": "fc_filter",
    "fc_sigma": "fc_sigma",
    "fc_size": "fc_size",
    "fc_cutoff": "fc_cutoff",
}


def legacy_objective(path: Any, **kw: Any) -> dict:
    """reference.objective(path, spec, inputs) called with the legacy keywords, as a dict."""
    spec_kw = {_SPEC_KEYS[k]: kw.pop(k) for k in list(kw) if k in _SPEC_KEYS}
    terms = ref.objective(path, ObjectiveSpec().replace(**spec_kw), ObjectiveInputs(**kw))
    return {name: getattr(terms, name) for name in TERM_NAMES}
