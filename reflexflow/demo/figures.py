"""The study's pictures, drawn from results.json alone (except the sample grids).

Rules every figure follows: one colour, marker and line style per method, the same in
every figure (fm black); legends outside the axes (right of the panels); log scales where
values span decades; where curves lie on top of each other, a panel of differences from fm.

    exposure-bias.png   top: E||x^_t1 - x_t1||^2 over t0 per N (log); bottom: paired
                        relative difference from fm in %, mean over seeds
    loss-curves.png     per-term training losses (log): the FM-type term, the direction
                        ADR term and the mse ADR term (unweighted), with a note on the last
    differences.png     method - fm per metric and N, paired over seeds, 95% intervals
    spectrum.png        (photos) radial power spectra of samples vs held-out data, and their
                        ratio per N with the low band shaded
    samples-*.png       sample grids: one row per N (photos in colour, digits inverted grey)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .report import GOAL_WORDS, METRICS, diff_metrics, paired_differences
from .spectrum import LOW_CUTOFF

__all__ = ["write_curve_figures", "samples_png", "method_styles", "MSE_ADR_NOTE"]

DPI = 100
MSE_ADR_NOTE = (
    "mse ADR term = mean ||v(x^_t1, t1) - v_adr||^2, v_adr = u_t1 + delta / (1 - t1) on the "
    "linear path. Its floor is the spread of v_adr given the biased input x^_t1, about "
    "|delta|^2 / (1 - t1)^2, which grows without bound as t1 nears 1. Its high, jagged level "
    "is the noise of that target, driven by the few rollouts that end near t = 1; it is not "
    "divergence (the FM-type term of the same runs falls normally)."
)
_COLORS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#17becf", "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a",
]  # fmt: skip
_MARKERS = ["o", "s", "^", "v", "D", "P", "X", "<", ">", "*", "h", "p", "d"]


def method_styles(methods: list[str]) -> dict[str, dict[str, Any]]:
    """Line style per method: fm black with circles, the others a colour and marker each."""
    styles: dict[str, dict[str, Any]] = {}
    i = 0
    for m in methods:
        if m == "fm":
            styles[m] = {"color": "black", "marker": "o", "linestyle": "-"}
            continue
        styles[m] = {
            "color": _COLORS[i % len(_COLORS)],
            "marker": _MARKERS[i % len(_MARKERS)],
            "linestyle": "-" if i < len(_COLORS) else "--",
        }
        i += 1
    return styles


def _methods(cfg: Any, results: dict[str, Any]) -> list[str]:
    ran = {r["method"] for r in results["runs"]}
    return [m for m in cfg.methods if m in ran]


def _legend(
    fig: Any, axes: list[Any], extra: list[tuple[Any, str]] = (), panel: Any = None
) -> None:
    """One legend for the figure: in ``panel`` (an empty axis) if given, else right of
    every panel; never on the data."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    for h, lab in extra:
        handles.append(h)
        labels.append(lab)
    if panel is not None:
        panel.legend(handles, labels, loc="center", fontsize=8, frameon=False)
        return
    fig.legend(
        handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False
    )


