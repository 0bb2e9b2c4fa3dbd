"""Run the study's (method, seed) jobs: resumable, and stopped promptly by Ctrl-C.

Every finished job is saved at once as one file of a run cache (``RunCache``), a folder
named by a hash of every setting that changes the numbers; a rerun with the same settings
loads finished jobs instead of training them again. With several workers, the workers
ignore SIGINT and the parent, on Ctrl-C, terminates them (``multiprocessing.Pool``'s
terminate) instead of waiting for the queued jobs, then raises :class:`DemoInterrupted`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RunCache",
    "DemoInterrupted",
    "run_jobs",
    "settings_key",
    "run_settings",
    "study_cache",
    "code_fingerprint",
]


class DemoInterrupted(KeyboardInterrupt):
    """Ctrl-C during the study; ``finished`` jobs are in the run cache (``cache_dir``)."""

    def __init__(self, finished: int, total: int, cache_dir: Path | None) -> None:
        super().__init__(f"interrupted after {finished} of {total} runs")
        self.finished, self.total, self.cache_dir = finished, total, cache_dir


def settings_key(settings: Any) -> str:
    """A short stable hash of JSON-able ``settings``."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# DemoConfig fields that change no number: left out of the run cache's key, so that the
# same study resumes whatever the output folder, the workers or --force
NOT_NUMERIC = (
    "out",
    "cache_dir",
    "show_progress",
    "workers",
    "threads",
    "methods",
    "seeds",
    "force",
)


# modules that only present, store or schedule finished runs (tables, figures, options,
# the output folder, this cache, progress lines): a change there reuses the cached runs
PRESENTATION_ONLY = frozenset(
    {
        "__main__.py",
        "cli.py",
        "demo/cli.py",
        "demo/figures.py",
        "demo/jobs.py",
        "demo/oracle_report.py",
        "demo/outdir.py",
        "demo/progress.py",
        "demo/report.py",
        "demo/seed_stats.py",
    }
)


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A short hash of the reflexflow package's Python sources (library and demo) that
    compute a run's numbers (all but :data:`PRESENTATION_ONLY`): a changed line there
    means new runs, never cached numbers of older code."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).as_posix() in PRESENTATION_ONLY:
            continue
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a study's numbers depend on (its run cache's key): the config
    (``DemoConfig.as_dict()``) without :data:`NOT_NUMERIC`, and the code's fingerprint."""
    settings = {k: v for k, v in config.items() if k not in NOT_NUMERIC}
    settings["code"] = code_fingerprint()
    return settings


def study_cache(cfg: Any) -> tuple[dict[str, Any], RunCache]:
    """(settings, cache) of a study: :func:`run_settings` of ``cfg`` (a DemoConfig) and
    its run cache, ``<cfg.cache_dir>/runs/<cfg.dataset>-<settings_key>`` (none without a
    cache_dir)."""
    settings = run_settings(cfg.as_dict())
    root = None
    if cfg.cache_dir is not None:
        root = Path(cfg.cache_dir) / "runs" / f"{cfg.dataset}-{settings_key(settings)}"
    return settings, RunCache(root)


class RunCache:
    """One file per finished job under ``root``; a job's file name hashes its own settings."""

    def __init__(self, root: Path | None) -> None:
        self.root = None if root is None else Path(root)

    def path(self, name: str, settings: Any) -> Path | None:
        if self.root is None:
            return None
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        return self.root / f"{safe}-{settings_key(settings)}.pt"

    def load(self, name: str, settings: Any) -> Any | None:
        path = self.path(name, settings)
        if path is None or not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=False)
        except Exception:  # a file cut short by a kill: train again
            return None

    def save(self, name: str, settings: Any, value: Any) -> None:
        path = self.path(name, settings)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(value, tmp)
        os.replace(tmp, path)  # atomic: a kill never leaves a half-written run


_WORKER: dict[str, Any] = {}


def _init(init: Callable[..., Any], initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C does
    try:
        _WORKER["state"] = init(*initargs)
    except Exception as err:  # raised from the first job: a Pool respawns failed initialisers
        _WORKER["error"] = err


def _call(fn: Callable[..., Any], args: tuple) -> Any:
    if "error" in _WORKER:
        raise _WORKER["error"]
    return fn(_WORKER["state"], *args)


def run_jobs(
    jobs: Sequence[tuple[str, Any, tuple]],
    fn: Callable[..., Any],
    *,
    init: Callable[..., Any],
    initargs: tuple,
    workers: int,
    cache: RunCache,
    on_done: Callable[[int, Any, bool], None] | None = None,
) -> list[Any]:
    """Results of ``fn(state, *args)`` for each job ``(name, settings, args)``, in order.

    ``state = init(*initargs)`` once per process. Cached jobs are loaded, the others run in
    this process (workers <= 1) or in a spawn pool; each result is cached as it arrives and
    reported by ``on_done(index, result, from_cache)``. Ctrl-C: the pool is terminated and
    :class:`DemoInterrupted` raised; finished jobs stay cached.
    """
    results: dict[int, Any] = {}
    todo: list[int] = []
    for i, (name, settings, _) in enumerate(jobs):
        hit = cache.load(name, settings)
        if hit is None:
            todo.append(i)
        else:
            results[i] = hit
            if on_done is not None:
                on_done(i, hit, True)

    def finish(i: int, value: Any) -> None:
        name, settings, _ = jobs[i]
        cache.save(name, settings, value)
        results[i] = value
        if on_done is not None:
            on_done(i, value, False)

    try:
        if todo and min(workers, len(todo)) <= 1:
            state = init(*initargs)
            for i in todo:
                finish(i, fn(state, *jobs[i][2]))
        elif todo:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(min(workers, len(todo)), initializer=_init, initargs=(init, initargs))
            try:
                pending = {i: pool.apply_async(_call, (fn, jobs[i][2])) for i in todo}
                while pending:
                    ready = [i for i, r in pending.items() if r.ready()]
                    if not ready:
                        next(iter(pending.values())).wait(0.2)
                        continue
                    for i in ready:
                        finish(i, pending.pop(i).get())
                pool.close()
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()
    except KeyboardInterrupt as err:
        raise DemoInterrupted(len(results), len(jobs), cache.root) from err
    return [results[i] for i in range(len(jobs))]
