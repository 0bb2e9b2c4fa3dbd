"""The loss-kernel, rollout-engine and stable-target benchmarks: found where installed,
never faked.

A suite is a function ``fn(device: str, quick: bool) -> list[dict]`` (one dict per
measured row, JSON-serialisable values) living at one of the places listed in
:data:`SUITES`. ``reflexflow bench`` calls each suite it finds; one that is absent is
reported as "not present", one that raises as "failed: <error>".
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__all__ = ["SUITES", "find_suite", "run_suite", "format_rows"]

# suite -> candidate (module, function) places, first found wins
SUITES: dict[str, tuple[tuple[str, str], ...]] = {
    "loss": (
        ("reflexflow.kernels.bench", "run_loss_benchmark"),
        ("reflexflow.bench.loss", "run_loss_benchmark"),
    ),
    "rollout": (
        ("reflexflow.bench.rollout", "run_rollout_benchmark"),
        ("reflexflow.engine.bench", "run_rollout_benchmark"),
    ),
    "stable": (("reflexflow.bench.stable", "run_stable_benchmark"),),
}


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def find_suite(name: str) -> tuple[str, Any] | None:
    """("module:function", fn) of the first installed place of suite ``name``, or None."""
    if name not in SUITES:
        raise ValueError(f"name must be one of {tuple(SUITES)}, got {name!r}")
    for module, func in SUITES[name]:
        if not _module_exists(module):
            continue
        fn = getattr(importlib.import_module(module), func, None)
        if callable(fn):
            return f"{module}:{func}", fn
    return None


def run_suite(name: str, device: str, quick: bool) -> dict[str, Any]:
    """Run suite ``name``: {"status": "ok" | "not present" | "failed: ...", "source", "rows"}."""
    try:
        found = find_suite(name)
    except Exception as err:  # noqa: BLE001 - an installed suite that fails to import
        return {"status": f"failed: {type(err).__name__}: {err}", "source": None, "rows": []}
    if found is None:
        places = ", ".join(f"{m}:{f}" for m, f in SUITES[name])
        return {"status": "not present", "source": f"looked for {places}", "rows": []}
    source, fn = found
    try:
        rows = fn(device=device, quick=quick)
    except Exception as err:  # noqa: BLE001 - report the failure instead of a number
        return {"status": f"failed: {type(err).__name__}: {err}", "source": source, "rows": []}
    if isinstance(rows, dict) and "rows" in rows:
        rows = rows["rows"]
    return {"status": "ok", "source": source, "rows": list(rows)}


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain table of the keys of the first row (floats with 4 significant digits)."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
