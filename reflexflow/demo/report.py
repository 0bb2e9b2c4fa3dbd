"""Writing the study's results: results.json, results.md and the figures (matplotlib)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .deps import require

__all__ = ["check_plotting", "summarise", "write_all", "markdown", "rerender_markdown"]

# metric -> (label, lower is better)
METRICS = {
    "fd": ("Frechet distance (classifier features)", True),
    "mmd": ("MMD^2 (data space)", True),
    "confidence": ("classifier confidence (mean max-probability)", False),
    "precision": ("precision (k-NN, k = 3)", False),
    "recall": ("recall (k-NN, k = 3)", False),
    "bias": ("exposure bias E||x^_t1 - x_t1||^2 (mean over t0)", True),
}


def check_plotting() -> None:
    """Fail early, before any training, if matplotlib is missing."""
    require("matplotlib")


def _stats(values: list[float]) -> dict[str, Any]:
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if len(values) > 1 else 0.0
    return {"mean": float(t.mean()), "std": std, "n": len(values), "values": values}


def summarise(runs: list[dict[str, Any]], eval_steps: tuple[int, ...]) -> dict[str, Any]:
    """summary[method][N][metric] = {mean, std (ddof 1), n, values over seeds}."""
    out: dict[str, Any] = {}
    for run in runs:
        per_method = out.setdefault(run["method"], {})
        for n in eval_steps:
            key = str(n)
            cell = per_method.setdefault(key, {})
            vals = dict(run["scores"][key])
            vals["bias"] = run["bias"][key]["mean_mse"]
            for metric, v in vals.items():
                cell.setdefault(metric, []).append(v)
    for per_method in out.values():
        for key, cell in per_method.items():
            per_method[key] = {m: _stats(v) for m, v in cell.items()}
    return out


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "nan"
    if x == 0:
        return "0"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _table(summary: dict[str, Any], metric: str, eval_steps: tuple[int, ...]) -> list[str]:
    label, lower = METRICS[metric]
    methods = list(summary)
    head = f"| method | {' | '.join(f'{n} steps' for n in eval_steps)} |"
    lines = [f"**{label}** ({'lower' if lower else 'higher'} is better)", "", head]
    lines.append("|---|" + "---|" * len(eval_steps))
    best = {}
    for n in eval_steps:
        means = [summary[m][str(n)][metric]["mean"] for m in methods]
        best[n] = min(means) if lower else max(means)
    for m in methods:
        cells = []
        for n in eval_steps:
            s = summary[m][str(n)][metric]
            text = f"{_fmt(s['mean'])} ± {_fmt(s['std'])}"
            cells.append(f"**{text}**" if s["mean"] == best[n] and len(methods) > 1 else text)
        lines.append(f"| {m} | {' | '.join(cells)} |")
    return lines + [""]


def verdict(summary: dict[str, Any], eval_steps: tuple[int, ...], metric: str) -> list[str]:
    """Per N: is each method's mean better or worse than fm's by more than the seeds' spread?

    'within noise' when |mean - mean_fm| <= std + std_fm (one standard deviation each).
    """
    if "fm" not in summary:
        return []
    lower = METRICS[metric][1]
    lines = [
        f"Against plain FM on {metric} (difference beyond one std of each = a clear call):",
        "",
    ]
    for m in summary:
        if m == "fm":
            continue
        parts = []
        for n in eval_steps:
            a, b = summary[m][str(n)][metric], summary["fm"][str(n)][metric]
            diff = a["mean"] - b["mean"]
            if abs(diff) <= a["std"] + b["std"]:
                word = "within noise"
            else:
                word = "better" if (diff < 0) == lower else "worse"
            parts.append(f"{n} steps: {word} ({'+' if diff >= 0 else ''}{_fmt(diff)})")
        lines.append(f"- {m}: " + "; ".join(parts))
    return lines + [""]


def rerender_markdown(out: Path) -> str:
    """Rewrite out/results.md from out/results.json (same numbers, current formatting)."""
    from .study import DemoConfig

    results = json.loads((Path(out) / "results.json").read_text())
    c = dict(results["config"])
    for key in ("methods", "seeds", "eval_steps", "channels"):
        c[key] = tuple(c[key])
    text = markdown(DemoConfig(**c), results)
    (Path(out) / "results.md").write_text(text)
    return text


def markdown(cfg: Any, results: dict[str, Any]) -> str:
    """results.md: the setting, then one table per metric (method x steps, mean ± std)."""
    summary, steps = results["summary"], tuple(cfg.eval_steps)
    env = results["environment"]
    seeds = ", ".join(str(s) for s in cfg.seeds)
    lines = [
        f"# reflexflow demo: {cfg.dataset}" + (" (quick)" if cfg.quick else ""),
        "",
        f"Command: `{results.get('command', 'reflexflow demo')}`",
        "",
        f"Wall time {results['wall_seconds']:.0f} s ({_cpu(results)}) on "
        f"{env.get('cpu_count')} CPU cores "
        f"(device {cfg.device}, torch {env['torch']}, {env['torch_threads']} threads; "
        f"load average at start {_load(env.get('loadavg_start'))}, "
        f"at end {_load(env.get('loadavg_end'))}).",
        "",
        f"Data: {_data_line(results['data'])}. Each method: {cfg.steps} Adam steps, "
        f"batch {cfg.batch_size}, "
        f"lr {cfg.lr} (cosine), the same seeds ({seeds}) and data order. Training rollouts: "
        f"K = {cfg.rollout_steps}, h = 1/{cfg.train_sampling_steps}; lambda_adr = "
        f"{cfg.lambda_adr}, lambda_fc = {cfg.lambda_fc} (library defaults unless stated). "
        f"Scores on the **{cfg.split}** split, {cfg.num_samples} Euler samples per model "
        f"from the same noise for every method; mean ± std over {len(cfg.seeds)} seed(s).",
        "",
    ]
    clf = results.get("classifier")
    if clf:
        pr = clf["precision_recall_train_vs_eval"]
        lines += [
            f"Feature classifier: accuracy {clf['accuracy']:.3f} on the {clf['eval_split']} "
            f"split. Floor for reference (real train digits vs the {clf['eval_split']} split): "
            f"FD {_fmt(clf['fd_train_vs_eval'])}, precision {pr[0]:.3f}, recall {pr[1]:.3f}.",
            "",
        ]
    metrics = ["fd", "confidence", "precision", "recall"] if clf else ["mmd", "precision", "recall"]
    lines += _table(summary, metrics[0], steps)
    lines += verdict(summary, steps, metrics[0])
    lines += _table(summary, "bias", steps)
    ks = ", ".join(f"k = {results['runs'][0]['bias'][str(n)]['k']} at {n}" for n in steps)
    lines += [
        f"Exposure bias: from clean x_t0 on {cfg.bias_samples} held-out samples, k Euler "
        f"steps of h = 1/N ({ks}; span {cfg.bias_span}), mean over {cfg.bias_times} start "
        f"times. Untrained model: "
        + ", ".join(f"{_fmt(results['untrained_bias'][str(n)]['mean_mse'])} at {n}" for n in steps)
        + ".",
        "",
    ]
    lines += verdict(summary, steps, "bias")
    for m in metrics[1:]:
        lines += _table(summary, m, steps)
    lines += ["Figures: exposure-bias.png, loss-curves.png, samples-<method>.png.", ""]
    return "\n".join(lines)


def _data_line(info: dict[str, Any]) -> str:
    sizes = " / ".join(f"{n} {k}" for k, n in info["sizes"].items())
    px = f" {info['image_size']}x{info['image_size']}" if "image_size" in info else ""
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
    """results.json, results.md, samples-<method>.png, samples-data.png, exposure-bias.png,
    loss-curves.png into cfg.out."""
    out = Path(cfg.out)
    (out / "results.json").write_text(json.dumps(_finite_json(results), indent=1) + "\n")
    (out / "results.md").write_text(markdown(cfg, results))
    plt = _pyplot()
    for method, g in grids.items():
        _samples_png(plt, out / f"samples-{method}.png", g, method, cfg.dataset)
    if cfg.dataset == "digits":
        _samples_png(plt, out / "samples-data.png", {"data": real[:16]}, "held-out data", "digits")
    _bias_png(plt, out / "exposure-bias.png", results, cfg)
    _loss_png(plt, out / "loss-curves.png", results)


def _pyplot() -> Any:
    mpl = require("matplotlib")
    mpl.use("Agg", force=True)
    return require("matplotlib.pyplot")


def _tile(x: Tensor, gap: int = 1) -> Tensor:
    """(n, 1, S, S) in [-1, 1] -> one (S, n (S + gap) - gap) row of images in [0, 1]."""
    x = ((x.clamp(-1, 1) + 1) / 2)[:, 0]
    n, s = x.shape[0], x.shape[-1]
    row = torch.ones(s, n * (s + gap) - gap)
    for i in range(n):
        row[:, i * (s + gap) : i * (s + gap) + s] = x[i]
    return row


def _samples_png(plt: Any, path: Path, grid: dict[str, Tensor], title: str, dataset: str) -> None:
    keys = list(grid)
    if dataset == "digits":
        fig, axes = plt.subplots(
            len(keys), 1, figsize=(6.4, 0.55 * len(keys) + 0.35), squeeze=False
        )
        for ax, key in zip(axes[:, 0], keys, strict=True):
            ax.imshow(1 - _tile(grid[key]).numpy(), cmap="gray", vmin=0, vmax=1)
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
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _bias_png(plt: Any, path: Path, results: dict[str, Any], cfg: Any) -> None:
    steps = list(cfg.eval_steps)
    fig, axes = plt.subplots(1, len(steps), figsize=(3.6 * len(steps), 3.2), squeeze=False)
    for ax, n in zip(axes[0], steps, strict=True):
        key = str(n)
        for method in cfg.methods:
            curves = [r["bias"][key] for r in results["runs"] if r["method"] == method]
            if not curves:
                continue
            t0 = curves[0]["t0"]
            mean = torch.tensor([c["mse"] for c in curves], dtype=torch.float64).mean(0)
            ax.plot(t0, mean.numpy(), marker=".", label=method, lw=1.2)
        ub = results["untrained_bias"][key]
        ax.plot(ub["t0"], ub["mse"], "k--", lw=1, label="untrained")
        ax.set_yscale("log")
        ax.set_xlabel("rollout start t0")
        ax.set_title(f"N = {n} (h = 1/{n}), k = {ub['k']}", fontsize=9)
    axes[0][0].set_ylabel("E ||x^_t1 - x_t1||^2")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _loss_png(plt: Any, path: Path, results: dict[str, Any]) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    by_method: dict[str, list[list[float]]] = {}
    for r in results["runs"]:
        by_method.setdefault(r["method"], []).append(r["loss_curve"])
    steps = results["config"]["steps"]
    for method, curves in by_method.items():
        n = min(len(c) for c in curves)
        mean = torch.tensor([c[:n] for c in curves], dtype=torch.float64).mean(0)
        x = torch.linspace(0, steps, n).numpy()
        ax.plot(x, mean.numpy(), lw=1, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title("loss curves (each method's own objective)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
