"""``reflexflow bench``: the step, loss, rollout and stable benchmarks; one table, a JSON on
request. (The command's arguments live in reflexflow/cli.py, which finds this package in
a source checkout.)

Nothing is written unless ``--out PATH`` is given, and an existing file is kept unless
``--force``: run from a checkout, the bench cannot overwrite a committed result. While it
runs it prints, on stderr, which stage it is in and how many are left.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from ..suites import SUITES, format_rows, run_suite
from .report import environment, format_step_table, load_average, step_settings, write_json
from .step import (
    MIN_REPS,
    NOISE_LIMIT,
    available_backends,
    run_step_benchmark,
    step_specs,
    summarize,
)

__all__ = [
    "run_bench",
    "run_from_args",
    "check_out",
    "goal_line",
    "QUICK",
    "DEFAULT_CPU",
    "DEFAULT_GPU",
]

# step-benchmark settings: --quick (a smoke test: tiny sizes, but still one warm-up round
# and MIN_REPS timed rounds, so that every figure comes with its spread), the CPU default
# (a few minutes on 2 cores) and the CUDA default (SiT-S/2-sized DiT and a 128-channel
# UNet, batch 64, bf16)
QUICK = {"size": "quick", "batch": 2, "rollout_steps": (1,), "reps": MIN_REPS, "warmup": 1}
DEFAULT_CPU = {"size": "small", "batch": 8, "rollout_steps": (1, 2, 4), "reps": 5, "warmup": 1}
DEFAULT_GPU = {"size": "gpu", "batch": 64, "rollout_steps": (1, 2, 4), "reps": 10, "warmup": 3}


def check_out(out: str | Path | None, force: bool = False) -> Path | None:
    """The JSON path to write, checked before any benchmark runs.

    None writes nothing. An existing file is refused (ValueError) unless ``force``;
    a directory is refused always, and so is a path whose folder cannot be made or written
    (its nearest existing ancestor is a file, or not writable), so that a run is never
    lost at the end for want of a place to write it.
    """
    if out is None:
        return None
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"out must be a file path, {str(path)!r} is a directory")
    if path.exists() and not force:
        raise ValueError(
            f"out {str(path)!r} exists: pass force=True (--force) to overwrite it, or another path"
        )
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"out {str(path)!r} cannot be written: {str(folder)!r} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"out {str(path)!r} cannot be written: {str(folder)!r} is not writable")
    return path


def run_bench(
    device: str | None = None,
    *,
    quick: bool = False,
    out: str | Path | None = None,
    force: bool = False,
    models: tuple[str, ...] = ("dit", "unet"),
    overrides: dict[str, Any] | None = None,
    threads: int | None = None,
    stream: TextIO | None = None,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    """Run every benchmark present on ``device``, print one report; write the JSON to ``out``.

    device defaults to CUDA when available, else CPU. ``out`` None (the default) writes
    no file; an existing ``out`` is refused before anything runs unless ``force``.
    ``overrides`` replace step-benchmark settings (size, batch, rollout_steps, reps,
    warmup, amp, backends). threads sets torch's intra-op CPU threads for the run (1
    gives steadier figures on a loaded CPU). The report goes to ``stream`` (stdout),
    one progress line per stage to ``progress`` (stderr). Returns the JSON payload.
    """
    path = check_out(out, force)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_bench(
                device,
                quick=quick,
                out=path,
                force=True,  # checked above
                models=models,
                overrides=overrides,
                stream=stream,
                progress=progress,
            )
        finally:
            torch.set_num_threads(before)
    stream = stream if stream is not None else sys.stdout
    progress = progress if progress is not None else sys.stderr
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available")
    if not models:
        raise ValueError("models must name at least one model ('dit', 'unet')")
    settings = dict(QUICK if quick else DEFAULT_GPU if dev.type == "cuda" else DEFAULT_CPU)
    settings.update(overrides or {})
    env = environment(dev)
    start = time.perf_counter()
    stages = len(models) + len(SUITES)
    configs = _config_count(dev, settings)
    reps, warmup = settings.get("reps", 5), settings.get("warmup", 1)
    parts = []
    for i, name in enumerate(models, 1):
        _say(
            progress,
            f"[{i}/{stages}] step benchmark on {name}: {configs} configurations (fm first), "
            f"{warmup} warm-up + {reps} timed steps each",
        )
        t0 = time.perf_counter()
        parts.append(run_step_benchmark(dev, models=(name,), **settings))
        _say(progress, f"      done in {time.perf_counter() - t0:.1f} s")
    step = _merge_step_results(parts, models)
    suites = {}
    for i, name in enumerate(SUITES, len(models) + 1):
        _say(progress, f"[{i}/{stages}] {name} suite")
        t0 = time.perf_counter()
        suites[name] = run_suite(name, str(dev), quick)
        _say(progress, f"      {suites[name]['status']} in {time.perf_counter() - t0:.1f} s")
    env["load_avg_end"] = load_average()
    payload = {
        "environment": env,
        "elapsed_s": round(time.perf_counter() - start, 1),
        "step": step,
        "suites": suites,
    }
    print(_report(payload), file=stream)
    if path is not None:
        write_json(path, payload)
        print(f"wrote {path}", file=stream)
    else:
        print("JSON not written (pass --out PATH to keep it)", file=stream)
    return payload


def _say(progress: TextIO, line: str) -> None:
    print(line, file=progress, flush=True)


def _config_count(device: torch.device, settings: dict[str, Any]) -> int:
    """How many step configurations one model runs (FM plus every ReflexFlow one)."""
    backends = settings.get("backends")
    if backends is None:
        backends = available_backends(device)[0]
    return len(step_specs(backends, settings.get("rollout_steps", (1, 2, 4))))


def _merge_step_results(parts: list[dict[str, Any]], models: tuple[str, ...]) -> dict[str, Any]:
    """One step-benchmark result from per-model runs (settings, rows, summary)."""
    rows = [row for part in parts for row in part["rows"]]
    settings = dict(parts[0]["settings"], models=list(models))
    return {
        "settings": settings,
        "rows": rows,
        "skipped_backends": parts[0]["skipped_backends"],
        "summary": summarize(rows),
    }


GOALS = (
    ("max_vs_ideal", "1.05 on H100/H200"),
    ("k1_shared_vs_fm", "2.1 on CPU, 2.05 on H100/H200"),
    ("k1_shared_vs_joint", "0.9"),
    ("max_lean_saved_vs_fm", "1.1"),
)


def goal_line(key: str, entry: dict[str, Any], goal: str) -> str:
    """One summary line: the figure, its spread over the timed rounds, and the goal, or
    why the figure cannot be held against the goal (fewer than MIN_REPS timed rounds, or
    (max - min) > NOISE_LIMIT of the median)."""
    where = f"{entry['model']}, {entry['config']}"
    if "reps" not in entry:  # counted, not timed
        return f"{key}: {entry['value']:.3f} ({where}); goal <= {goal}"
    head = (
        f"{key}: {entry['value']:.3f} (min {entry['min']:.3f}, max {entry['max']:.3f} over "
        f"{entry['reps']} timed rounds; {where})"
    )
    if entry["reps"] < MIN_REPS:
        return (
            f"{head}: too few timed rounds ({entry['reps']} < {MIN_REPS}) to compare with "
            f"the goal <= {goal}"
        )
    if entry["spread"] > NOISE_LIMIT:
        return (
            f"{head}: too noisy to compare with the goal <= {goal} (spread "
            f"{entry['spread']:.0%} of the median > {NOISE_LIMIT:.0%}; try --threads 1, "
            "more --reps or a quieter machine)"
        )
    return f"{head}; goal <= {goal}"


def _report(payload: dict[str, Any]) -> str:
    env, step = payload["environment"], payload["step"]
    s = step["settings"]
    lines = [
        f"reflexflow bench on {env['device']} ({env['device_name']}), torch {env['torch']}, "
        f"triton {env['triton']}, {env['date_utc']}, load {env['load_avg_start']} -> "
        f"{env['load_avg_end']}",
        "",
        f"== Training step: {step_settings(payload)}",
        "(vs ideal = ms / (opt ms + (fm ms - opt ms) x FLOP ratio); 1.00 = only model work; "
        "/shared = ms / the shared mode's ms at the same K; spread = (max - min) / median)",
        format_step_table(step["rows"]),
    ]
    for key, goal in GOALS:
        entry = step["summary"][key]
        if entry is not None:
            lines.append(goal_line(key, entry, goal))
    lines.append(f"peak memory: {s['peak_memory']}")
    for backend, reason in step["skipped_backends"].items():
        lines.append(f"backend {backend!r}: not available: {reason}")
    for name, suite in payload["suites"].items():
        lines += ["", f"== {name}: {suite['status']} ({suite['source']})"]
        if suite["rows"]:
            lines.append(format_rows(suite["rows"]))
    lines.append(f"\nelapsed {payload['elapsed_s']} s on {os.cpu_count()} CPUs")
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    """``reflexflow bench`` with the parsed arguments of reflexflow/cli.py."""
    overrides = {
        key: val
        for key, val in {
            "size": args.size,
            "batch": args.batch,
            "reps": args.reps,
            "warmup": args.warmup,
        }.items()
        if val is not None
    }
    try:
        check_out(args.out, args.force)
    except ValueError as err:
        print(f"reflexflow bench: {err}", file=sys.stderr)
        return 2
    run_bench(
        args.device,
        quick=args.quick,
        out=args.out,
        force=args.force,
        models=tuple(args.models),
        overrides=overrides,
        threads=args.threads,
    )
    return 0
