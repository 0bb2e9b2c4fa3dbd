"""The environment of a benchmark run, its printed table and its JSON result file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "device_name",
    "device_slug",
    "environment",
    "format_step_table",
    "load_average",
    "step_markdown",
    "step_settings",
    "write_json",
]


def device_name(device: torch.device | str) -> str:
    """Human name of the device: the GPU's name on CUDA, the CPU model otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name or "cpu"


def device_slug(device: torch.device | str) -> str:
    """File-name tag of the device: "cpu", or the GPU name in lower case ("h100", "h200")."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = device_name(device).lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4", "a10g", "v100", "t4", "b200", "gh200"):
        if re.search(rf"\b{tag}\b", name):
            return tag
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken optional package: report None
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (what `uptime` prints), None where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device | str) -> dict[str, Any]:
    """Device, versions, date (UTC), CPU count, torch threads and the 1/5/15-min load."""
    device = torch.device(device)
    env = {
        "device": device_slug(device),
        "device_name": device_name(device),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "reflexflow": _version("reflexflow"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": load_average(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["capability"] = list(torch.cuda.get_device_capability(device))
    return env


def _fmt(value: Any, spec: str) -> str:
    """format(value, spec), or a right-aligned "-" of the same width for None."""
    return (
        format(value, spec) if value is not None else "-".rjust(int(spec.strip(">").split(".")[0]))
    )


def format_step_table(rows: list[dict[str, Any]]) -> str:
    """One line per (model, configuration): calls, GFLOP, FLOP ratio, median time, its
    spread ((max - min) / median over the timed steps), ideal, memory."""
    head = (
        f"{'model':<5} {'config':<34} {'calls':>5} {'GFLOP':>8} {'xFLOP':>6} "
        f"{'ms':>9} {'spread':>6} {'ideal ms':>9} {'vs ideal':>8} {'vs fm':>6} {'/shared':>7} "
        f"{'peak MiB':>8} {'saved MiB':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<5} {r['config']:<34} {r['model_calls']:>5} {r['gflop']:>8.2f} "
            f"{r['flop_ratio']:>6.2f} {r['time_ms']:>9.1f} {_fmt(r.get('spread'), '>6.0%')} "
            f"{r['ideal_ms']:>9.1f} "
            f"{r['vs_ideal']:>8.3f} {r['vs_fm']:>6.2f} {_fmt(r['vs_shared'], '>7.3f')} "
            f"{_fmt(r['peak_mem_mib'], '>8.1f')} {r['saved_act_mib']:>9.1f}"
        )
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating the parent folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return path


def write_device_result(
    results: str | Path, prefix: str, name: str, payload: dict[str, Any]
) -> Path:
    """Write ``payload`` to results/<prefix>-<slug>.json (indent 2), slug = ``name`` lowered
    with every non-alphanumeric character a dash; creates the folder, returns the path."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
    path = Path(results) / f"{prefix}-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def step_settings(payload: dict[str, Any]) -> str:
    """A step benchmark's settings in one line: size, batch, amp, warm-up, repetitions and
    threads (the text report's and the Markdown table's heading)."""
    env, s = payload["environment"], payload["step"]["settings"]
    return (
        f"size {s['size']}, batch {s['batch']}, amp {s['amp']}, {s['warmup']} warm-up "
        f"round(s), median of {s['reps']} timed steps, {env['torch_threads']} thread(s)"
    )


def step_markdown(payload: dict[str, Any]) -> str:
    """The step rows of a result file as a Markdown table (for benchmarks/README.md)."""
    env, step = payload["environment"], payload["step"]
    lines = [
        f"{env['device_name']}, torch {env['torch']}, {env['date_utc'][:10]}, "
        f"load {env['load_avg_start']}; {step_settings(payload)}.",
        "",
        "| model | config | calls | GFLOP | xFLOP | ms | ideal ms | vs ideal | vs FM | "
        "/ shared | peak MiB | saved MiB | saved / FM |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in step["rows"]:
        shared = "" if r["vs_shared"] is None else f"{r['vs_shared']:.3f}"
        peak = "n/a" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(
            f"| {r['model']} | {r['config']} | {r['model_calls']} | {r['gflop']:.2f} | "
            f"{r['flop_ratio']:.2f} | {r['time_ms']:.1f} | {r['ideal_ms']:.1f} | "
            f"{r['vs_ideal']:.3f} | {r['vs_fm']:.2f} | {shared} | {peak} | "
            f"{r['saved_act_mib']:.1f} | {r['saved_vs_fm']:.2f} |"
        )
    return "\n".join(lines)
