"""The study: train every method with the same budget, seeds and data order; evaluate.

For each (method, seed): a fresh velocity model (TinyUNet for digits, PatchUNet or SiT for
photos, ToyMLP for the 2-D toys), initialised by ``torch.manual_seed(seed)``; ``steps``
Adam steps (cosine learning rate) on mini-batches drawn by a data generator seeded with
``seed`` (the same order, and for photos the same crops, for every method); the loss's own
draws come from a second generator seeded with ``seed + 1``. Evaluation on the held-out
split (or the validation split, for tuning): Euler samples from the same noise for every
method at each step count N, scored by scoring.Scorer, and the exposure-bias curve of
docs/method.md section 7 with k Euler steps of h = 1/N spanning ``bias_span`` of the time axis
(k = round(span N)). Since seeds share data order and noise across methods, differences
from fm are paired by seed (report.paired_differences).
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..loss import ReflexFlowLoss
from ..sampler import sample
from . import metrics as M
from .data import TOYS, load_digits_split
from .jobs import run_jobs, study_cache
from .methods import check_method, method_knobs
from .model import DigitClassifier, PatchUNet, PhotoClassifier, TinyUNet, ToyMLP
from .progress import progress, say
from .scoring import Scorer, autocast, bias_curves
from .settings import DemoConfig, quick_config
from .sit import SIT_S2, SiT

__all__ = ["DemoConfig", "run_demo", "quick_config", "PATCH"]

PATCH = 2  # PatchUNet patch size on photos: 32x32x3 -> a 16x16 grid of 12-d patches


class _Data:
    """Train batches, evaluation reference set and bias set of one dataset."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.info: dict[str, Any] = {"dataset": cfg.dataset}
        self.crops = None
        if cfg.dataset == "digits":
            split = load_digits_split(cfg.size)
            self.split = split
            self.train_x = split.train_x
            self.eval_x = split.test_x if cfg.split == "test" else split.val_x
            self.eval_y = split.test_y if cfg.split == "test" else split.val_y
            self.shape = tuple(split.train_x.shape[1:])
            self.info.update(sizes=split.sizes(), eval_split=cfg.split, image_size=cfg.size)
        elif cfg.dataset == "photos":
            from .photos import load_photo_crops

            self.crops = load_photo_crops()
            self.eval_x, self.eval_y = self.crops.heldout(cfg.split, cfg.eval_size)
            self.shape = (3, 32, 32)
            self.info.update(
                sizes={"train": "unlimited", cfg.split: cfg.eval_size},
                eval_split=cfg.split,
                image_size=32,
                photos=list(self.crops.names),
                region_sizes=self.crops.region_sizes(),
                digest=self.crops.digest,
            )
            if torch.device(cfg.device).type != "cpu":
                self.crops.to(cfg.device)  # crops are cut on the device (one grid_sample)
        else:
            toy = TOYS[cfg.dataset]
            self.train_x = toy(20_000, torch.Generator().manual_seed(7))
            self.eval_x = toy(2_000, torch.Generator().manual_seed(8 if cfg.split == "test" else 9))
            self.eval_y = None
            self.shape = (2,)
            self.info.update(sizes={"train": 20_000, cfg.split: 2_000}, eval_split=cfg.split)
        self.bias_x = self.eval_x[: cfg.bias_samples]

    def batches(self, seed: int, steps: int, batch_size: int) -> Callable[[], Tensor]:
        """Mini-batches in an order fixed by ``seed``: reshuffled epochs over the train set,
        or (photos) fresh random crops of the train regions drawn by a generator of ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        if self.crops is not None:
            crops = self.crops
            return lambda: crops.sample(batch_size, "train", gen)[0]  # type: ignore[index]
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
    """A fresh velocity model, initialised by torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    if cfg.arch == "mlp":
        return ToyMLP(dim=data.shape[0])
    channels, size = data.shape[0], data.shape[-1]
    if cfg.arch == "sit":
        return SiT(in_channels=channels, image_size=size, **SIT_S2)
    if cfg.dataset == "photos":
        return PatchUNet(in_channels=channels, patch=PATCH, channels=cfg.channels)
    return TinyUNet(in_channels=channels, channels=cfg.channels)


def _knobs(cfg: DemoConfig, method: str) -> dict[str, Any]:
    return method_knobs(
        method,
        lambda_adr=cfg.lambda_adr,
        lambda_fc=cfg.lambda_fc,
        rollout_steps=cfg.rollout_steps,
        num_sampling_steps=cfg.train_sampling_steps,
    )


