"""Options of ``reflexflow demo`` and the glue from parsed arguments to :func:`run_demo`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..cli import device_argument
from .data import TOYS
from .deps import MissingExtraError
from .methods import METHODS, parse_method
from .settings import preset_values

__all__ = ["add_demo_arguments", "run_from_args", "config_from_args"]

DESCRIPTION = """\
The main job: does ReflexFlow improve samples for what it costs? A measured study; every
row trains on the same seeds and data order, differences from fm are paired by seed.

--dataset oracle (default): an exact oracle. A fixed mixture of 8 Gaussians on 4x16x16
images (1024 dimensions, natural-image power spectra) whose true velocity u* is closed
form, so every score is exact: Frechet distance to the mixture's analytic moments at 5,
10 and 20 Euler steps with u*'s own samples as the floor, low/high-band variance ratios,
mode coverage, exact log-likelihood, and exposure bias itself (the model's Euler path
against u*'s from the same noise; its velocity error on its own states against clean
x_t). Rows: fm; fm-equal-compute (fm trained for the measured cost of the default
preset); reflexflow = the library's default preset (defar: one grid step h = 1/50, mse
ADR x1, velocity-space FC x1); the presets arioso, simpletuner, grid-direction; ss, ip;
fm-stable, defar-stable; fm-long and reflexflow-long (2x the steps). results.md lists the
resolved knobs of every row.
%(oracle_time)s;
--quick %(quick_time)s.

--dataset digits: the earlier study, a TinyUNet on scikit-learn's 8x8 digits scored in a
digit classifier's features; rows fm, fm-equal-compute (fm for 2x the steps: the model
FLOP ratio of a gd-direction step), ip, ss and gd-direction, gd-mse, gd-adr-only,
gd-fc-only: the grid-direction preset (direction ADR x10, state-space FC x1) with the
digits knobs (--lambda-adr, --lambda-fc, --rollout-steps, --train-sampling-steps; rollout
step h = 1/20).
%(digits_time)s.

--dataset photos (optional): 32x32x3 crops of scikit-image's photographs. At the CPU
budget its models emit coloured noise and its FD intervals are too wide to decide
(docs/demo.md); it is kept for GPU runs (--device cuda: SiT-S/2, 20K steps).

