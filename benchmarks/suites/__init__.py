"""The suites of ``reflexflow bench`` beyond the training step: loss kernels, rollout
engine, stable targets.

A suite is a function ``fn(device: str, quick: bool) -> list[dict]`` (one dict per
measured row, JSON-serialisable values) in this package, listed in :data:`SUITES`.
``reflexflow bench`` runs each; one that raises is reported as "failed: <error>", never
replaced by a number.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SUITES", "find_suite", "run_suite", "format_rows"]

# suite -> (module, function); every module listed here exists (a test imports each)
SUITES: dict[str, tuple[str, str]] = {
    "loss": ("benchmarks.suites.loss", "run_loss_benchmark"),
    "rollout": ("benchmarks.suites.rollout", "run_rollout_benchmark"),
    "stable": ("benchmarks.suites.stable", "run_stable_benchmark"),
}


def find_suite(name: str) -> tuple[str, Any]:
    """("module:function", fn) of suite ``name``; raises if it cannot be imported."""
    if name not in SUITES:
        raise ValueError(f"name must be one of {tuple(SUITES)}, got {name!r}")
    module, func = SUITES[name]
    fn = getattr(importlib.import_module(module), func, None)
    if not callable(fn):
        raise AttributeError(f"{module} has no function {func!r}")
    return f"{module}:{func}", fn


def run_suite(name: str, device: str, quick: bool) -> dict[str, Any]:
    """Run suite ``name``: {"status": "ok" | "failed: ...", "source", "rows"}."""
    source = "{}:{}".format(*SUITES[name]) if name in SUITES else None
    try:
        source, fn = find_suite(name)
    except Exception as err:  # noqa: BLE001 - a suite that fails to import: reported
        return {"status": f"failed: {type(err).__name__}: {err}", "source": source, "rows": []}
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
