"""results.md, results.json and the figures of the oracle study."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..presets import PRESET_FIELDS
from .report import _finite_json, _fmt, _signed, check_plotting
from .seed_stats import paired_seed_differences, summarise_seeds

__all__ = [
    "check_plotting",
    "summarise",
    "paired_differences",
    "markdown",
    "write_all",
    "summary_lines",
    "rerender",
    "METRICS",
]

# metric -> (what it is, the goal: min, max, or a target value)
METRICS: dict[str, tuple[str, Any]] = {
    "fd": ("Frechet distance to the mixture's analytic mean and covariance", "min"),
    "band_low": ("low-band (DCT f <= 3) variance ratio, samples / exact", 1.0),
    "band_high": ("high-band (DCT f >= 8) variance ratio, samples / exact", 1.0),
    "mode_tv": ("mode coverage: total variation of the component histogram", "min"),
    "loglik": ("mean exact log-likelihood of the samples, nats per dimension", "max"),
    "path_dev": ("path deviation: ||x_N - x*_N||^2 / D against u*'s sample, same noise", "min"),
    "err_own": ("velocity error against u* on the model's own Euler states", "min"),
    "err_clean": ("velocity error against u* on clean x_t", "min"),
    "gap": ("train/inference gap: err_own / err_clean", "min"),
}
DIFF_METRICS = ("fd", "band_low", "band_high", "mode_tv", "path_dev", "gap")


def _scores(run: dict[str, Any], n: str) -> dict[str, float]:
    return run["scores"][n]


def summarise(runs: list[dict[str, Any]], eval_steps: tuple[int, ...]) -> dict[str, Any]:
    """summary[method][N][metric] = {mean, std (ddof 1), n, values over seeds}."""
    return summarise_seeds(runs, eval_steps, _scores)


def paired_differences(
    runs: list[dict[str, Any]], eval_steps: tuple[int, ...], baseline: str = "fm"
) -> dict[str, Any]:
    """out[method][N][metric] = {mean, std, ci95, n, values} of d_s = method_s - fm_s.

    ci95 = t_{0.975, n-1} std / sqrt(n): a 95% interval of the mean paired difference.
    """
    return paired_seed_differences(runs, eval_steps, _scores, baseline)


def _cell(c: dict[str, Any]) -> str:
    return f"{_fmt(c['mean'])} ± {_fmt(c['std'])}" if c["n"] > 1 else _fmt(c["mean"])


def _diff(c: dict[str, Any]) -> str:
    text = f"{_signed(c['mean'])} ± {_fmt(c['ci95'])}"
    decided = math.isfinite(c["ci95"]) and abs(c["mean"]) > c["ci95"]
    return f"**{text}**" if decided else text


def _knob_text(lc: dict[str, Any]) -> str:
    """The knobs that define what a row trains (the rest of loss_config is in results.json)."""
    method = lc.get("method")
    keys: tuple[str, ...] = ("method",)
    if method == "ss":
        keys += ("rollout_steps", "num_sampling_steps", "step_schedule", "ss_prob")
    elif method == "ip":
        keys += ("ip_gamma",)
    elif method == "reflexflow":
        keys += ("preset", *(k for k in PRESET_FIELDS if k not in ("method", "target")))
    keys += ("target",) + (("stable_ref",) if lc.get("target") == "stable" else ())
    keys += ("path", "t_eps", "time_sampler")
    return ", ".join(f"{k}={lc[k]}" for k in keys if k in lc)


def markdown(cfg: Any, results: dict[str, Any]) -> str:
    """results.md: setting, rows and their knobs, scores with floors, paired differences."""
    steps = [str(n) for n in cfg.eval_steps]
    runs = results["runs"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    first = {m: next(r for r in runs if r["method"] == m) for m in methods}
    summ, vs = results["summary"], results["vs_fm"]
    env, git = results["environment"], results.get("git", {})
    ratio = results["cost_ratio"]
    L = ["# reflexflow demo: the exact-oracle study", ""]
    L.append(
        f"Data: a fixed mixture of {results['data']['components']} Gaussians on "
        f"{'x'.join(map(str, results['data']['shape']))} images (1024 dimensions), covariances "
        "diagonal in a colour-rotation x 2-D DCT basis with power spectra (f + 1)^-alpha, "
        "alpha in 1.7-2.3 (docs/method.md section 7); every batch a fresh exact draw. "
        f"Model: TinyUNet, widths {','.join(map(str, cfg.channels))}; Adam, lr {cfg.lr} "
        f"cosine; batch {cfg.batch_size}; {cfg.steps} steps (rows marked otherwise below); "
        f"seeds {', '.join(map(str, cfg.seeds))}. Scores on the same {cfg.num_samples} noise "
        f"draws for every model (exposure-bias scores on the first {cfg.bias_samples})."
    )
    L.append("")
    L.append(
        f"Equal compute: one `reflexflow` (default preset) training step costs "
        f"**{ratio['ratio']}x** one fm step ({ratio.get('how', '')}; CPU seconds per step "
        f"{ratio.get('cpu_seconds_per_step', 'not measured')}), so `fm-equal-compute` trains "
        f"fm for {round(cfg.steps * ratio['ratio'])} steps."
    )
    L += ["", "## Rows and the knobs each used", "", "| row | steps | knobs (resolved) |"]
    L.append("|---|---|---|")
    for m in methods:
        L.append(f"| {m} | {first[m]['steps']} | {_knob_text(first[m]['loss_config'])} |")
    L += ["", "## Scores (mean ± std over seeds)", ""]
    L.append(
        "Floors: `u* (exact field)` is the exact marginal velocity's own Euler samples from "
        "the same noise (the discretisation floor at N steps); `exact samples` are "
        f"{cfg.num_samples} exact mixture draws (the estimators' own floor: FD of finitely "
        "many samples is not 0)."
    )
    for metric in ("fd", "band_low", "band_high", "mode_tv", "loglik"):
        L += ["", f"### {metric}: {METRICS[metric][0]}", ""]
        L.append("| row | " + " | ".join(f"N={n}" for n in steps) + " |")
        L.append("|---|" + "---|" * len(steps))
        for m in methods:
            L.append(f"| {m} | " + " | ".join(_cell(summ[m][n][metric]) for n in steps) + " |")
        fl = results["floor"]["scores"]
        L.append("| u* (exact field) | " + " | ".join(_fmt(fl[n][metric]) for n in steps) + " |")
        ex = _fmt(results["exact_samples"][metric])
        L.append("| exact samples | " + " | ".join(ex for _ in steps) + " |")
    L += ["", "### Exposure bias, exact (mean ± std over seeds)", ""]
    L.append(
        "path_dev: " + METRICS["path_dev"][0] + "; err_own / err_clean: velocity error "
        "against u* (per element) on the model's own Euler states / on clean x_t at the "
        "same times; gap = err_own / err_clean (the train/inference gap; 1 = none)."
    )
    for metric in ("path_dev", "err_own", "err_clean", "gap"):
        L += ["", f"| {metric} | " + " | ".join(f"N={n}" for n in steps) + " |"]
        L.append("|---|" + "---|" * len(steps))
        for m in methods:
            L.append(f"| {m} | " + " | ".join(_cell(summ[m][n][metric]) for n in steps) + " |")
    L += ["", "## Differences from fm, paired by seed (mean ± 95% interval)", ""]
    L.append("Bold: the interval excludes 0. Lower is better for fd, mode_tv, path_dev, gap; ")
    L[-1] += "band ratios are better nearer 1."
    for n in steps:
        L += ["", f"N = {n}:", ""]
        L.append("| row - fm | " + " | ".join(DIFF_METRICS) + " |")
        L.append("|---|" + "---|" * len(DIFF_METRICS))
        for m in methods:
            if m in vs:
                L.append(f"| {m} | " + " | ".join(_diff(vs[m][n][k]) for k in DIFF_METRICS) + " |")
    L += ["", "## Run", ""]
    L.append(f"Command: `{results['command']}`")
    L.append(f"Git commit: {git.get('commit')} (local changes in reflexflow/: {git.get('dirty')}).")
    load0, load1 = env.get("loadavg_start"), env.get("loadavg_end")
    L.append(
        f"Wall time {results['wall_seconds']:.0f} s, CPU time {results['cpu_seconds']:.0f} s "
        f"(this process and its workers), {cfg.workers} worker(s), {cfg.threads} torch "
        f"thread(s) each; {env.get('cpu_count')} CPUs; load average (1, 5, 15 min) "
        f"{_load(load0)} at the start, {_load(load1)} at the end; {env.get('platform')}; "
        f"torch {env.get('torch')}, python {env.get('python')}."
    )
    train = sum(r["train_cpu_seconds"] for r in runs)
    ev = sum(r["eval_cpu_seconds"] for r in runs)
    L.append(
        f"CPU seconds in runs: training {train:.0f}, scoring {ev:.0f}; "
        f"scorer setup {results.get('scorer_seconds', 0):.0f} s wall."
    )
    L.append("")
    return "\n".join(L)


def _load(v: Any) -> str:
    return "not measured" if not v else ", ".join(f"{x:.2f}" for x in v)


def summary_lines(cfg: Any, results: dict[str, Any]) -> list[str]:
    """A short terminal summary: FD at the middle N, path deviation and gap per row."""
    steps = [str(n) for n in cfg.eval_steps]
    n = steps[min(1, len(steps) - 1)]
    summ, vs = results["summary"], results["vs_fm"]
    lines = [f"{'row':>18}  FD@{n} (floor {_fmt(results['floor']['scores'][n]['fd'])})"]
    lines[0] += "   vs fm (95% CI)     path dev    gap"
    for m, per in summ.items():
        d = vs.get(m, {}).get(n, {}).get("fd")
        dtext = f"{_signed(d['mean'])} ± {_fmt(d['ci95'])}" if d else "-"
        lines.append(
            f"{m:>18}  {_fmt(per[n]['fd']['mean']):>10}   {dtext:>18}   "
            f"{_fmt(per[n]['path_dev']['mean']):>8}   {_fmt(per[n]['gap']['mean']):>5}"
        )
    return lines


# -- figures --------------------------------------------------------------------------------


def _styles(methods: list[str]) -> dict[str, dict[str, Any]]:
    from .figures import method_styles

    return method_styles(methods)


def _image_row(x: Tensor) -> Tensor:
    """(n, C, S, S) -> (S, n (S + 1) - 1, 3) in [0, 1]: channels 0-2 as RGB, scaled 1/2."""
    from .figures import _tile_row

    return _tile_row(x[:, :3].float() / 2.0)


def _samples_png(plt: Any, path: Path, grids: dict[str, dict[str, Tensor]], n: str) -> None:
    names = list(grids)
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 0.62 * len(names) + 0.6), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        g = grids[name]
        ax.imshow(_image_row(g[n] if n in g else next(iter(g.values()))).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"samples at N = {n} Euler steps (first seed; same noise in every row)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fd_png(plt: Any, path: Path, cfg: Any, results: dict[str, Any]) -> None:
    steps = list(cfg.eval_steps)
    summ = results["summary"]
    styles = _styles(list(summ))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for m, per in summ.items():
        mean = [per[str(n)]["fd"]["mean"] for n in steps]
        std = [per[str(n)]["fd"]["std"] for n in steps]
        ax.errorbar(steps, mean, yerr=std, label=m, capsize=2, **_line(styles[m]))
    floor = [results["floor"]["scores"][str(n)]["fd"] for n in steps]
    ax.plot(steps, floor, "k--", label="u* (discretisation floor)")
    ax.axhline(results["exact_samples"]["fd"], color="gray", ls=":", label="exact samples")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.minorticks_off()
    lo, hi = ax.get_ylim()
    ticks = [v for v in (10, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700, 1000) if lo <= v <= hi]
    ax.set_yticks(ticks)
    ax.set_yticklabels([str(v) for v in ticks])
    ax.set_xticks(steps)
    ax.set_xticklabels([str(n) for n in steps])
    ax.set_xlabel("Euler steps N")
    ax.set_ylabel("FD to the exact mixture (lower is better)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _line(style: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in style.items() if k in ("color", "linestyle", "marker")}


def _bands_png(plt: Any, path: Path, cfg: Any, results: dict[str, Any]) -> None:
    summ = results["summary"]
    methods = list(summ)
    steps = [str(n) for n in cfg.eval_steps]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    width = 0.8 / (len(methods) + 1)
    styles = _styles(methods)
    for ax, band in zip(axes, ("band_low", "band_high"), strict=True):
        for j, m in enumerate(methods + ["u* (exact field)"]):
            if m in summ:
                vals = [summ[m][n][band]["mean"] for n in steps]
                err = [summ[m][n][band]["std"] for n in steps]
            else:
                vals = [results["floor"]["scores"][n][band] for n in steps]
                err = [0.0] * len(steps)
            xs = [i + (j - len(methods) / 2) * width for i in range(len(steps))]
            colour = styles[m]["color"] if m in summ else "#bbbbbb"
            ax.bar(xs, vals, width, yerr=err, label=m, color=colour, edgecolor="k", lw=0.3)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels([f"N={n}" for n in steps])
        ax.set_title(METRICS[band][0], fontsize=9)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _bias_png(plt: Any, path: Path, cfg: Any, results: dict[str, Any], n: str) -> None:
    runs = results["runs"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    styles = _styles(methods)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        t = rs[0]["curves"][n]["t"]
        dev = torch.tensor([r["curves"][n]["path_dev"] for r in rs]).mean(0)
        axes[0].plot(t, dev.tolist(), label=m, **_line(styles[m]))
        te = rs[0]["curves"][n]["t_err"]
        own = torch.tensor([r["curves"][n]["err_own"] for r in rs]).mean(0)
        clean = torch.tensor([r["curves"][n]["err_clean"] for r in rs]).mean(0)
        line = axes[1].plot(te, own.tolist(), label=f"{m}", **_line(styles[m]))[0]
        axes[1].plot(te, clean.tolist(), ls=":", color=line.get_color())
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("||x_model(t) - x_u*(t)||^2 / D (same noise)")
    axes[0].set_title(f"path deviation from the exact flow, N = {n}", fontsize=9)
    axes[0].set_yscale("log")
    axes[1].set_xlabel("t")
    axes[1].set_ylabel("||v - u*||^2 / D")
    axes[1].set_yscale("log")
    axes[1].set_title(
        f"velocity error: solid on the model's own states, dotted on clean x_t, N = {n}",
        fontsize=9,
    )
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def rerender(out: Path) -> str:
    """Rewrite results.md and every figure but samples.png from out/results.json."""
    from types import SimpleNamespace

    from .report import _pyplot

    out = Path(out)
    results = json.loads((out / "results.json").read_text())
    cfg = SimpleNamespace(**results["config"])
    cfg.eval_steps, cfg.channels, cfg.seeds = (
        tuple(cfg.eval_steps),
        tuple(cfg.channels),
        tuple(cfg.seeds),
    )
    text = markdown(cfg, results)
    (out / "results.md").write_text(text)
    plt = _pyplot()
    n = str(cfg.eval_steps[min(1, len(cfg.eval_steps) - 1)])
    _fd_png(plt, out / "fd-vs-steps.png", cfg, results)
    _bands_png(plt, out / "bands.png", cfg, results)
    _bias_png(plt, out / "exposure-bias.png", cfg, results, n)
    return text


def write_all(cfg: Any, results: dict[str, Any], grids: dict[str, dict[str, Tensor]]) -> None:
    """results.json, results.md, samples.png, fd-vs-steps.png, bands.png, exposure-bias.png."""
    from .report import _pyplot

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_finite_json(results), indent=1))
    (out / "results.md").write_text(markdown(cfg, results))
    plt = _pyplot()
    n = str(cfg.eval_steps[min(1, len(cfg.eval_steps) - 1)])
    order = {"data": grids.pop("data"), **grids}
    _samples_png(plt, out / "samples.png", order, n)
    _fd_png(plt, out / "fd-vs-steps.png", cfg, results)
    _bands_png(plt, out / "bands.png", cfg, results)
    _bias_png(plt, out / "exposure-bias.png", cfg, results, n)
