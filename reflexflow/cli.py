"""The ``reflexflow`` console command: ``example``, ``demo``, ``bench`` and ``info``.

``bench`` runs the benchmarks of a source checkout (benchmarks/ next to the package, as
an editable install has it); the installed package carries no benchmark code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "checkout_root", "device_argument", "runtime_info"]

REPOSITORY = "https://github.com/reflexflow/reflexflow"


def checkout_root() -> Path:
    """The folder holding the ``reflexflow`` package: a source checkout's root when the
    package is imported from one (editable install, PYTHONPATH)."""
    return Path(__file__).resolve().parent.parent


def _benchmarks_here() -> bool:
    return (checkout_root() / "benchmarks" / "machinery" / "run.py").is_file()


NOT_A_CHECKOUT = (
    "reflexflow bench runs from a source checkout: no benchmarks/ folder next to the "
    "installed package ({root}). Clone the repository and run it there: git clone "
    f"{REPOSITORY} && cd reflexflow && pip install --no-build-isolation -e . && "
    "reflexflow bench"
)


def device_argument(text: str) -> str:
    """argparse type of ``--device`` (``bench`` and ``demo``): "cpu", or "cuda" / "cuda:N"
    where torch sees that GPU; case and surrounding blanks are ignored. Anything else is an
    argparse error naming what was expected."""
    import torch

    name = text.strip().lower()
    kind, colon, index = name.partition(":")
    if name != "cpu" and (kind != "cuda" or (colon and not index.isdigit())):
        raise argparse.ArgumentTypeError(f"expected 'cpu', 'cuda' or 'cuda:N', got {text!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch is a CPU build"
                if not torch.version.cuda
                else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
            )
            raise argparse.ArgumentTypeError(
                f"{text!r} needs CUDA, which is not available: {why}; use 'cpu'"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: torch sees only {torch.cuda.device_count()} CUDA device(s)"
            )
    return name


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value!r}")
    return number


def _seed(value: str) -> int:
    """A seed every torch call of the example takes (it also seeds seed + 1 and seed + 2):
    -2^63 <= seed <= 2^64 - 3."""
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or not -(2**63) <= number <= 2**64 - 3:
        raise argparse.ArgumentTypeError(f"must be an int in [-2^63, 2^64 - 3], got {value!r}")
    return number


def _non_negative_int(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {value!r}")
    return int(value)


def _bench(args: argparse.Namespace) -> int:
    if not _benchmarks_here():
        args.parser.error(NOT_A_CHECKOUT.format(root=checkout_root()))
    root = str(checkout_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    run = importlib.import_module("benchmarks.machinery.run")
    if not str(Path(run.__file__).resolve()).startswith(root):
        args.parser.error(
            f"another package named 'benchmarks' ({run.__file__}) shadows the checkout's "
            f"{root}/benchmarks; run from the checkout's root"
        )
    return run.run_from_args(args)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmark a training step (FM vs ReflexFlow) and the loss/rollout kernels "
        "(a source checkout only)",
        description="Times a full optimizer step of plain FM and of ReflexFlowLoss (K = 1, 2, "
        "4; shared first call, joint 2B, two-call and lean modes; every usable backend) on a "
        "small DiT and UNet after warm-up rounds, reports the median of the timed steps "
        "with its spread and compares each with its FLOP ideal (a figure whose spread "
        "exceeds 20% of its median is reported as too noisy to hold against its goal), runs "
        "the loss, rollout and stable-target suites and prints one table (progress on "
        "stderr). The JSON is written only with --out, and an existing file only with "
        "--force. Runs from a source checkout (benchmarks/ next to the package).",
    )
    bench.add_argument(
        "--device",
        type=device_argument,
        default=None,
        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, 1 warm-up round and 3 timed steps: a smoke test",
    )
    bench.add_argument("--out", default=None, help="write the JSON here (default: write nothing)")
    bench.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    bench.add_argument(
        "--models", nargs="+", default=["dit", "unet"], choices=["dit", "unet"], help="models"
    )
    bench.add_argument("--size", choices=["quick", "small", "gpu"], help="model size preset")
    bench.add_argument("--batch", type=_positive_int, help="batch size")
    bench.add_argument("--reps", type=_positive_int, help="timed steps per configuration")
    bench.add_argument("--warmup", type=_non_negative_int, help="warm-up rounds before timing")
    bench.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's)")
    bench.set_defaults(func=_bench, parser=bench)


# ------------------------------------------------------------------------ info


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken optional package: None
        return None


def _extension_info() -> dict[str, Any]:
    """What the C++ rollout extension is here: prebuilt, JIT-built or none, and why."""
    import torch

    from . import native

    loaded = native.load_extension()  # as the loss would: may JIT-build once (stderr)
    status = native.extension_status()
    kernels = {}
    if loaded:
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            kernels[device] = bool(
                torch._C._dispatch_has_kernel_for_dispatch_key("reflexflow::euler_update_", key)
            )
    sources = [native.CSRC / name for name in native.SOURCES]
    return {
        "status": status["source"] if loaded else "none",
        "reason": None if loaded else status["reason"],
        "kernels": kernels,
        "jit_sources": str(native.CSRC),
        "jit_sources_present": all(p.is_file() for p in sources),
    }


def runtime_info() -> dict[str, Any]:
    """What is active in this environment: versions, the C++ extension (prebuilt / JIT /
    none and why), Triton (importable, the devices its kernels run on), CUDA and CUDA
    graphs, and what ``backend="auto"`` runs for CPU and CUDA data."""
    import torch

    from .kernels import triton_usable

    try:
        triton_found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        triton_found = False
    cuda = torch.cuda.is_available()
    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    )
    triton_devices = [d for d in ("cuda", "cpu") if triton_found and (d != "cuda" or cuda)]
    triton_devices = [d for d in triton_devices if triton_usable(d)]
    if not torch.version.cuda:
        cuda_why = "this torch is a CPU build"
    elif not cuda:
        cuda_why = f"torch is built with CUDA {torch.version.cuda} but sees no GPU"
    else:
        cuda_why = None
    return {
        "reflexflow": _version("reflexflow"),
        "torch": torch.__version__,
        "triton": _version("triton") if triton_found else None,
        "python": platform.python_version(),
        "extension": _extension_info(),
        "triton_importable": triton_found,
        "triton_devices": triton_devices,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cuda_devices": devices,
        "cuda_why_not": cuda_why,
        "cuda_graphs": cuda and hasattr(torch.cuda, "CUDAGraph"),
        "auto_backend": {  # loss._objective_fn: the kernels for CUDA data only
            "cpu": "torch (reference)",
            "cuda": ("triton" if triton_found else "torch (reference)") if cuda else None,
        },
    }


def format_info(info: dict[str, Any]) -> str:
    """The lines ``reflexflow info`` prints."""
    ext = info["extension"]
    if ext["status"] == "none":
        ext_line = f"none ({ext['reason']}): the pure-PyTorch rollout engine runs"
    else:
        on = [d for d, has in ext["kernels"].items() if has]
        how = "prebuilt by pip install" if ext["status"] == "prebuilt" else "JIT-built"
        ext_line = f"{ext['status']} ({how}); kernels for: {', '.join(on) or 'none'}"
    jit = "present" if ext["jit_sources_present"] else "missing (no JIT build possible)"
    if info["triton_importable"]:
        where = ", ".join(
            "cpu (interpreter, TRITON_INTERPRET=1; backend='triton' only)" if d == "cpu" else d
            for d in info["triton_devices"]
        )
        triton_line = f"{info['triton']} importable; kernels run on: {where or 'none here'}"
        if not info["triton_devices"]:
            triton_line += " (no CUDA device; the CPU interpreter needs TRITON_INTERPRET=1)"
    else:
        triton_line = 'not installed (pip install "reflexflow[triton]"); backend="auto" '
        triton_line += "uses the PyTorch reference"
    if info["cuda_available"]:
        cuda_line = f"available, CUDA {info['cuda_version']}: {', '.join(info['cuda_devices'])}"
        graphs = "usable (cuda_graph=True captures fixed-k rollouts)"
    else:
        cuda_line = f"not available ({info['cuda_why_not']})"
        graphs = "not usable (needs CUDA)"
    auto = info["auto_backend"]
    auto_line = f"CPU data -> {auto['cpu']}"
    if auto["cuda"] is not None:
        auto_line += f"; CUDA data -> {auto['cuda']}"
    return "\n".join(
        [
            f"reflexflow {info['reflexflow']}, torch {info['torch']}, "
            f"triton {info['triton'] or 'not installed'}, python {info['python']}",
            f"C++ rollout extension: {ext_line}",
            f"  JIT sources: {ext['jit_sources']} ({jit})",
            f"Triton: {triton_line}",
            f"CUDA: {cuda_line}",
            f"CUDA graphs: {graphs}",
            f'backend="auto": {auto_line}',
        ]
    )


def _info(args: argparse.Namespace) -> int:
    info = runtime_info()
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


# ------------------------------------------------------------------ example, demo


def _example(args: argparse.Namespace) -> int:
    from .demo.example import run_example

    run_example(steps=args.steps, seed=args.seed)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo.cli import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    """The ``reflexflow`` parser and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="reflexflow",
        description="ReflexFlow: exposure-bias-aware training loss for flow matching.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "example",
        help="train a tiny MLP on 8 gaussians with plain FM and with ReflexFlow; print the "
        "sample quality (MMD^2) of each",
        description="A short runnable example: trains a small MLP on a 2-D ring of 8 "
        "gaussians with plain FM and with ReflexFlowLoss (default preset) for the same steps "
        "and seed, and prints one row per objective: the MMD^2 of its Euler samples against "
        "fresh data (lower is better) and, for reference, its final training loss (not "
        "comparable across objectives).",
    )
    ex.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps per method")
    ex.add_argument("--seed", type=_seed, default=0, help="random seed (-2^63 to 2^64 - 3)")
    ex.set_defaults(func=_example)
    from .demo.cli import add_demo_arguments

    dm = sub.add_parser(
        "demo",
        help="the main job: exposure-bias and sample-quality study (default: the oracle "
        "Gaussian mixture; also digits, photos, 2-D toys)",
    )
    add_demo_arguments(dm)
    dm.set_defaults(func=_demo)
    _add_bench_parser(sub)
    info = sub.add_parser(
        "info",
        help="what is active here: C++ extension, Triton, CUDA, CUDA graphs, versions",
        description="Prints the C++ rollout extension's status (prebuilt, JIT-built or none, "
        "and why), whether Triton is importable and on which devices its kernels run, CUDA "
        "availability and CUDA graphs, what backend='auto' runs, and the torch / triton "
        "versions.",
    )
    info.add_argument("--json", action="store_true", help="print the same as JSON")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the subcommand; its exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
