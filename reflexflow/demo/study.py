"""The study: train every method with the same budget, seeds and data order; evaluate.

For each (method, seed): a fresh velocity model (TinyUNet for digits, ToyMLP for the 2-D
toys), initialised by ``torch.manual_seed(seed)``; ``steps`` Adam steps (cosine learning
rate) on mini-batches drawn by a data generator seeded with ``seed`` (the same order for
every method); the loss's own draws come from a second generator seeded with
``seed + 1``. Evaluation on the held-out split (or the validation split, for tuning):
Euler samples from the same noise for every method at each step count N, scored by
Frechet distance, precision/recall and classifier confidence (digits) or MMD^2 and
precision/recall (toys), and the exposure-bias curve of docs/method.md section 7 with k
Euler steps of h = 1/N spanning ``bias_span`` of the time axis (k = round(span N)).
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..diagnostics import exposure_bias
from ..loss import ReflexFlowLoss
from ..sampler import sample
from . import metrics as M
from .data import TOYS, load_digits_split
from .methods import DEFAULT_METHODS, METHODS, QUICK_METHODS, method_knobs
from .model import TinyUNet, ToyMLP
from .progress import progress, say

__all__ = ["DemoConfig", "run_demo", "quick_config"]

DATASETS = ("digits", *TOYS)
SPLITS = ("test", "val")


@dataclasses.dataclass
class DemoConfig:
    """Every setting of ``reflexflow demo`` (see ``reflexflow demo --help``)."""

    out: Path = Path("reflexflow-demo")
    dataset: str = "digits"
    size: int = 8
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    channels: tuple[int, ...] = (16, 32)
    eval_steps: tuple[int, ...] = (10, 20, 50)
    num_samples: int = 500
    bias_samples: int = 128
    bias_span: float = 0.2
    bias_times: int = 6
    lambda_adr: float = 10.0
    lambda_fc: float = 1.0
    rollout_steps: int = 1
    train_sampling_steps: int = 20
    split: str = "test"
    device: str = "cpu"
    threads: int | None = 1
    workers: int = 1
    cache_dir: Path | None = None
    show_progress: bool = True
    quick: bool = False

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.size not in (8, 16):
            raise ValueError(f"size must be 8 or 16, got {self.size!r}")
        if not self.methods:
            raise ValueError("methods must name at least one method")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"methods: unknown method {m!r}; choose from {tuple(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must not repeat, got {self.methods}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if not self.eval_steps or any(n < 1 for n in self.eval_steps):
            raise ValueError(f"eval_steps must be integers >= 1, got {self.eval_steps}")
        for name in ("steps", "batch_size", "num_samples", "bias_samples", "bias_times"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_samples < 10:
            raise ValueError(f"num_samples must be >= 10, got {self.num_samples}")
        if not 0 < self.bias_span < 1:
            raise ValueError(f"bias_span must lie in (0, 1), got {self.bias_span}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.workers > 1 and self.device != "cpu":
            raise ValueError(f"workers > 1 needs device='cpu', got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        self.out = Path(self.out)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        return d


def quick_config(**overrides: Any) -> DemoConfig:
    """The ``--quick`` preset: fm, ss, reflexflow; 2 seeds; 40 steps; N in (10, 20); 100 samples."""
    base: dict[str, Any] = {
        "methods": QUICK_METHODS,
        "seeds": (0, 1),
        "steps": 40,
        "eval_steps": (10, 20),
        "num_samples": 100,
        "bias_samples": 64,
        "bias_times": 4,
        "quick": True,
    }
    base.update(overrides)
    return DemoConfig(**base)


class _Data:
    """Train batches, evaluation reference set and bias set of one dataset."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.info: dict[str, Any] = {"dataset": cfg.dataset}
        if cfg.dataset == "digits":
            split = load_digits_split(cfg.size)
            self.split = split
            self.train_x = split.train_x
            self.eval_x = split.test_x if cfg.split == "test" else split.val_x
            self.eval_y = split.test_y if cfg.split == "test" else split.val_y
            self.shape = tuple(split.train_x.shape[1:])
            self.info.update(sizes=split.sizes(), eval_split=cfg.split, image_size=cfg.size)
        else:
            toy = TOYS[cfg.dataset]
            self.train_x = toy(20_000, torch.Generator().manual_seed(7))
            self.eval_x = toy(2_000, torch.Generator().manual_seed(8 if cfg.split == "test" else 9))
            self.eval_y = None
            self.shape = (2,)
            self.info.update(sizes={"train": 20_000, cfg.split: 2_000}, eval_split=cfg.split)
        self.bias_x = self.eval_x[: cfg.bias_samples]

    def batches(self, seed: int, steps: int, batch_size: int) -> Callable[[], Tensor]:
        """Mini-batches in an order fixed by ``seed``: reshuffled epochs over the train set."""
        gen = torch.Generator().manual_seed(seed)
        n = self.train_x.shape[0]
        state = {"order": torch.randperm(n, generator=gen), "pos": 0}

        def next_batch() -> Tensor:
            if state["pos"] + batch_size > n:
                state["order"], state["pos"] = torch.randperm(n, generator=gen), 0
            idx = state["order"][state["pos"] : state["pos"] + batch_size]
            state["pos"] += batch_size
            return self.train_x[idx]

        return next_batch


