"""Statistics over seeds that both studies' reports use: per-cell mean and spread, and
differences from a baseline paired by seed (seeds share data order, noise and
initialisation):

    d_s = score(method, seed s) - score(baseline, seed s),
    mean d +- t_{0.975, n-1} std(d) / sqrt(n)

Each study says what a run's scores are with ``values(run, N) -> {metric: value}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["T95", "seed_stats", "summarise_seeds", "paired_seed_differences"]

RunValues = Callable[[dict[str, Any], str], dict[str, float]]

# two-sided 95% Student t quantiles by degrees of freedom (1.96 beyond 30)
T95 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
    9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
    17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064,
    25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
}  # fmt: skip


def seed_stats(values: list[float]) -> dict[str, Any]:
    """{mean, std (ddof 1; 0 for one value), n, values} of one cell, in float64."""
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if len(values) > 1 else 0.0
    return {"mean": float(t.mean()), "std": std, "n": len(values), "values": values}


def summarise_seeds(
    runs: list[dict[str, Any]], eval_steps: tuple[int, ...], values: RunValues
) -> dict[str, Any]:
    """summary[method][N][metric] = seed_stats of values(run, N)[metric] over the method's
    runs (one a seed)."""
    cells: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs:
        for n in map(str, eval_steps):
            cell = cells.setdefault(run["method"], {}).setdefault(n, {})
            for metric, v in values(run, n).items():
                cell.setdefault(metric, []).append(v)
    return {
        m: {n: {k: seed_stats(v) for k, v in c.items()} for n, c in per.items()}
        for m, per in cells.items()
    }


def paired_seed_differences(
    runs: list[dict[str, Any]],
    eval_steps: tuple[int, ...],
    values: RunValues,
    baseline: str = "fm",
) -> dict[str, Any]:
    """out[method][N][metric] = seed_stats of d_s = method_s - baseline_s, plus
    ci95 = t_{0.975, n-1} std / sqrt(n) (NaN for n = 1).

    Only seeds present for both enter, and only metrics both runs of a seed have (in the
    method's order); empty when the baseline did not run."""
    by_key = {(r["method"], r["seed"]): r for r in runs}
    base_seeds = [r["seed"] for r in runs if r["method"] == baseline]
    out: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        seeds = [s for s in base_seeds if (method, s) in by_key]
        if method == baseline or not seeds:
            continue
        out[method] = {}
        for n in map(str, eval_steps):
            diffs: dict[str, list[float]] = {}
            for s in seeds:
                a, b = values(by_key[(method, s)], n), values(by_key[(baseline, s)], n)
                for metric in (k for k in a if k in b):
                    diffs.setdefault(metric, []).append(a[metric] - b[metric])
            out[method][n] = {metric: _with_ci95(d) for metric, d in diffs.items()}
    return out


def _with_ci95(diffs: list[float]) -> dict[str, Any]:
    s = seed_stats(diffs)
    n = s["n"]
    s["ci95"] = T95.get(n - 1, 1.96) * s["std"] / math.sqrt(n) if n > 1 else math.nan
    return s