def _save(fig: Any, plt: Any, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _nan(values: list[Any]) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


@dataclass(frozen=True)
class _FigureContext:
    """What every curve figure draws from: matplotlib's pyplot, results.json, the study's
    config, the methods that ran (in the config's order) and their line styles."""

    plt: Any
    results: dict[str, Any]
    cfg: Any
    methods: list[str]
    styles: dict[str, dict[str, Any]]


def write_curve_figures(plt: Any, out: Path, cfg: Any, results: dict[str, Any]) -> None:
    """exposure-bias.png, loss-curves.png, differences.png and (photos) spectrum.png."""
    methods = _methods(cfg, results)
    ctx = _FigureContext(plt, results, cfg, methods, method_styles(methods))
    _bias_png(ctx, out / "exposure-bias.png")
    _loss_png(ctx, out / "loss-curves.png")
    _differences_png(ctx, out / "differences.png")
    if any("spectra" in r for r in results["runs"]):
        _spectrum_png(ctx, out / "spectrum.png")


def _bias_png(ctx: _FigureContext, path: Path) -> None:
    steps = [str(n) for n in ctx.cfg.eval_steps]
    has_fm = "fm" in ctx.methods and len(ctx.methods) > 1
    rows = 2 if has_fm else 1
    fig, axes = ctx.plt.subplots(
        rows,
        len(steps),
        figsize=(3.4 * len(steps), 2.8 * rows + 0.3),
        squeeze=False,
        sharex="col",
    )
    by = {(r["method"], r["seed"]): r for r in ctx.results["runs"]}
    for j, n in enumerate(steps):
        ax = axes[0][j]
        ub = ctx.results["untrained_bias"][n]
        for m in ctx.methods:
            curves = [r["bias"][n] for r in ctx.results["runs"] if r["method"] == m]
            mse = torch.tensor([c["mse"] for c in curves], dtype=torch.float64).mean(0)
            ax.plot(curves[0]["t0"], mse.numpy(), label=m, lw=1.3, ms=4, **ctx.styles[m])
        ax.plot(ub["t0"], ub["mse"], color="0.5", ls=":", lw=1.2, label="untrained model")
        ax.set_yscale("log")
        ax.set_title(f"N = {n} (h = 1/{n}), k = {ub['k']} steps", fontsize=9)
        if j == 0:
            ax.set_ylabel("E ||x^_t1 - x_t1||^2 (log)")
        if has_fm:
            ax2 = axes[1][j]
            ax2.axhline(0, color="black", lw=1, label="fm")
            for m in ctx.methods:
                if m == "fm":
                    continue
                rel = []
                for s in ctx.cfg.seeds:
                    if (m, s) in by and ("fm", s) in by:
                        a = torch.tensor(by[(m, s)]["bias"][n]["mse"], dtype=torch.float64)
                        b = torch.tensor(by[("fm", s)]["bias"][n]["mse"], dtype=torch.float64)
                        rel.append(100 * (a / b - 1))
                if rel:
                    mean = torch.stack(rel).mean(0)
                    t0 = (
                        by[(m, ctx.cfg.seeds[0])]["bias"][n]["t0"]
                        if (m, ctx.cfg.seeds[0]) in by
                        else None
                    )
                    if t0 is not None:
                        ax2.plot(t0, mean.numpy(), lw=1.3, ms=4, label=m, **ctx.styles[m])
            ax2.set_xlabel("rollout start t0")
            if j == 0:
                ax2.set_ylabel("difference from fm (%)\npaired by seed, mean")
        else:
            ax.set_xlabel("rollout start t0")
    fig.suptitle("Exposure bias from clean held-out states: k Euler steps of h = 1/N", fontsize=10)
    fig.tight_layout()
    _legend(fig, list(axes.flat))
    _save(fig, ctx.plt, path)


def _term_curves(results: dict[str, Any], method: str, term: str) -> Tensor | None:
    curves = [
        _nan(r["term_curves"][term])
        for r in results["runs"]
        if r["method"] == method and "term_curves" in r
    ]
    if not curves:
        return None
    n = min(len(c) for c in curves)
    t = torch.tensor([c[:n] for c in curves], dtype=torch.float64).mean(0)
    return None if not torch.isfinite(t).any() else t


def _adr_kind(results: dict[str, Any], method: str) -> str:
    run = next(r for r in results["runs"] if r["method"] == method)
    lc = run.get("loss_config") or run.get("knobs") or {}
    return lc.get("adr_loss", "direction")


def _loss_png(ctx: _FigureContext, path: Path) -> None:
    steps = ctx.results["config"]["steps"]
    has_terms = all("term_curves" in r for r in ctx.results["runs"])
    if not has_terms:  # results written before per-term curves were recorded
        fig, ax = ctx.plt.subplots(figsize=(5.5, 3.4))
        for m in ctx.methods:
            curves = [r["loss_curve"] for r in ctx.results["runs"] if r["method"] == m]
            n = min(len(c) for c in curves)
            mean = torch.tensor([c[:n] for c in curves], dtype=torch.float64).mean(0)
            ax.plot(
                torch.linspace(0, steps, n).numpy(),
                mean.numpy(),
                lw=1,
                label=m,
                **_line(ctx.styles[m]),
            )
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (mean over seeds, log)")
        ax.set_title("each method's whole objective (no per-term record)", fontsize=9)
        fig.tight_layout()
        if any(_adr_kind(ctx.results, m) == "mse" for m in ctx.methods if _has_adr(ctx.results, m)):
            _note(
                fig,
                "With mse ADR the objective adds lambda_adr x the mse ADR term. " + MSE_ADR_NOTE,
                width=95,
            )
        _legend(fig, [ax])
        _save(fig, ctx.plt, path)
        return
    panels = [("fm_term", None, "FM-type term (x (1 + lambda_fc) on average where FC is on)")]
    kinds = {
        m: _adr_kind(ctx.results, m)
        for m in ctx.methods
        if _term_curves(ctx.results, m, "adr_term") is not None
    }
    if any(k == "direction" for k in kinds.values()):
        panels.append(("adr_term", "direction", "ADR term, direction loss (unweighted, in [0, 4])"))
    if any(k == "mse" for k in kinds.values()):
        panels.append(("adr_term", "mse", "ADR term, mse loss (unweighted): see the note"))
    fig, axes = ctx.plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (term, kind, title) in zip(axes[0], panels, strict=True):
        for m in ctx.methods:
            if kind is not None and kinds.get(m) != kind:
                continue
            t = _term_curves(ctx.results, m, term)
            if t is None:
                continue
            x = torch.linspace(0, steps, t.shape[0]).numpy()
            ax.plot(x, t.numpy(), lw=1, label=m, **_line(ctx.styles[m]))
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("mean over seeds (log)")
    fig.suptitle(
        "Training losses per term (each point: the mean over a window of steps)", fontsize=10
    )
    fig.tight_layout()
    if any(kind == "mse" for _, kind, _ in panels):
        _note(fig, MSE_ADR_NOTE, width=60 * len(panels))
    _legend(fig, list(axes.flat))
    _save(fig, ctx.plt, path)


def _note(fig: Any, text: str, width: int) -> None:
    """A wrapped note under the panels (bbox_inches='tight' keeps it in the picture)."""
    import textwrap

    fig.text(0.01, -0.01, "\n".join(textwrap.wrap(text, width)), fontsize=7.5, va="top")


def _has_adr(results: dict[str, Any], method: str) -> bool:
    """Whether the row's loss has an ADR term (lambda_adr > 0 in a reflexflow method)."""
    run = next(r for r in results["runs"] if r["method"] == method)
    lc = run.get("loss_config") or run.get("knobs") or {}
    return lc.get("method") == "reflexflow" and float(lc.get("lambda_adr", 0) or 0) > 0


def _line(style: dict[str, Any]) -> dict[str, Any]:
    """A style without markers (dense loss curves)."""
    return {k: v for k, v in style.items() if k != "marker"}


def _differences_png(ctx: _FigureContext, path: Path) -> None:
    steps = tuple(ctx.cfg.eval_steps)
    vs = paired_differences(ctx.results["runs"], steps)
    metrics = [
        m
        for m in diff_metrics(ctx.cfg.dataset)
        if vs and m in next(iter(vs.values()))[str(steps[0])]
    ]
    cols = min(3, max(1, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = ctx.plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows + 0.3), squeeze=False)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_axis_off()
    if not metrics:
        axes[0][0].text(0.5, 0.5, "needs fm and another method", ha="center", va="center")
        axes[0][0].set_axis_off()
        _save(fig, ctx.plt, path)
        return
    others = [m for m in ctx.methods if m in vs]
    width = 0.8 / max(1, len(others))
    for ax, metric in zip(list(axes.flat)[: len(metrics)], metrics, strict=True):
        ax.axhline(0, color="black", lw=1, label="fm (0)")
        for i, m in enumerate(others):
            xs, ys, es = [], [], []
            for j, n in enumerate(steps):
                d = vs[m][str(n)][metric]
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(d["mean"])
                es.append(d["ci95"] if math.isfinite(d["ci95"]) else 0.0)
            st = ctx.styles[m]
            ax.errorbar(
                xs, ys, yerr=es, fmt=st["marker"], color=st["color"], ms=4, capsize=2, lw=1, label=m
            )
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels([f"{n} steps" for n in steps])
        for j in range(1, len(steps)):
            ax.axvline(j - 0.5, color="0.85", lw=0.8)
        ax.set_title(f"{metric} − fm ({GOAL_WORDS[METRICS[metric][1]]})", fontsize=9)
    n_seeds = len(ctx.cfg.seeds)
    fig.suptitle(
        f"Difference from fm, paired by seed: mean and 95% interval over {n_seeds} seeds",
        fontsize=10,
    )
    fig.tight_layout()
    spare = list(axes.flat)[len(metrics) :]
    _legend(fig, list(axes.flat)[: len(metrics)], panel=spare[0] if spare else None)
    _save(fig, ctx.plt, path)


def _spectrum_png(ctx: _FigureContext, path: Path) -> None:
    steps = [str(n) for n in ctx.cfg.eval_steps]
    data = ctx.results.get("data_spectrum")
    if data is None:
        return
    data_t = torch.tensor(data, dtype=torch.float64)
    bins = data_t.shape[0]
    size = 2 * bins
    freq = (torch.arange(1, bins + 1, dtype=torch.float64) / size).numpy()  # cycles / pixel
    cut = LOW_CUTOFF * 0.5
    fig, axes = ctx.plt.subplots(
        1, len(steps) + 1, figsize=(3.4 * (len(steps) + 1), 3.3), squeeze=False
    )
    ax0 = axes[0][0]
    ax0.axvspan(0, cut, color="0.9")
    ax0.set_xlim(0, 0.52)
    ax0.plot(freq, data_t.numpy(), color="0.4", lw=2.5, label="held-out data")

    def mean_spec(m: str, n: str) -> Tensor:
        specs = [
            r["spectra"][n] for r in ctx.results["runs"] if r["method"] == m and "spectra" in r
        ]
        return torch.tensor(specs, dtype=torch.float64).log().mean(0).exp()

    for m in ctx.methods:
        ax0.plot(freq, mean_spec(m, steps[0]).numpy(), lw=1, ms=3, label=m, **ctx.styles[m])
    ax0.set_yscale("log")
    ax0.set_xlabel("frequency (cycles / pixel)")
    ax0.set_ylabel("power P(r) (log)")
    ax0.set_title(f"radial power spectrum, N = {steps[0]}", fontsize=9)
    for ax, n in zip(axes[0][1:], steps, strict=True):
        ax.axvspan(0, cut, color="0.9", label=f"low band (<= {LOW_CUTOFF:g} x Nyquist)")
        ax.axhline(1, color="0.4", lw=2.5)
        for m in ctx.methods:
            ax.plot(freq, (mean_spec(m, n) / data_t).numpy(), lw=1, ms=3, **ctx.styles[m])
        ax.set_yscale("log")
        ax.set_xlim(0, 0.52)
        ax.set_xlabel("frequency (cycles / pixel)")
        ax.set_title(f"samples / data, N = {n}", fontsize=9)
    axes[0][1].set_ylabel("power ratio (log; 1 = data)")
    fig.suptitle(
        "Power spectra of samples against held-out crops (geometric mean over seeds)", fontsize=10
    )
    fig.tight_layout()
    _legend(fig, list(axes.flat))
    _save(fig, ctx.plt, path)


def _tile_row(x: Tensor, gap: int = 1) -> Tensor:
    """(n, C, S, S) in [-1, 1] -> one (S, n (S + gap) - gap, C) row of images in [0, 1]."""
    x = ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    n, s, _, c = x.shape
    row = torch.ones(s, n * (s + gap) - gap, c)
    for i in range(n):
        row[:, i * (s + gap) : i * (s + gap) + s] = x[i]
    return row


def samples_png(plt: Any, path: Path, grid: dict[str, Tensor], title: str, dataset: str) -> None:
    """Sample grid: digits and photos one row per N (16 images), toys one scatter per N."""
    keys = list(grid)
    if dataset in ("digits", "photos"):
        per_row = 0.55 if dataset == "digits" else 0.65
        width = 6.4 if dataset == "digits" else 10.0
        fig, axes = plt.subplots(
            len(keys), 1, figsize=(width, per_row * len(keys) + 0.4), squeeze=False
        )
        for ax, key in zip(axes[:, 0], keys, strict=True):
            row = _tile_row(grid[key])
            if dataset == "digits":
                ax.imshow(1 - row[..., 0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(row.numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(
                key if key == "data" else f"{key} st.", rotation=0, ha="right", va="center"
            )
    else:
        fig, axes = plt.subplots(1, len(keys), figsize=(2.4 * len(keys), 2.6), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            pts = grid[key].numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_aspect("equal")
            ax.set_title(f"{key} steps", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI if dataset == "photos" else 80)
    plt.close(fig)
