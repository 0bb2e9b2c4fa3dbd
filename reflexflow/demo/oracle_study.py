"""The oracle study (``reflexflow demo``, ``--dataset oracle``): exact scores on a mixture.

Data: oracle.make_oracle(), a fixed 8-component Gaussian mixture on 4 x 16 x 16 images
(1024 dimensions) with natural-image spectra; every training batch is a fresh exact draw
from a generator seeded with the run's seed (the same batches for every row). Model: the
demo's TinyUNet. Rows: methods.ORACLE_METHODS; a row's training length is ``steps`` times
its factor (methods.ROW_STEPS): ``fm-equal-compute`` trains fm for the measured CPU-time
ratio of one ``reflexflow`` step to one fm step, the ``-long`` rows ``long_factor`` times
longer. Scores: oracle_metrics.OracleScorer (same noise for every model), plus u*'s own
Euler samples (the discretisation floor) and exact samples (the estimator's floor).
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .jobs import RunCache, run_jobs, study_cache
from .methods import ROW_STEPS
from .oracle import make_oracle
from .oracle_metrics import OracleScorer
from .progress import say
from .settings import DemoConfig

__all__ = ["run_oracle", "OracleData", "row_steps", "measure_cost_ratio", "git_commit"]


class OracleData:
    """The mixture, and fresh exact training batches in an order fixed by the seed."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.mixture = make_oracle()
        self.shape = self.mixture.shape

    def batches(self, seed: int, steps: int, batch_size: int):
        gen = torch.Generator().manual_seed(seed)
        return lambda: self.mixture.sample(batch_size, gen)[0].float()


def row_steps(cfg: DemoConfig, method: str, ratio: float) -> int:
    """Training steps of a row: cfg.steps times 1, the cost ratio or cfg.long_factor."""
    base = method.split(":")[0]
    factor = {"equal-compute": ratio, "long": cfg.long_factor}.get(ROW_STEPS.get(base, ""), 1.0)
    return max(1, round(cfg.steps * factor))


def measure_cost_ratio(cfg: DemoConfig, data: OracleData, repeats: int = 8) -> dict[str, Any]:
    """CPU seconds of one training step of ``reflexflow`` (the default preset) over one of fm,
    on the study's model and batch (medians of ``repeats`` alternating steps, one thread)."""
    from .study import _loss_fn, _make_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"fm": [], "reflexflow": []}
    try:
        setups = {}
        for m in times:
            model = _make_model(cfg, data, 0)
            setups[m] = (model, torch.optim.Adam(model.parameters(), lr=cfg.lr), _loss_fn(cfg, m))
        gen = torch.Generator().manual_seed(0)
        x1 = data.mixture.sample(cfg.batch_size, gen)[0].float()
        for i in range(repeats + 2):
            for m, (model, opt, loss_fn) in setups.items():
                c0 = time.process_time()
                out = loss_fn(model, x1, generator=gen)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                if i >= 2:
                    times[m].append(time.process_time() - c0)
    finally:
        torch.set_num_threads(threads)
    med = {m: float(torch.tensor(v).median()) for m, v in times.items()}
    return {
        "ratio": round(med["reflexflow"] / med["fm"], 1),
        "cpu_seconds_per_step": med,
        "how": f"median CPU time of {repeats} alternating steps, batch {cfg.batch_size}, 1 thread",
    }