def _make_model(cfg: DemoConfig, data: _Data, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if cfg.dataset == "digits":
        return TinyUNet(in_channels=data.shape[0], channels=cfg.channels)
    return ToyMLP(dim=data.shape[0])


def _knobs(cfg: DemoConfig, method: str) -> dict[str, Any]:
    return method_knobs(
        method,
        lambda_adr=cfg.lambda_adr,
        lambda_fc=cfg.lambda_fc,
        rollout_steps=cfg.rollout_steps,
        num_sampling_steps=cfg.train_sampling_steps,
    )


def _loss_fn(cfg: DemoConfig, method: str) -> ReflexFlowLoss:
    return ReflexFlowLoss(**_knobs(cfg, method))


def train(
    cfg: DemoConfig, data: _Data, method: str, seed: int
) -> tuple[nn.Module, list[float], float]:
    """Train one model; returns (model, loss per step, wall seconds)."""
    device = torch.device(cfg.device)
    model = _make_model(cfg, data, seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    loss_fn = _loss_fn(cfg, method)
    next_batch = data.batches(seed, cfg.steps, cfg.batch_size)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    bar = progress(range(cfg.steps), desc=f"train {method} s{seed}", disable=not cfg.show_progress)
    for step in bar:
        x1 = next_batch().to(device)
        out = loss_fn(model, x1, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        losses.append(out.loss.detach().item())
        if step % 50 == 0 and hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"loss {losses[-1]:.4f}")
    model.eval()
    return model, losses, time.perf_counter() - start


def bias_k(cfg: DemoConfig, n_steps: int) -> int:
    """Rollout length of the bias curve at N steps: k = max(1, round(bias_span N)), k h < 1."""
    return max(1, min(round(cfg.bias_span * n_steps), n_steps - 1 if n_steps > 1 else 1))


def bias_curves(cfg: DemoConfig, data: _Data, model: nn.Module, seed: int) -> dict[str, Any]:
    """Exposure-bias curve (docs/method.md section 7) at every N of eval_steps, held-out data."""
    device = torch.device(cfg.device)
    curves = {}
    for n in cfg.eval_steps:
        k = bias_k(cfg, n)
        gen = torch.Generator(device=device).manual_seed(20_000 + seed)
        eb = exposure_bias(
            model,
            data.bias_x.to(device),
            num_sampling_steps=n,
            k=k,
            num_times=cfg.bias_times,
            generator=gen,
        )
        d = eb.as_dict()
        d["mean_mse"] = float(eb.mse.mean())
        curves[str(n)] = d
    return curves


class _Scorer:
    """Sample-quality scores against the evaluation split (features cached once)."""

    def __init__(self, cfg: DemoConfig, data: _Data, clf: nn.Module | None) -> None:
        self.cfg, self.data, self.clf = cfg, data, clf
        if clf is not None:
            self.real_feats, _ = M.batched_features(clf, data.eval_x)

    def __call__(self, x: Tensor) -> dict[str, float]:
        x = x.detach().float().cpu()
        scores: dict[str, float] = {}
        if self.clf is not None:
            x = x.clamp(-1, 1)
            feats, logits = M.batched_features(self.clf, x)
            scores["fd"] = M.frechet_distance(feats, self.real_feats)
            scores["precision"], scores["recall"] = M.precision_recall(self.real_feats, feats)
            scores["confidence"] = M.confidence(logits)
        else:
            ref = self.data.eval_x
            scores["mmd"] = M.mmd_rbf(x, ref)
            scores["precision"], scores["recall"] = M.precision_recall(ref, x)
        return scores


def evaluate(
    cfg: DemoConfig, data: _Data, scorer: _Scorer, model: nn.Module, seed: int, label: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Scores and bias curves of one model; returns (results, first samples per N)."""
    device = torch.device(cfg.device)
    noise = torch.randn(
        (cfg.num_samples, *data.shape), generator=torch.Generator().manual_seed(10_000 + seed)
    ).to(device)
    scores, grids = {}, {}
    for n in progress(cfg.eval_steps, desc=f"eval {label} s{seed}", disable=not cfg.show_progress):
        x = sample(model, noise, n).cpu()
        scores[str(n)] = scorer(x)
        grids[str(n)] = x[:16] if cfg.dataset == "digits" else x
    return {"scores": scores, "bias": bias_curves(cfg, data, model, seed)}, grids


def _downsample(values: list[float], points: int = 200) -> list[float]:
    """Mean over consecutive windows, at most ``points`` values (for the loss-curve plot)."""
    if len(values) <= points:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    edges = torch.linspace(0, len(values), points + 1).round().long().tolist()
    return [float(t[a:b].mean()) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _run_one(
    cfg: DemoConfig, data: _Data, scorer: _Scorer, method: str, seed: int
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Train and evaluate one (method, seed); returns (run record, sample grids)."""
    model, losses, train_s = train(cfg, data, method, seed)
    t0 = time.perf_counter()
    ev, grids = evaluate(cfg, data, scorer, model, seed, method)
    run = {
        "method": method,
        "seed": seed,
        "knobs": _knobs(cfg, method),
        "train_seconds": train_s,
        "eval_seconds": time.perf_counter() - t0,
        "final_loss": losses[-1],
        "loss_curve": _downsample(losses),
        **ev,
    }
    return run, grids


_WORKER: dict[str, Any] = {}


def _init_worker(cfg: DemoConfig, clf_state: dict[str, Tensor] | None) -> None:
    """Worker process: one torch thread budget, its own data and scorer (classifier given)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    data = _Data(cfg)
    clf = None
    if clf_state is not None:
        from .model import DigitClassifier

        clf = DigitClassifier(size=cfg.size)
        clf.load_state_dict(clf_state)
        clf.eval()
    _WORKER.update(cfg=cfg, data=data, scorer=_Scorer(cfg, data, clf))


def _worker_job(method: str, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    run, grids = _run_one(_WORKER["cfg"], _WORKER["data"], _WORKER["scorer"], method, seed)
    return run, {k: v.numpy() for k, v in grids.items()}


def _run_jobs(
    cfg: DemoConfig,
    data: _Data,
    scorer: _Scorer,
    clf: nn.Module | None,
    jobs: list[tuple[str, int]],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Tensor]]]:
    """Run every (method, seed), in this process or in ``cfg.workers`` processes.

    Every job is seeded on its own, so the numbers do not depend on the worker count.
    """
    done: dict[int, tuple[dict[str, Any], dict[str, Tensor]]] = {}
    key = "fd" if clf is not None else "mmd"
    main_n = str(cfg.eval_steps[0])

    def report(i: int, run: dict[str, Any], grids: dict[str, Tensor]) -> None:
        done[i] = (run, grids)
        _say(
            cfg,
            f"{run['method']:>14} seed {run['seed']}: {key}@{main_n} "
            f"{run['scores'][main_n][key]:.4g}, bias@{main_n} "
            f"{run['bias'][main_n]['mean_mse']:.4g}, train {run['train_seconds']:.1f}s "
            f"eval {run['eval_seconds']:.1f}s",
        )

    workers = min(cfg.workers, len(jobs))
    if workers <= 1:
        for i, (method, seed) in enumerate(
            progress(jobs, desc="runs", disable=not cfg.show_progress)
        ):
            report(i, *_run_one(cfg, data, scorer, method, seed))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        wcfg = dataclasses.replace(cfg, show_progress=False)
        state = None if clf is None else {k: v.cpu() for k, v in clf.state_dict().items()}
        with ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(wcfg, state),
        ) as pool:
            futures = {pool.submit(_worker_job, m, s): i for i, (m, s) in enumerate(jobs)}
            bar = progress(
                as_completed(futures),
                desc=f"runs ({workers} workers)",
                total=len(jobs),
                disable=not cfg.show_progress,
            )
            for fut in bar:
                run, grids = fut.result()
                report(futures[fut], run, {k: torch.from_numpy(v) for k, v in grids.items()})
    runs = [done[i][0] for i in range(len(jobs))]
    grids = {}
    for i, (method, seed) in enumerate(jobs):
        if seed == cfg.seeds[0]:
            grids[method] = done[i][1]
    return runs, grids


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished (joined) child processes."""
    total = time.process_time()
    try:
        import resource

        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        total += ru.ru_utime + ru.ru_stime
    except (ImportError, OSError):  # resource is POSIX-only
        pass
    return total


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    env: dict[str, Any] = {
        "reflexflow": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    for mod in ("sklearn", "matplotlib", "tqdm", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            env[mod] = None
    try:
        import os

        env["loadavg_start"] = list(os.getloadavg())
        env["cpu_count"] = os.cpu_count()
    except (OSError, AttributeError):
        pass
    return env


def _say(cfg: DemoConfig, text: str) -> None:
    if cfg.show_progress:
        say(text)


def run_demo(cfg: DemoConfig, command: str | None = None) -> dict[str, Any]:
    """Run the study and write results.json, results.md and the figures into cfg.out.

    ``command`` is recorded in the results (the CLI passes the command line).
    """
    from . import report  # imports matplotlib lazily (clear message when missing)

    report.check_plotting()
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but torch.cuda.is_available() is False")
    cfg.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    data = _Data(cfg)
    results: dict[str, Any] = {
        "command": command or "reflexflow.demo.run_demo(...)",
        "config": cfg.as_dict(),
        "environment": env,
        "data": data.info,
    }

    clf = None
    if cfg.dataset == "digits":
        t0 = time.perf_counter()
        clf, cached = M.load_or_train_classifier(
            data.split.train_x, data.split.train_y, cfg.cache_dir, show_progress=cfg.show_progress
        )
        clf = clf.to(cfg.device)
        acc = M.classifier_accuracy(clf, data.eval_x, data.eval_y)
        train_feats, _ = M.batched_features(clf, data.split.train_x[: cfg.num_samples])
        eval_feats, _ = M.batched_features(clf, data.eval_x)
        results["classifier"] = {
            "accuracy": acc,
            "eval_split": cfg.split,
            "from_cache": cached,
            "seconds": time.perf_counter() - t0,
            "fd_train_vs_eval": M.frechet_distance(train_feats, eval_feats),
            "precision_recall_train_vs_eval": M.precision_recall(eval_feats, train_feats),
        }
        _say(cfg, f"classifier: accuracy {acc:.3f} on the {cfg.split} split (cached: {cached})")
    scorer = _Scorer(cfg, data, clf)

    untrained = _make_model(cfg, data, cfg.seeds[0]).to(cfg.device).eval()
    results["untrained_bias"] = bias_curves(cfg, data, untrained, cfg.seeds[0])

    jobs = [(m, s) for m in cfg.methods for s in cfg.seeds]
    runs, grids = _run_jobs(cfg, data, scorer, clf, jobs)
    results["runs"] = runs
    results["summary"] = report.summarise(runs, cfg.eval_steps)
    results["wall_seconds"] = time.perf_counter() - wall0
    results["cpu_seconds"] = _cpu_seconds() - cpu0  # this process and its workers
    try:
        import os

        results["environment"]["loadavg_end"] = list(os.getloadavg())
    except (OSError, AttributeError):
        pass
    report.write_all(cfg, results, grids, data.eval_x)
    _say(
        cfg,
        f"wrote {cfg.out}/results.md, results.json and figures in {results['wall_seconds']:.0f} s",
    )
    return results