def _loss_fn(cfg: DemoConfig, method: str) -> ReflexFlowLoss:
    return check_method(method, _knobs(cfg, method))


def resolved_knobs(loss_fn: ReflexFlowLoss) -> dict[str, Any]:
    """The loss's configuration as plain values (what a preset resolved to), for the record:
    the knobs a user sets (init fields), not what the config derives from them. Numbers,
    strings and None as they are, sequences as lists, a path by its name, anything else
    (a time sampler, a module) by its class name."""
    return {
        f.name: _plain(getattr(loss_fn.config, f.name))
        for f in dataclasses.fields(loss_fn.config)
        if f.init
    }


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return getattr(value, "name", type(value).__name__)


def _term(out: Any, name: str) -> Tensor | None:
    value = getattr(out, name, None)
    return value.detach().float().reshape(()) if isinstance(value, Tensor) else None


def train(
    cfg: DemoConfig, data: _Data, method: str, seed: int, steps: int | None = None
) -> tuple[nn.Module, dict[str, list[float]], float]:
    """Train one model; returns (model, per-step curves, wall seconds).

    Curves: ``loss`` (the method's whole objective), ``fm_term`` (its FM-type term: the
    loss's fc_loss, or the whole loss of fm, ip and ss) and ``adr_term`` (L_ADR unweighted;
    NaN where the method has none).
    """
    from .oracle_study import row_steps

    # ``steps`` given: the caller sized the row (the oracle study); else fm-equal-compute
    # trains steps x equal_compute_ratio (a stated cost ratio), -long rows steps x
    # long_factor, every other row cfg.steps
    if steps is None:
        steps = row_steps(cfg, method, cfg.equal_compute_ratio or 1.0)
    device = torch.device(cfg.device)
    model = _make_model(cfg, data, seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = _loss_fn(cfg, method)
    next_batch = data.batches(seed, steps, cfg.batch_size)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    records: list[Tensor] = []
    nan = torch.tensor(float("nan"), device=device)
    start = time.perf_counter()
    model.train()
    bar = progress(range(steps), desc=f"train {method} s{seed}", disable=not cfg.show_progress)
    for step in bar:
        x1 = next_batch().to(device)
        with autocast(cfg):
            out = loss_fn(model, x1, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        loss = out.loss.detach().float().reshape(())
        fm_term, adr_term = _term(out, "fc_loss"), _term(out, "adr_loss")
        records.append(
            torch.stack(
                [loss, loss if fm_term is None else fm_term, nan if adr_term is None else adr_term]
            )
        )
        if step % 50 == 0 and hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"loss {float(loss):.4f}")
    model.eval()
    table = torch.stack(records).cpu().double()
    diverged = (~torch.isfinite(table[:, 0])).nonzero()
    if diverged.numel():  # one check after training: no host sync per step
        raise ValueError(
            f"the {method} run of seed {seed} diverged: its loss is not finite from step "
            f"{int(diverged[0, 0])} of {steps}; lower --lr (now {cfg.lr:g})"
        )
    curves = {name: table[:, i].tolist() for i, name in enumerate(("loss", "fm_term", "adr_term"))}
    return model, curves, time.perf_counter() - start


def evaluate(
    cfg: DemoConfig, data: _Data, scorer: Scorer, model: nn.Module, seed: int, label: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Scores, spectra and bias curves of one model; returns (results, first samples per N)."""
    device = torch.device(cfg.device)
    noise = torch.randn(
        (cfg.num_samples, *data.shape), generator=torch.Generator().manual_seed(10_000 + seed)
    ).to(device)
    scores, spectra, grids = {}, {}, {}
    for n in progress(cfg.eval_steps, desc=f"eval {label} s{seed}", disable=not cfg.show_progress):
        with autocast(cfg):
            x = sample(model, noise, n)
        x = x.float().cpu()
        scores[str(n)] = scorer(x)
        spectrum = scorer.spectrum(x)
        if spectrum is not None:
            spectra[str(n)] = spectrum
        grids[str(n)] = x[:16] if cfg.dataset in ("digits", "photos") else x
    result = {"scores": scores, "bias": bias_curves(cfg, data.bias_x, model, seed)}
    if spectra:
        result["spectra"] = spectra
    return result, grids


def _downsample(values: list[float], points: int = 200) -> list[float]:
    """Mean over consecutive windows, at most ``points`` values (for the loss-curve plot)."""
    if len(values) <= points:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    edges = torch.linspace(0, len(values), points + 1).round().long().tolist()
    return [float(t[a:b].mean()) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _run_one(
    cfg: DemoConfig, data: _Data, scorer: Scorer, method: str, seed: int
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Train and evaluate one (method, seed); returns (run record, sample grids)."""
    cpu0 = time.process_time()
    model, curves, train_s = train(cfg, data, method, seed)
    t0, cpu1 = time.perf_counter(), time.process_time()
    ev, grids = evaluate(cfg, data, scorer, model, seed, method)
    run = {
        "method": method,
        "seed": seed,
        "knobs": _knobs(cfg, method),
        "loss_config": resolved_knobs(_loss_fn(cfg, method)),
        "train_seconds": train_s,
        "eval_seconds": time.perf_counter() - t0,
        "train_cpu_seconds": cpu1 - cpu0,  # this process only (one job at a time)
        "eval_cpu_seconds": time.process_time() - cpu1,
        "final_loss": curves["loss"][-1],
        "loss_curve": _downsample(curves["loss"]),
        "term_curves": {k: _downsample(curves[k]) for k in ("fm_term", "adr_term")},
        **ev,
    }
    return run, grids


def _classifier(cfg: DemoConfig, data: _Data) -> nn.Module:
    """An untrained feature classifier of the dataset's kind (weights loaded by the caller)."""
    if cfg.dataset == "photos":
        from .photo_features import FeatureSettings

        return PhotoClassifier(data.crops.num_classes, FeatureSettings().feature_dim)
    return DigitClassifier(size=cfg.size)


def _init_state(cfg: DemoConfig, clf_state: dict[str, Tensor] | None) -> dict[str, Any]:
    """One process's state: its thread budget, its own data and scorer (classifier given)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    data = _Data(cfg)
    clf = None
    if clf_state is not None:
        clf = _classifier(cfg, data).to(cfg.device)
        clf.load_state_dict(clf_state)
        clf.eval()
    return {"cfg": cfg, "data": data, "scorer": Scorer(cfg.dataset, data.eval_x, clf)}


def _job(state: dict[str, Any], method: str, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    run, grids = _run_one(state["cfg"], state["data"], state["scorer"], method, seed)
    return run, {k: v.numpy() for k, v in grids.items()}


def _run_jobs(
    cfg: DemoConfig,
    data: _Data,
    scorer: Scorer,
    clf: nn.Module | None,
    jobs: list[tuple[str, int]],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Tensor]]]:
    """Run every (method, seed), in this process or in ``cfg.workers`` processes.

    Every job is seeded on its own, so the numbers do not depend on the worker count.
    Finished runs go to the run cache under cfg.cache_dir (jobs.RunCache): a rerun with the
    same settings resumes; Ctrl-C stops promptly (jobs.DemoInterrupted).
    """
    key = "fd" if clf is not None else "mmd"
    main_n = str(cfg.eval_steps[0])

    def report(i: int, result: Any, cached: bool) -> None:
        run = result[0]
        _say(
            cfg,
            f"{run['method']:>14} seed {run['seed']}: {key}@{main_n} "
            f"{run['scores'][main_n][key]:.4g}, bias@{main_n} "
            f"{run['bias'][main_n]['mean_mse']:.4g}"
            + (" (from the run cache)" if cached else f", train {run['train_seconds']:.1f}s"),
        )

    settings, cache = study_cache(cfg)
    specs = []
    for method, seed in jobs:
        run_key = {"settings": settings, "method": method, "seed": seed}
        run_key["loss"] = resolved_knobs(_loss_fn(cfg, method))
        specs.append((f"{method}-s{seed}", run_key, (method, seed)))
    wcfg = dataclasses.replace(cfg, show_progress=False)
    state = None if clf is None else {k: v.cpu() for k, v in clf.state_dict().items()}
    results = run_jobs(
        specs,
        _job,
        init=_init_state,
        initargs=(wcfg, state),
        workers=cfg.workers,
        cache=cache,
        on_done=report,
    )
    runs = [r[0] for r in results]
    grids = {}
    for (method, seed), (_, g) in zip(jobs, results, strict=True):
        if seed == cfg.seeds[0]:
            grids[method] = {k: torch.from_numpy(v) for k, v in g.items()}
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
    for mod in ("sklearn", "skimage", "matplotlib", "tqdm", "numpy"):
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


def _feature_network(cfg: DemoConfig, data: _Data) -> tuple[nn.Module | None, dict | None]:
    """The cached feature classifier of digits or photos and its record (None for toys).

    The record gives its held-out accuracy and, for scale, the scores of real training data
    against the evaluation split (the floor a perfect generator would reach).
    """
    t0 = time.perf_counter()
    if cfg.dataset == "digits":
        clf, cached = M.load_or_train_classifier(
            data.split.train_x, data.split.train_y, cfg.cache_dir, show_progress=cfg.show_progress
        )
        acc = M.classifier_accuracy(clf, data.eval_x, data.eval_y)
        record: dict[str, Any] = {"accuracy": acc, "eval_split": cfg.split}
        real_train = data.split.train_x[: cfg.num_samples]
        _say(cfg, f"classifier: accuracy {acc:.3f} on the {cfg.split} split (cached: {cached})")
    elif cfg.dataset == "photos":
        from .photo_features import FeatureSettings, load_or_train_photo_classifier

        settings = FeatureSettings(steps=cfg.feature_steps)
        clf, cached, key = load_or_train_photo_classifier(
            data.crops, settings, cfg.cache_dir, show_progress=cfg.show_progress
        )
        gen = torch.Generator().manual_seed(30_000)
        real_train, train_y = data.crops.sample(max(cfg.num_samples, 1024), "train", gen)
        acc = M.classifier_accuracy(clf, real_train.cpu(), train_y)
        real_train = real_train[: cfg.num_samples].cpu()
        record = {
            "accuracy": acc,
            "accuracy_on": "train-region crops (never seen by the classifier)",
            "trained_on": "val and test regions (the held-out band)",
            "eval_split": cfg.split,
            "accuracy_eval_split": M.classifier_accuracy(clf, data.eval_x, data.eval_y),
            "settings": dataclasses.asdict(settings),
            "key": key,
        }
        _say(
            cfg,
            f"photo classifier: accuracy {acc:.3f} on train-region crops it never saw "
            f"(cached: {cached})",
        )
    else:
        return None, None
    clf = clf.to(cfg.device)
    train_feats, _ = M.batched_features(clf, real_train)
    eval_feats, _ = M.batched_features(clf, data.eval_x)
    record.update(
        from_cache=cached,
        seconds=time.perf_counter() - t0,
        fd_train_vs_eval=M.frechet_distance(train_feats, eval_feats),
        precision_recall_train_vs_eval=M.precision_recall(eval_feats, train_feats),
    )
    if cfg.dataset == "photos":
        record["spectrum_train_vs_eval"] = Scorer(cfg.dataset, data.eval_x, None).spectrum_scores(
            real_train
        )
    return clf, record


def _say(cfg: DemoConfig, text: str) -> None:
    if cfg.show_progress:
        say(text)


def run_demo(cfg: DemoConfig, command: str | None = None) -> dict[str, Any]:
    """Run the study and write results.json, results.md and the figures into cfg.out.

    ``command`` is recorded in the results (the CLI passes the command line).
    """
    from .outdir import check_cache_dir, prepare_out

    check_cache_dir(cfg.cache_dir)  # before any training: a bad --cache-dir fails now
    prepare_out(cfg.out, cfg.force)  # and so does a bad --out
    if cfg.dataset == "oracle":
        from .oracle_study import run_oracle

        return run_oracle(cfg, command)
    from . import report  # imports matplotlib lazily (clear message when missing)

    report.check_plotting()
    if cfg.dataset == "photos" and cfg.device == "cpu":
        _say(cfg, "note: photos on a CPU is under-fitted: its samples are noise at this budget")
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but torch.cuda.is_available() is False")
    for method in cfg.methods:  # fail before any training if a row cannot be built
        _loss_fn(cfg, method)
    env = environment()
    data = _Data(cfg)
    results: dict[str, Any] = {
        "command": command or "reflexflow.demo.run_demo(...)",
        "config": cfg.as_dict(),
        "environment": env,
        "data": data.info,
    }

    clf, record = _feature_network(cfg, data)
    if record is not None:
        results["classifier"] = record
    scorer = Scorer(cfg.dataset, data.eval_x, clf)
    if scorer.real_spectrum is not None:
        results["data_spectrum"] = scorer.real_spectrum.tolist()

    untrained = _make_model(cfg, data, cfg.seeds[0]).to(cfg.device).eval()
    results["untrained_bias"] = bias_curves(cfg, data.bias_x, untrained, cfg.seeds[0])

    jobs = [(m, s) for m in cfg.methods for s in cfg.seeds]
    runs, grids = _run_jobs(cfg, data, scorer, clf, jobs)
    results["runs"] = runs
    results["summary"] = report.summarise(runs, cfg.eval_steps)
    results["vs_fm"] = report.paired_differences(runs, cfg.eval_steps)
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