def git_commit() -> dict[str, Any]:
    """The git commit of the reflexflow checkout (and whether it has local changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "reflexflow"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return {"commit": None, "dirty": None}
    return {"commit": head or None, "dirty": bool(dirty) if head else None}


def _init_worker(cfg: DemoConfig) -> dict[str, Any]:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    data = OracleData(cfg)
    scorer = OracleScorer(data.mixture, cfg.eval_steps, cfg.num_samples, cfg.bias_samples)
    return {"cfg": cfg, "data": data, "scorer": scorer}


def _job(state: dict[str, Any], method: str, seed: int, steps: int) -> dict[str, Any]:
    """Train and score one (row, seed)."""
    from .study import _downsample, _knobs, _loss_fn, resolved_knobs, train

    cfg = dataclasses.replace(state["cfg"], steps=steps, show_progress=False)
    cpu0 = time.process_time()
    model, curves, train_s = train(cfg, state["data"], method, seed, steps=steps)
    cpu1, t0 = time.process_time(), time.perf_counter()
    ev = state["scorer"].evaluate(model)
    return {
        "method": method,
        "seed": seed,
        "steps": steps,
        "knobs": _knobs(cfg, method),
        "loss_config": resolved_knobs(_loss_fn(cfg, method)),
        "train_seconds": train_s,
        "train_cpu_seconds": cpu1 - cpu0,
        "eval_seconds": time.perf_counter() - t0,
        "eval_cpu_seconds": time.process_time() - cpu1,
        "final_loss": curves["loss"][-1],
        "loss_curve": _downsample(curves["loss"]),
        "scores": ev["scores"],
        "curves": ev["curves"],
        "grids": {k: v.numpy() for k, v in ev["grids"].items()},
    }


def run_oracle(cfg: DemoConfig, command: str | None = None) -> dict[str, Any]:
    """Run the oracle study; write results.json, results.md and the figures into cfg.out."""
    from . import oracle_report
    from .study import _cpu_seconds, _loss_fn, environment

    oracle_report.check_plotting()
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    for method in cfg.methods:
        _loss_fn(cfg, method)
    settings, cache = study_cache(cfg)
    data = OracleData(cfg)
    results: dict[str, Any] = {
        "command": command or "reflexflow.demo.run_demo(...)",
        "config": cfg.as_dict(),
        "environment": environment(),
        "git": git_commit(),
        "data": {
            "dataset": "oracle",
            "shape": list(data.shape),
            "components": data.mixture.num_components,
            "weights": data.mixture.weights.tolist(),
        },
    }
    ratio = _cost_ratio(cfg, data, cache)
    results["cost_ratio"] = ratio
    _say(cfg, f"cost of one reflexflow (defar) step over one fm step: {ratio['ratio']}x (CPU)")
    t0 = time.perf_counter()
    scorer = OracleScorer(data.mixture, cfg.eval_steps, cfg.num_samples, cfg.bias_samples)
    results["floor"] = {"scores": scorer.floor["scores"], "curves": scorer.floor["curves"]}
    results["exact_samples"] = scorer.exact
    results["scorer_seconds"] = time.perf_counter() - t0
    grids: dict[str, dict[str, Tensor]] = {"u* (exact field)": scorer.floor["grids"]}

    jobs = []
    for m in cfg.methods:
        steps = row_steps(cfg, m, ratio["ratio"])
        for s in cfg.seeds:
            key = {"settings": settings, "method": m, "seed": s, "steps": steps}
            key["loss"] = _resolved(cfg, m)
            jobs.append((f"{m}-s{s}", key, (m, s, steps)))
    main_n = str(cfg.eval_steps[min(1, len(cfg.eval_steps) - 1)])

    def done(i: int, run: dict[str, Any], cached: bool) -> None:
        sc = run["scores"][main_n]
        _say(
            cfg,
            f"{run['method']:>18} seed {run['seed']}: FD@{main_n} {sc['fd']:.4g}, path dev "
            f"{sc['path_dev']:.3g}, gap {sc['gap']:.3g}"
            + (" (from the run cache)" if cached else f", train {run['train_seconds']:.0f}s"),
        )

    runs = run_jobs(
        jobs,
        _job,
        init=_init_worker,
        initargs=(dataclasses.replace(cfg, show_progress=False),),
        workers=cfg.workers,
        cache=cache,
        on_done=done,
    )
    for run in runs:
        if run["seed"] == cfg.seeds[0]:
            grids[run["method"]] = {k: torch.from_numpy(v) for k, v in run["grids"].items()}
        run.pop("grids")
    results["runs"] = runs
    results["summary"] = oracle_report.summarise(runs, cfg.eval_steps)
    results["vs_fm"] = oracle_report.paired_differences(runs, cfg.eval_steps)
    results["wall_seconds"] = time.perf_counter() - wall0
    results["cpu_seconds"] = _cpu_seconds() - cpu0
    try:
        import os

        results["environment"]["loadavg_end"] = list(os.getloadavg())
    except (OSError, AttributeError):
        pass
    grids["data"] = {"exact": data.mixture.sample(16, torch.Generator().manual_seed(5))[0]}
    oracle_report.write_all(cfg, results, grids)
    return results


def _resolved(cfg: DemoConfig, method: str) -> dict[str, Any]:
    from .study import _loss_fn, resolved_knobs

    return resolved_knobs(_loss_fn(cfg, method))


def _cost_ratio(cfg: DemoConfig, data: OracleData, cache: RunCache) -> dict[str, Any]:
    """The measured cost ratio, or cfg.equal_compute_ratio; kept in the run cache so that a
    resumed study trains fm-equal-compute for the same number of steps."""
    if cfg.equal_compute_ratio is not None:
        return {"ratio": cfg.equal_compute_ratio, "how": "given (--equal-compute-ratio)"}
    ratio = cache.load("cost-ratio", {})  # None when absent, or cut short by a kill
    if ratio is None:
        ratio = measure_cost_ratio(cfg, data)
        cache.save("cost-ratio", {}, ratio)  # atomic
    return ratio


def _say(cfg: DemoConfig, text: str) -> None:
    if cfg.show_progress:
        say(text)
