"""Options of ``reflexflow demo`` and the glue from parsed arguments to :func:`run_demo`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .deps import MissingExtraError
from .methods import (
    DEFAULT_METHODS,
    METHODS,
    PHOTO_METHODS,
    PHOTO_QUICK_METHODS,
    QUICK_METHODS,
    TOY_METHODS,
    parse_method,
)

__all__ = ["add_demo_arguments", "run_from_args", "config_from_args"]

DESCRIPTION = """\
The main job: a measured exposure-bias and sample-quality study on real data.
Every method trains at the same step budget, seeds and data order, and is scored on a
held-out split at 10, 20 and 50 Euler steps, with differences from fm paired by seed.

--dataset digits (default): a small time-conditioned UNet on scikit-learn's handwritten
digits (8x8, embedded, nothing downloaded); rows fm, ip, ss, reflexflow (direction ADR),
reflexflow-mse, adr-only, fc-only; scored by Frechet distance in the features of a small
digit classifier (trained once, cached), its confidence, k-NN precision/recall and the
exposure-bias curve (docs/method.md section 7). About 10 CPU-minutes (about 5 minutes with the
default 2 workers on 2 cores); --quick under a minute.

--dataset photos: 32x32x3 crops (3072 dimensions) of the colour photographs inside
scikit-image's wheel, random crops with rescale and flip from a train region of each
photograph, held-out crops from a band training never sees; rows fm, ip, ss, the presets
defar, arioso, simpletuner, grid-direction, and stable targets without and with ADR
(fm-stable, defar-stable). Adds the photographs' power spectrum (low and high band) to
the scores; the feature network tells which photograph a crop comes from. On a CPU a
PatchUNet sized for under 15 minutes with 2 workers on 2 cores; --device cuda: SiT-S/2,
20K steps, bf16 autocast.

Writes results.json, results.md, samples-<method>.png, exposure-bias.png, loss-curves.png,
differences.png (and spectrum.png for photos) to --out. Needs the demo extra:
pip install "reflexflow[demo]"."""

QUICK_HELP = "(digits: %s, with --quick %s; photos: the presets of docs/demo.md)"


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
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--quick",
        action="store_true",
        help="a fast preset for smoke tests (digits: fm, ss, reflexflow; 2 seeds, 40 steps, "
        "10 and 20 sampling steps, 100 samples; photos: fm, ss, reflexflow-mse, a narrow "
        "PatchUNet, 2 seeds, 30 steps, 64 samples); options given explicitly still win",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: reflexflow-demo, or reflexflow-demo-quick)",
    )
    p.add_argument(
        "--dataset",
        choices=("digits", "photos", "checkerboard", "8gaussians"),
        default=None,
        help="digits (default); photos (32x32x3 crops of scikit-image's photographs, the "
        "higher-dimensional study); or a 2-D toy for a fast ADR-only view (an MLP, "
        "scored by MMD^2 and precision/recall in data space)",
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
        + f" (default: {','.join(DEFAULT_METHODS)} for digits, "
        + f"{','.join(QUICK_METHODS)} with --quick, {','.join(TOY_METHODS)} for the toys, "
        + f"{','.join(PHOTO_METHODS)} for photos, {','.join(PHOTO_QUICK_METHODS)} with "
        + "--quick). A row takes overrides of its loss knobs as name:knob=value[:knob=value], "
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
        "--steps",
        type=int,
        default=None,
        help="training steps per method and seed " + QUICK_HELP % ("400", "40"),
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="training batch (default: 64; photos: 32 on a CPU, 128 on cuda)",
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
        help="ADR weight of the reflexflow rows (default: 10, the library's)",
    )
    p.add_argument(
        "--lambda-fc",
        type=float,
        default=None,
        help="FC weight of the reflexflow rows (default: 1, the library's)",
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
        default=None,
        help="torch device, e.g. cpu or cuda (default: cpu); photos on cuda switch to the "
        "SiT-S/2 preset (20K steps, batch 128, bf16 autocast)",
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
        "score (default: 1024 on a CPU, 4096 on cuda, 256 with --quick)",
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
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "reflexflow"


def config_from_args(args: argparse.Namespace) -> Any:
    """DemoConfig from parsed options: explicit options, the rest from the dataset's preset
    (settings.preset_values: quick, CPU or cuda)."""
    from .settings import DemoConfig

    given = {f: getattr(args, a) for a, f in _FIELDS.items() if getattr(args, a) is not None}
    given["out"] = args.out or Path("reflexflow-demo-quick" if args.quick else "reflexflow-demo")
    given["cache_dir"] = args.cache_dir or default_cache_dir()
    given["show_progress"] = not args.no_progress
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
    """Run the demo; exit status 2 with a clear message when the demo extra is missing."""
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
    print((cfg.out / "results.md").read_text())
    print(f"results in {cfg.out}/ ({results['wall_seconds']:.0f} s)")
    return 0