Writes results.json, results.md and figures to --out (a new or empty folder; --force to
replace the demo's files); finished runs are cached under --cache-dir, so a run stopped
with Ctrl-C resumes where it stopped. Needs the demo extra: pip install "reflexflow[demo]"."""

# measured wall times (docs/demo.md "Timing"), printed in --help
TIMES = {
    "oracle_time": "About 8 minutes with 2 workers on 2 idle cores (measured: 559 s wall and\n"
    "854 s CPU on a 2-core machine at load 1.3 to 1.9 with other jobs, docs/demo.md)",
    "quick_time": "about 20 CPU-seconds (measured: 40 s wall at load 3)",
    "digits_time": "About 3 minutes with 2 workers on 2 idle cores (measured: CPU time 392 s,\n"
    "docs/demo.md)",
}

QUICK_HELP = "(digits: %s, with --quick %s; oracle and photos: the presets of docs/demo.md)"


def _out_path(text: str) -> Path:
    """--out: a folder path; a path naming an existing file is an argparse error."""
    from .outdir import check_out_path

    try:
        return check_out_path(Path(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _default_methods_help() -> str:
    """The methods each dataset's CPU preset runs (settings.preset_values), for --help."""

    def rows(dataset: str, quick: bool = False) -> str:
        return ",".join(preset_values(dataset, quick, "cpu")["methods"])

    return (
        f"default: {rows('oracle')} for the oracle, {rows('oracle', True)} with --quick; "
        f"{rows('digits')} for digits, {rows('digits', True)} with --quick, "
        f"{rows(next(iter(TOYS)))} for the toys, {rows('photos')} for photos, "
        f"{rows('photos', True)} with --quick"
    )


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


def _seeds(text: str) -> tuple[int, ...]:
    """'3' -> seeds 0, 1, 2; '0,5,9' -> those seeds."""
    vals = _ints(text)
    if len(vals) == 1 and "," not in text:
        if vals[0] < 1:
            raise argparse.ArgumentTypeError(f"--seeds count must be >= 1, got {vals[0]}")
        return tuple(range(vals[0]))
    return vals


def _methods(text: str) -> tuple[str, ...]:
    """'fm,defar:lambda_adr=0.5' -> ('fm', 'defar:lambda_adr=0.5'); 'all' -> every row."""
    if text == "all":
        return tuple(METHODS)
    vals = tuple(v.strip() for v in text.split(",") if v.strip())
    if not vals:
        raise argparse.ArgumentTypeError(f"expected methods, choose from {tuple(METHODS)}")
    for v in vals:
        try:
            parse_method(v)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err
    return vals


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """Register every option of ``reflexflow demo`` on parser ``p``."""
    p.description = DESCRIPTION % TIMES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--quick",
        action="store_true",
        help="a fast preset for smoke tests (oracle: fm, reflexflow, fm-long; 2 seeds, 30 "
        "steps, 5 and 10 sampling steps, 128 samples; digits: fm, ss, gd-direction; 2 seeds, "
        "40 steps, 100 samples; photos: fm, defar, defar-stable, a narrow PatchUNet, 2 seeds, "
        "30 steps, 64 samples); options given explicitly still win",
    )
    p.add_argument(
        "--out",
        type=_out_path,
        default=None,
        help="output folder, new or empty (default: reflexflow-demo, or reflexflow-demo-quick)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out, removing the demo's own files there first "
        "(results.json, results.md and its figures; other files stay)",
    )
    p.add_argument(
        "--dataset",
        choices=("oracle", "digits", "photos", "checkerboard", "8gaussians"),
        default=None,
        help="oracle (default: the exact-oracle study); digits (the 8x8 digits study); "
        "photos (optional: 32x32x3 crops, noise at the CPU budget); or a 2-D toy for a "
        "fast ADR-only view (an MLP, scored by MMD^2 and precision/recall in data space)",
    )
    p.add_argument(
        "--size",
        type=int,
        choices=(8, 16),
        default=None,
        help="digit image size: 8 (original, default) or 16 (bilinear upsampling)",
    )
    p.add_argument(
        "--methods",
        type=_methods,
        default=None,
        help="comma-separated methods, or 'all'; choices: "
        + ", ".join(METHODS)
        + f" ({_default_methods_help()}). "
        + "A row takes overrides of its loss knobs as name:knob=value[:knob=value], "
        + "e.g. defar:lambda_adr=0.5 (a row of its own: sweeps on --split val). --lambda-adr, "
        + "--lambda-fc, --rollout-steps and --train-sampling-steps apply to the digits "
        + "study's rows only; preset and stable rows keep the library's values",
    )
    p.add_argument(
        "--seeds",
        type=_seeds,
        default=None,
        help="number of seeds (N -> 0..N-1) or a comma list " + QUICK_HELP % ("3", "2"),
    )
    p.add_argument(
        "--long-factor",
        type=int,
        default=None,
        help="oracle: the -long rows train this many times the steps (default: 2)",
    )
    p.add_argument(
        "--equal-compute-ratio",
        type=float,
        default=None,
        help="oracle: fm-equal-compute trains steps x this (default: measured, the CPU time "
        "of one reflexflow step over one fm step on the study's model)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per method and seed "
        + QUICK_HELP % ("400", "40")
        + " (oracle: 200, 30 with --quick)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="training batch (default: 32 for the oracle, 64 for digits and the 2-D toys; "
        "photos: 32 on a CPU, 16 on cuda)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Adam learning rate, cosine-decayed to 0 (default: 0.002; photos on cuda: 1e-4)",
    )
    p.add_argument(
        "--channels",
        type=_ints,
        default=None,
        help="UNet widths per level, comma list (default: 16,32 for digits; 24,48 for the "
        "photos PatchUNet, 8,16 with --quick)",
    )
    p.add_argument(
        "--eval-steps",
        type=_ints,
        default=None,
        help="Euler step counts N to sample and measure bias at "
        + QUICK_HELP % ("10,20,50", "10,20"),
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="generated samples per model and N " + QUICK_HELP % ("500", "100"),
    )
    p.add_argument(
        "--bias-samples",
        type=int,
        default=None,
        help="held-out samples of the exposure-bias curve " + QUICK_HELP % ("128", "64"),
    )
    p.add_argument(
        "--bias-span",
        type=float,
        default=None,
        help="time span of the bias rollout: k = round(span * N) Euler steps of "
        "h = 1/N (default: 0.2)",
    )
    p.add_argument(
        "--lambda-adr",
        type=float,
        default=None,
        help="ADR weight of the digits study's gd- rows (default: 10, the grid-direction "
        "preset's; the library's default preset, defar, uses 1)",
    )
    p.add_argument(
        "--lambda-fc",
        type=float,
        default=None,
        help="FC weight of the digits study's gd- rows (default: 1)",
    )
    p.add_argument(
        "--rollout-steps", type=int, default=None, help="training rollout length K (default: 1)"
    )
    p.add_argument(
        "--train-sampling-steps",
        type=int,
        default=None,
        help="training rollout step h = 1/this (default: 20)",
    )
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default=None,
        help="score on the held-out test split (default) or on the validation "
        "split, to choose knobs without touching the test split",
    )
    p.add_argument(
        "--device",
        type=device_argument,
        default=None,
        help="torch device, e.g. cpu or cuda (default: cpu); photos on cuda switch to the "
        "SiT-S/2 preset (20K steps, batch 16, bf16 autocast)",
    )
    p.add_argument(
        "--arch",
        choices=("unet", "sit"),
        default=None,
        help="velocity model of the image datasets: unet (TinyUNet for digits, PatchUNet "
        "for photos; the CPU default) or sit (SiT-S/2: patch 2, hidden 384, depth 12, "
        "6 heads, adaLN-zero; the photos default on cuda)",
    )
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast for training, sampling and bias curves (default: on for sit on "
        "cuda, else off)",
    )
    p.add_argument(
        "--eval-size",
        type=int,
        default=None,
        help="photos: held-out crops of the evaluation split, the reference set of every "
        "score (default: 1024 on a CPU, 2048 on cuda, 256 with --quick)",
    )
    p.add_argument(
        "--feature-steps",
        type=int,
        default=None,
        help="photos: training steps of the photo classifier (cached by its settings; "
        "default: 600, 100 with --quick)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1; tiny models gain little from more threads and "
        "lose much when other processes share the cores)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the feature classifier is cached (default: "
        "$XDG_CACHE_HOME/reflexflow or ~/.cache/reflexflow)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that train (method, seed) runs side by side on CPU; the numbers do "
        "not depend on it (default: 2 on a CPU with 2 or more cores, 1 with --quick or "
        "a GPU)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars or messages")


