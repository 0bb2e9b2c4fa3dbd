"""Writing the study's results: results.json, results.md and the figures (matplotlib).

Every number in results.md and every figure except the sample grids is computed from
results.json alone, so ``rerender(out)`` rebuilds them (figures.py draws the pictures).
Differences from fm are paired by seed (seeds share data order, noise and initialisation):

    d_s = score(method, seed s) - score(fm, seed s),   mean d +- t_{0.975, n-1} std(d) / sqrt(n)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import Tensor

from ..presets import DEFAULT_PRESET
from .deps import require
from .seed_stats import T95, paired_seed_differences, summarise_seeds

__all__ = [
    "check_plotting",
    "summarise",
    "paired_differences",
    "write_all",
    "markdown",
    "rerender_markdown",
    "rerender",
    "METRICS",
    "T95",
]

# metric -> (label, goal): goal "min" lower is better, "max" higher, "zero" nearest 0
METRICS: dict[str, tuple[str, str]] = {
    "fd": ("Frechet distance (classifier features)", "min"),
    "mmd": ("MMD^2 (data space)", "min"),
    "confidence": ("classifier confidence (mean max-probability)", "max"),
    "precision": ("precision (k-NN, k = 3)", "max"),
    "recall": ("recall (k-NN, k = 3)", "max"),
    "spec_low": ("spectrum error, low band: mean |log P_samples(r) / P_data(r)|", "min"),
    "spec_high": ("spectrum error, high band: mean |log P_samples(r) / P_data(r)|", "min"),
    "power_low": ("low-band power, log(samples / data), signed", "zero"),
    "power_high": ("high-band power, log(samples / data), signed", "zero"),
    "bias": ("exposure bias E||x^_t1 - x_t1||^2 (mean over t0)", "min"),
}
GOAL_WORDS = {"min": "lower is better", "max": "higher is better", "zero": "0 is ideal"}


def check_plotting() -> None:
    """Fail early, before any training, if matplotlib is missing."""
    require("matplotlib")


def table_metrics(dataset: str) -> list[str]:
    """The metrics results.md tabulates for a dataset (the first one is the headline)."""
    if dataset == "photos":
        return ["fd", "spec_low", "spec_high", "power_low", "power_high", "precision", "recall"]
    if dataset == "digits":
        return ["fd", "confidence", "precision", "recall"]
    return ["mmd", "precision", "recall"]


def diff_metrics(dataset: str) -> list[str]:
    """Metrics whose paired difference from fm results.md and differences.png show."""
    if dataset == "photos":
        return ["fd", "spec_low", "spec_high", "recall", "bias"]
    if dataset == "digits":
        return ["fd", "recall", "bias"]
    return ["mmd", "bias"]


def _run_values(run: dict[str, Any], n: str) -> dict[str, float]:
    vals = {k: v for k, v in run["scores"][n].items() if isinstance(v, (int, float))}
    vals["bias"] = run["bias"][n]["mean_mse"]
    return vals


def summarise(runs: list[dict[str, Any]], eval_steps: tuple[int, ...]) -> dict[str, Any]:
    """summary[method][N][metric] = {mean, std (ddof 1), n, values over seeds}: the numeric
    scores and the exposure bias (mean over t0) of each run."""
    return summarise_seeds(runs, eval_steps, _run_values)


def paired_differences(
    runs: list[dict[str, Any]], eval_steps: tuple[int, ...], baseline: str = "fm"
) -> dict[str, Any]:
    """out[method][N][metric] = {mean, std, ci95, n, values} of d_s = method_s - baseline_s
    (seed_stats.paired_seed_differences over the values summarise uses)."""
    return paired_seed_differences(runs, eval_steps, _run_values, baseline)


def _fmt(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "nan"
    if x == 0:
        return "0"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _signed(x: float) -> str:
    text = _fmt(x)
    return text if text.startswith("-") or text == "nan" else "+" + text


def _best(values: list[float], goal: str) -> float:
    if goal == "min":
        return min(values)
    if goal == "max":
        return max(values)
    return min(values, key=abs)


def _table(summary: dict[str, Any], metric: str, eval_steps: tuple[int, ...]) -> list[str]:
    label, goal = METRICS[metric]
    methods = [m for m in summary if metric in summary[m][str(eval_steps[0])]]
    if not methods:
        return []
    head = f"| method | {' | '.join(f'{n} steps' for n in eval_steps)} |"
    lines = [f"**{label}** ({GOAL_WORDS[goal]}; mean ± std over seeds)", "", head]
    lines.append("|---|" + "---|" * len(eval_steps))
    best = {
        n: _best([summary[m][str(n)][metric]["mean"] for m in methods], goal) for n in eval_steps
    }
    for m in methods:
        cells = []
        for n in eval_steps:
            s = summary[m][str(n)][metric]
            text = f"{_fmt(s['mean'])} ± {_fmt(s['std'])}"
            cells.append(f"**{text}**" if s["mean"] == best[n] and len(methods) > 1 else text)
        lines.append(f"| {m} | {' | '.join(cells)} |")
    return lines + [""]


def _diff_table(vs_fm: dict[str, Any], metric: str, eval_steps: tuple[int, ...]) -> list[str]:
    """method - fm per N: mean ± 95% CI half-width, bold when the interval excludes 0."""
    if not vs_fm:
        return []
    label, goal = METRICS[metric]
    n_seeds = next(iter(vs_fm.values()))[str(eval_steps[0])].get(metric, {}).get("n", 0)
    if not n_seeds:
        return []
    lines = [
        f"*{metric}: method − fm, paired over seeds (mean ± 95% CI, n = {n_seeds}; "
        f"**bold**: the interval excludes 0; {GOAL_WORDS[goal]})*",
        "",
        f"| method | {' | '.join(f'{n} steps' for n in eval_steps)} |",
        "|---|" + "---|" * len(eval_steps),
    ]
    for m, per_n in vs_fm.items():
        cells = []
        for n in eval_steps:
            d = per_n[str(n)].get(metric)
            if d is None:
                cells.append("n/a")
                continue
            text = f"{_signed(d['mean'])} ± {_fmt(d['ci95'])}"
            clear = math.isfinite(d["ci95"]) and abs(d["mean"]) > d["ci95"]
            cells.append(f"**{text}**" if clear else text)
        lines.append(f"| {m} | {' | '.join(cells)} |")
    return lines + [""]


def _config(results: dict[str, Any]) -> Any:
    from .settings import DemoConfig

    c = dict(results["config"])
    for key in ("methods", "seeds", "eval_steps", "channels"):
        if c.get(key) is not None:
            c[key] = tuple(c[key])
    return DemoConfig(**c)


def rerender_markdown(out: Path) -> str:
    """Rewrite out/results.md from out/results.json (same numbers, current formatting)."""
    results = json.loads((Path(out) / "results.json").read_text())
    text = markdown(_config(results), results)
    (Path(out) / "results.md").write_text(text)
    return text


def rerender(out: Path) -> str:
    """Rewrite results.md and every figure but the sample grids from out/results.json."""
    from . import figures

    text = rerender_markdown(out)
    results = json.loads((Path(out) / "results.json").read_text())
    figures.write_curve_figures(_pyplot(), Path(out), _config(results), results)
    return text


def _rows_table(results: dict[str, Any], methods: tuple[str, ...]) -> list[str]:
    """What each row's loss resolved to (a preset's values), from the runs' loss_config."""
    first = {}
    for r in results["runs"]:
        first.setdefault(r["method"], r)
    if not all("loss_config" in first.get(m, {}) for m in methods):
        return []
    cols = [
        "preset",
        "method",
        "target",
        "stable_ref",
        "adr_loss",
        "lambda_adr",
        "lambda_fc",
        "fc_source",
        "fm_input",
        "step_schedule",
        "rollout_steps",
        "num_sampling_steps",
        "rollout_grad",
    ]
    lines = [
        "Rows (the loss configuration each resolved to; a knob a row does not use is "
        "listed all the same):",
        "",
        "| row | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for m in methods:
        lc = first[m]["loss_config"]
        lines.append(f"| {m} | " + " | ".join(str(lc.get(c, "—")) for c in cols) + " |")
    return lines + [""]


def markdown(cfg: Any, results: dict[str, Any]) -> str:
    """results.md: the setting, one table per metric (method x steps, mean ± std) and
    the paired differences from fm with their 95% intervals."""
    summary, steps = results["summary"], tuple(cfg.eval_steps)
    vs_fm = paired_differences(results["runs"], steps)
    env = results["environment"]
    seeds = ", ".join(str(s) for s in cfg.seeds)
    model = {
        "unet": f"a {'PatchUNet (patch 2)' if cfg.dataset == 'photos' else 'TinyUNet'} "
        f"of widths {', '.join(str(c) for c in cfg.channels)}",
        "sit": "SiT-S/2 (patch 2, hidden 384, depth 12, 6 heads, adaLN-zero)",
        "mlp": "an MLP",
    }.get(getattr(cfg, "arch", "unet") or "unet", "a model")
    amp = ", bf16 autocast" if getattr(cfg, "amp", False) else ""
    lines = [
        f"# reflexflow demo: {cfg.dataset}" + (" (quick)" if cfg.quick else ""),
        "",
        f"Command: `{results.get('command', 'reflexflow demo')}`",
        "",
        f"Wall time {results['wall_seconds']:.0f} s ({_cpu(results)}) on "
        f"{env.get('cpu_count')} CPU cores "
        f"(device {cfg.device}{' ' + env['cuda'] if env.get('cuda') else ''}, "
        f"torch {env['torch']}, {env['torch_threads']} threads; "
        f"load average at start {_load(env.get('loadavg_start'))}, "
        f"at end {_load(env.get('loadavg_end'))}).",
        "",
        f"Data: {_data_line(results['data'])}. Each method: {model}{amp}, {cfg.steps} Adam "
        f"steps, batch {cfg.batch_size}, "
        f"lr {cfg.lr} (cosine), the same seeds ({seeds}) and data order. Training rollouts "
        f"of the digits-study rows: K = {cfg.rollout_steps}, h = 1/{cfg.train_sampling_steps}; "
        f"lambda_adr = {cfg.lambda_adr}, lambda_fc = {cfg.lambda_fc} (the grid-direction "
        f"preset's weights, not the library's default preset {DEFAULT_PRESET!r}; preset and "
        f"stable rows keep their own values, listed below). "
        f"Scores on the **{cfg.split}** split, {cfg.num_samples} Euler samples per model "
        f"from the same noise for every method; mean ± std over {len(cfg.seeds)} seed(s); "
        f"differences from fm paired by seed.",
        "",
    ]
    lines += _rows_table(results, tuple(cfg.methods))
    lines += _classifier_lines(results.get("classifier"), cfg)
    metrics = table_metrics(cfg.dataset)
    diffs = diff_metrics(cfg.dataset)
    for m in metrics:
        lines += _table(summary, m, steps)
        if m in diffs:
            lines += _diff_table(vs_fm, m, steps)
    lines += _table(summary, "bias", steps)
    lines += _diff_table(vs_fm, "bias", steps)
    ks = ", ".join(f"k = {results['runs'][0]['bias'][str(n)]['k']} at {n}" for n in steps)
    lines += [
        f"Exposure bias: from clean x_t0 on {cfg.bias_samples} held-out samples, k Euler "
        f"steps of h = 1/N ({ks}; span {cfg.bias_span}), mean over {cfg.bias_times} start "
        f"times. Untrained model: "
        + ", ".join(f"{_fmt(results['untrained_bias'][str(n)]['mean_mse'])} at {n}" for n in steps)
        + ".",
        "",
    ]
    figs = "exposure-bias.png, loss-curves.png, differences.png, samples-<method>.png"
    if cfg.dataset == "photos":
        figs += ", samples-data.png, spectrum.png"
    elif cfg.dataset == "digits":
        figs += ", samples-data.png"
    lines += [f"Figures: {figs}.", ""]
    return "\n".join(lines)


def _classifier_lines(clf: dict[str, Any] | None, cfg: Any) -> list[str]:
    if not clf:
        return []
    pr = clf["precision_recall_train_vs_eval"]
    if cfg.dataset != "photos":
        return [
            f"Feature classifier: accuracy {clf['accuracy']:.3f} on the {clf['eval_split']} "
            f"split. Floor for reference (real train digits vs the {clf['eval_split']} split): "
            f"FD {_fmt(clf['fd_train_vs_eval'])}, precision {pr[0]:.3f}, recall {pr[1]:.3f}.",
            "",
        ]
    sp = clf["spectrum_train_vs_eval"]
    return [
        f"Feature network: a photo classifier (which of the photographs a crop comes from) "
        f"trained once on crops of the held-out band (val and test regions), "
        f"{clf['settings']['steps']} steps; accuracy {clf['accuracy']:.3f} on crops of the "
        f"train regions, which it never saw ({clf['accuracy_eval_split']:.3f} on the "
        f"{clf['eval_split']} crops, from a region it was trained on). Floor for reference ("
        f"{cfg.num_samples} real train-region crops vs the {clf['eval_split']} crops, the "
        f"shift between regions of the same photographs): FD {_fmt(clf['fd_train_vs_eval'])}, "
        f"precision {pr[0]:.3f}, recall {pr[1]:.3f}, spectrum error low / high band "
        f"{_fmt(sp['spec_low'])} / {_fmt(sp['spec_high'])}.",
        "",
    ]


def _data_line(info: dict[str, Any]) -> str:
    sizes = " / ".join(f"{n} {k}" for k, n in info["sizes"].items())
    px = f" {info['image_size']}x{info['image_size']}" if "image_size" in info else ""
    if info.get("photos"):
        px += f"x3 crops of {len(info['photos'])} photographs ({', '.join(info['photos'])})"
    return f"{info['dataset']}{px}, {sizes}"


def _cpu(results: dict[str, Any]) -> str:
    cpu = results.get("cpu_seconds")
    return "CPU time n/a" if cpu is None else f"CPU time {cpu:.0f} s"


def _load(v: Any) -> str:
    return "n/a" if not v else " / ".join(f"{x:.2f}" for x in v)


def _finite_json(obj: Any) -> Any:
    """NaN / inf become None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def write_all(
    cfg: Any, results: dict[str, Any], grids: dict[str, dict[str, Tensor]], real: Tensor
) -> None:
    """results.json, results.md, samples-<method>.png, samples-data.png and the curve
    figures (figures.write_curve_figures) into cfg.out."""
    from . import figures

    out = Path(cfg.out)
    (out / "results.json").write_text(json.dumps(_finite_json(results), indent=1) + "\n")
    (out / "results.md").write_text(markdown(cfg, results))
    plt = _pyplot()
    for method, g in grids.items():
        figures.samples_png(plt, out / f"samples-{method}.png", g, method, cfg.dataset)
    if cfg.dataset in ("digits", "photos"):
        figures.samples_png(
            plt, out / "samples-data.png", {"data": real[:16]}, "held-out data", cfg.dataset
        )
    figures.write_curve_figures(plt, out, cfg, json.loads(json.dumps(_finite_json(results))))


def _pyplot() -> Any:
    mpl = require("matplotlib")
    mpl.use("Agg", force=True)
    return require("matplotlib.pyplot")
