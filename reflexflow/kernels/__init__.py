"""Fused Triton kernels (reflexflow.kernels), imported lazily: importing reflexflow never
imports triton. See kernels/README.md and benchmarks/README.md ("Loss kernels")."""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

__all__ = [
    "triton_available",
    "triton_usable",
    "supports",
    "fused_objective",
    "fused_objective_auto",
    "is_out_of_memory",
    "note_failure",
]

_FAILED: list[str] = []  # the first failure of the Triton path under backend="auto"


def triton_available() -> bool:
    """True when the triton package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_usable(device_type: str) -> bool:
    """True when Triton can run kernels on tensors of ``device_type``.

    CUDA needs triton; other devices only run under Triton's interpreter
    (environment variable TRITON_INTERPRET=1, set before triton is imported).
    """
    if not triton_available():
        return False
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation failure (torch.OutOfMemoryError, a CUDA "out of memory"): never a
    reason to leave the kernels, as the reference needs more memory still."""
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def note_failure(err: BaseException, stacklevel: int = 2) -> None:
    """Record the Triton path's failure under backend="auto": one RuntimeWarning, and
    fused_objective_auto uses the reference from now on."""
    if not _FAILED:
        warnings.warn(
            f"reflexflow: the Triton loss kernels failed ({err!r}); backend='auto' uses "
            "the PyTorch reference from now on (backend='triton' shows the error)",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
    _FAILED.append(repr(err))


# ---------------------------------------------------------------------------------------
# TEMPORARY ADAPTER (branch `loss`; the lead deletes this block at merge, when kernels/
# takes the typed contract itself). It maps the typed contract of reflexflow.objective
# (ObjectiveSpec, ObjectiveInputs -> ObjectiveTerms) onto today's keyword kernels and back.
# The typed wrappers also accept the legacy keyword form, for the kernels' own tests.
# ---------------------------------------------------------------------------------------


def _typed_to_legacy(spec: Any, inputs: Any) -> dict:
    """The keyword arguments of the legacy kernels for (spec, inputs)."""
    import dataclasses

    fc = spec.fc
    kw = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}
    kw.update(
        lambda_adr=spec.lambda_adr,
        lambda_fc=fc.lambda_fc,
        adr_loss=spec.adr_loss,
        per_channel=fc.per_channel,
        fc_signed=fc.signed,
        fc_form=fc.form,
        fc_filter=fc.filter,
        fc_sigma=fc.sigma,
        fc_size=fc.size,
        fc_cutoff=fc.cutoff,
        norm_eps=spec.norm_eps,
        norm_floor=spec.norm_floor,
    )
    return kw


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


def _legacy_to_typed(kw: dict) -> tuple[Any, Any]:
    """(spec, inputs) for the legacy keyword arguments of reference.objective."""
    from ..objective import ObjectiveInputs, ObjectiveSpec

    kw = dict(kw)
    spec_kw = {_SPEC_KEYS[k]: kw.pop(k) for k in list(kw) if k in _SPEC_KEYS}
    return ObjectiveSpec().replace(**spec_kw), ObjectiveInputs(**kw)


def _terms_to_legacy(terms: Any) -> dict:
    """An ObjectiveTerms as the legacy string-keyed dict."""
    from ..objective import TERM_NAMES

    return {name: getattr(terms, name) for name in TERM_NAMES}


def _legacy_to_terms(out: dict) -> Any:
    from ..objective import ObjectiveTerms

    return ObjectiveTerms(**out)


def _legacy_reference(path: Any, **kw: Any) -> dict:
    """reference.objective called with the legacy keywords, returning the legacy dict."""
    from ..reference import objective

    return _terms_to_legacy(objective(path, *_legacy_to_typed(kw)))


def supports(path: Any = None, spec: Any = None, inputs: Any = None, **legacy: Any) -> bool:
    """True when the fused kernels compute ``reference.objective(path, spec, inputs)``
    (see kernels.objective.supports); route False to the reference."""
    if not triton_available():
        return False
    from .objective import supports as impl

    return impl(**legacy) if spec is None else impl(**_typed_to_legacy(spec, inputs))


def fused_objective(path: Any, spec: Any = None, inputs: Any = None, **kw: Any) -> Any:
    """Triton twin of reflexflow.reference.objective (see kernels.objective): typed
    (path, spec, inputs, *, return_w=True) -> ObjectiveTerms, or the legacy keywords -> dict."""
    from .objective import fused_objective as impl

    if spec is None:
        return impl(path, **kw)
    return _legacy_to_terms(impl(path, **_typed_to_legacy(spec, inputs), **kw))


def fused_objective_auto(path: Any, spec: Any = None, inputs: Any = None, **kw: Any) -> Any:
    """backend="auto": fused_objective, or reference.objective once the Triton path has
    failed to compile or launch on this machine, forward or backward (one warning, then
    the reference for the rest of the process). Errors about the arguments (ValueError,
    TypeError) and out-of-memory errors propagate. Typed or legacy form, as
    :func:`fused_objective`."""
    if spec is not None:
        return _legacy_to_terms(_fused_objective_auto(path, **_typed_to_legacy(spec, inputs), **kw))
    return _fused_objective_auto(path, **kw)


# --------------------------------- end of the temporary adapter ------------------------


def _fused_objective_auto(path: Any, **kwargs: Any) -> dict:
    """fused_objective_auto on the legacy keywords."""
    return_w = kwargs.pop("return_w", True)
    if not _FAILED:
        try:
            from .objective import fused_objective_soft

            return fused_objective_soft(path, return_w=return_w, **kwargs)
        except (ValueError, TypeError):
            raise
        except Exception as err:  # a Triton compile/launch failure: fail soft
            if is_out_of_memory(err):
                raise
            note_failure(err, stacklevel=2)
    return _legacy_reference(path, **kwargs)