_FIELDS = {
    "dataset": "dataset",
    "size": "size",
    "methods": "methods",
    "seeds": "seeds",
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "channels": "channels",
    "eval_steps": "eval_steps",
    "num_samples": "num_samples",
    "bias_samples": "bias_samples",
    "bias_span": "bias_span",
    "lambda_adr": "lambda_adr",
    "lambda_fc": "lambda_fc",
    "rollout_steps": "rollout_steps",
    "train_sampling_steps": "train_sampling_steps",
    "split": "split",
    "device": "device",
    "threads": "threads",
    "workers": "workers",
    "arch": "arch",
    "amp": "amp",
    "eval_size": "eval_size",
    "feature_steps": "feature_steps",
    "long_factor": "long_factor",
    "equal_compute_ratio": "equal_compute_ratio",
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "reflexflow"


def config_from_args(args: argparse.Namespace) -> Any:
    """DemoConfig from parsed options: explicit options, the rest from the dataset's preset
    (settings.preset_values: quick, CPU or cuda)."""
    from .settings import DemoConfig

    given = {f: getattr(args, a) for a, f in _FIELDS.items() if getattr(args, a) is not None}
    dataset = given.get("dataset", DemoConfig.dataset)
    if "size" in given and dataset != "digits":
        raise ValueError(f"--size sets the digit image size; dataset {dataset!r} has its own")
    given["out"] = args.out or Path("reflexflow-demo-quick" if args.quick else "reflexflow-demo")
    given["cache_dir"] = args.cache_dir or default_cache_dir()
    given["show_progress"] = not args.no_progress
    given["force"] = bool(getattr(args, "force", False))
    if "workers" not in given:  # two processes on a 2-core CPU, except for --quick
        cpu = given.get("device", "cpu") == "cpu"
        given["workers"] = 1 if args.quick or not cpu else max(1, min(2, os.cpu_count() or 1))
    return DemoConfig(quick=bool(args.quick), **given)


def _command(args: argparse.Namespace) -> str:
    parts = ["reflexflow demo"]
    for key, value in vars(args).items():
        if key in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, tuple):
            parts.append(f"{flag} {','.join(str(v) for v in value)}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo; print a short summary and where the files are.

    Exit status 2 with a clear message on bad settings or a missing demo extra; 130 on
    Ctrl-C, after saying how many runs are cached for the next run with the same settings.
    """
    from .jobs import DemoInterrupted
    from .study import run_demo

    try:
        cfg = config_from_args(args)
        results = run_demo(cfg, command=_command(args))
    except MissingExtraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DemoInterrupted as err:
        where = f" in {err.cache_dir}" if err.cache_dir is not None else ""
        print(
            f"\ninterrupted: {err.finished} of {err.total} runs finished and are kept{where}; "
            "the same command resumes from them",
            file=sys.stderr,
        )
        return 130
    for line in summary(cfg, results):
        print(line)
    return 0


def summary(cfg: Any, results: dict[str, Any]) -> list[str]:
    """What the terminal shows after a run: a few lines of headline numbers and the files."""
    lines: list[str] = []
    if cfg.dataset == "oracle":
        from .oracle_report import summary_lines

        lines += summary_lines(cfg, results)
    else:
        from .report import table_metrics

        metric = table_metrics(cfg.dataset)[0]
        n = str(cfg.eval_steps[0])
        lines.append(f"{'row':>16}  {metric}@{n} (mean over seeds)")
        for m, per in results["summary"].items():
            lines.append(f"{m:>16}  {per[n][metric]['mean']:.4g}")
    from .outdir import own_files

    files = own_files(Path(cfg.out))  # not the user's other files in --out
    lines.append(f"wrote {len(files)} files to {cfg.out}/ ({', '.join(files)})")
    lines.append(f"full tables: {cfg.out}/results.md ({results['wall_seconds']:.0f} s wall time)")
    return lines
