"""Compile the fused objective's kernels for an NVIDIA GPU on a machine without one.

The interpreter (TRITON_INTERPRET=1) accepts code that the GPU compiler rejects and says
nothing about registers. This tool records the launches (kernel, argument types,
constexprs, num_warps) of representative calls under the interpreter, without running
them, then compiles each distinct variant with Triton's CUDA backend for a given target
(default sm_90, the H100) down to a cubin, and reports registers per thread, local memory
(spills), stack and shared memory from ``cuobjdump -res-usage``. Two processes, because
Triton's code generator needs the kernels' helpers as JITFunctions (no interpreter).

    python -m tools.compile_check            # table on stdout
    python -m tools.compile_check --json out.json --arch 90
    python -m tools.compile_check --case sit_4x32x32_bf16v   # one case

Nothing here runs on a GPU: registers and spills are ptxas's; speed is not measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["CASES", "record_launches", "compile_launches", "main"]

# (name, batch shape, v dtype, state dtype, objective knobs): shapes as users train them
# (the interpreter does not run the kernels here, so the size costs nothing).
CASES: list[tuple[str, tuple[int, ...], str, str, dict[str, Any]]] = [
    ("sit_4x32x32_fp32", (256, 4, 32, 32), "float32", "float32", {}),
    ("sit_4x32x32_bf16v", (256, 4, 32, 32), "bfloat16", "float32", {}),
    ("sit_4x32x32_bf16_joint", (256, 4, 32, 32), "bfloat16", "bfloat16", {"joint": True}),
    (
        "sit_4x32x32_mse_box",
        (256, 4, 32, 32),
        "bfloat16",
        "float32",
        {"adr_loss": "mse", "fc_filter": "box", "fc_size": 5, "joint": True},
    ),
    (
        "sit_4x32x32_signed_squared",
        (256, 4, 32, 32),
        "bfloat16",
        "float32",
        {"fc_signed": True, "fc_form": "squared", "fc_filter": "none", "joint": True},
    ),
    (
        "sit_4x32x32_shared_weights",
        (256, 4, 32, 32),
        "bfloat16",
        "float32",
        {"shared": True, "weights": True, "targets": True},
    ),
    ("latent_4x64x64_bf16", (64, 4, 64, 64), "bfloat16", "bfloat16", {"joint": True}),
    ("latent_4x64x64_fp32", (64, 4, 64, 64), "float32", "float32", {"joint": True}),
    (
        "pixels_3x64x64_per_channel",
        (64, 3, 64, 64),
        "float32",
        "float32",
        {"per_channel": True, "joint": True},
    ),
    ("vectors_70000x8", (70000, 8), "float32", "float32", {}),
    ("signals_2x256", (64, 2, 256), "float32", "float32", {"adr_loss": "mse"}),
    ("latent_16x128x128_large", (32, 16, 128, 128), "bfloat16", "float32", {"joint": True}),
    (
        "latent_16x128x128_large_mse_per_ch",
        (32, 16, 128, 128),
        "bfloat16",
        "float32",
        {"adr_loss": "mse", "per_channel": True, "joint": True},
    ),
    ("video_16x16x60x104_large", (2, 16, 16, 60, 104), "bfloat16", "float32", {}),
    ("latent_4x32x32_fft", (16, 4, 32, 32), "float32", "float32", {"fc_filter": "fft"}),
    (
        "sit_gvp_fc_active_bool",
        (64, 4, 32, 32),
        "bfloat16",
        "float32",
        {"path": "gvp", "fc_active": True, "joint": True},
    ),
    (
        "sit_vp_table_fc_delta",
        (64, 4, 32, 32),
        "bfloat16",
        "float32",
        {"path": "vp", "fc_delta": True, "adr_loss": "mse"},
    ),
    ("sit_fm_only_no_v1", (64, 4, 32, 32), "float16", "float32", {"no_v1": True, "lambda_fc": 0.0}),
    (
        "latent_16x128x128_large_signed_vp",
        (8, 16, 128, 128),
        "bfloat16",
        "float32",
        {
            "path": "vp",
            "fc_signed": True,
            "fc_filter": "box",
            "fc_size": 3,
            "weights": True,
            "targets": True,
            "shared": True,
        },
    ),
]


def _spec(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return {"tensor": str(x.dtype).removeprefix("torch.")}
    if isinstance(x, bool):
        return {"bool": x}
    if isinstance(x, int):
        return {"int": x}
    if isinstance(x, float):
        return {"float": x}
    if x is None:
        return None
    raise TypeError(f"cannot record a kernel argument of type {type(x).__name__}")


def record_launches(names: list[str] | None = None) -> list[dict[str, Any]]:
    """Launch specs of forward + backward of the cases ``names`` (all by default), each
    tagged with the first case that launched it (TRITON_INTERPRET=1, no kernel runs:
    outputs are garbage, the launches are what matter)."""
    unknown = set(names or ()) - {c[0] for c in CASES}
    if unknown:
        raise ValueError(f"unknown case(s) {sorted(unknown)}; known: {[c[0] for c in CASES]}")
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    from reflexflow.kernels import fused_objective
    from reflexflow.objective import ObjectiveInputs, ObjectiveSpec
    from reflexflow.paths import get_path

    seen: dict[str, dict[str, Any]] = {}
    current = {"case": ""}

    def fake_run(self, *args, grid, warmup, **kwargs):  # noqa: ANN001
        spec = {
            "kernel": self.fn.__name__,
            "args": [_spec(a) for a in args],
            "kwargs": {
                k: _spec(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
            },
        }
        seen.setdefault(json.dumps(spec, sort_keys=True), dict(spec, case=current["case"]))

    original = InterpretedFunction.run
    InterpretedFunction.run = fake_run
    try:
        for name, shape, vdt, sdt, knobs in CASES:
            if names and name not in names:
                continue
            current["case"] = name
            knobs = dict(knobs)
            joint, shared = knobs.pop("joint", False), knobs.pop("shared", False)
            weights, targets = knobs.pop("weights", False), knobs.pop("targets", False)
            path = get_path(knobs.pop("path", "linear"))
            active, fc_delta = knobs.pop("fc_active", False), knobs.pop("fc_delta", False)
            no_v1 = knobs.pop("no_v1", False)
            if "per_channel" in knobs:  # the FC spec's field (ObjectiveSpec.replace: fc_*)
                knobs["fc_per_channel"] = knobs.pop("per_channel")
            spec = ObjectiveSpec().replace(**knobs)
            vd, sd = getattr(torch, vdt), getattr(torch, sdt)
            b = shape[0]
            x1, eps, x_hat = (torch.empty(shape, dtype=sd) for _ in range(3))
            t = torch.full((b,), 0.3)
            kw: dict[str, Any] = dict(
                x1=x1,
                eps=eps,
                x_hat=x_hat,
                t0=t,
                t1=t + 0.1,
                k=torch.ones(b, dtype=torch.int64),
            )
            if joint:
                v = torch.zeros((2 * b, *shape[1:]), dtype=vd, requires_grad=True)
                kw.update(v0=None, v1=None, v_joint=v)
            elif shared:
                v = torch.zeros(shape, dtype=vd, requires_grad=True)
                kw.update(v0=v, v1=v)
            else:
                kw.update(
                    v0=torch.zeros(shape, dtype=vd, requires_grad=True),
                    v1=torch.zeros(shape, dtype=vd, requires_grad=True),
                )
            if weights:
                kw.update(fm_weight=torch.ones(b), adr_weight=torch.ones(b))
            if targets:
                kw.update(u0=torch.empty(shape, dtype=sd), v_adr=torch.empty(shape, dtype=sd))
            if active:
                kw["fc_active"] = torch.ones(b, dtype=torch.bool)
            if fc_delta:
                kw["fc_delta"] = torch.empty(shape, dtype=sd)
            if no_v1:
                kw["v1"] = None
            out = fused_objective(path, spec, ObjectiveInputs(**kw))
            (2.0 * out.loss + out.per_sample.sum()).backward()  # a scale != 1
    finally:
        InterpretedFunction.run = original
    return list(seen.values())


def _build(spec: Any) -> Any:
    import torch

    if spec is None:
        return None
    if "tensor" in spec:
        return torch.empty(64, dtype=getattr(torch, spec["tensor"]))
    return next(iter(spec.values()))


def _resources(cubin: bytes) -> dict[str, int]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    return {
        k.lower(): int(v) for k, v in fields.items() if k in ("REG", "STACK", "SHARED", "LOCAL")
    }


def compile_launches(specs: list[dict[str, Any]], arch: int = 90) -> list[dict[str, Any]]:
    """Compile each spec for GPUTarget("cuda", arch, 32); rows with resources or error."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    from reflexflow.kernels import objective_kernels as kernels

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    rows = []
    for spec in specs:
        fn = getattr(kernels, spec["kernel"])
        args = [_build(a) for a in spec["args"]]
        kwargs = dict(spec["kwargs"])
        consts = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        row: dict[str, Any] = {
            "case": spec.get("case", ""),
            "kernel": spec["kernel"],
            "num_warps": kwargs.get("num_warps", 4),
            "constexprs": consts,
        }
        try:
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(
                backend, kwargs, bound, specialization, options
            )
            compiled = triton_compile(
                ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
            )
            row.update(_resources(compiled.asm["cubin"]))
        except Exception as err:  # reported, the caller decides
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
        rows.append(row)
    return rows


def _run_child(mode: str, payload: Path, arch: int, cases: list[str]) -> None:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if mode == "record":
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.compile_check",
            f"--{mode}",
            str(payload),
            "--arch",
            str(arch),
            *(f"--case={c}" for c in cases),
        ],
        check=True,
        env=env,
    )


MISSING_TRITON = (
    "compile_check needs Triton (its CUDA backend compiles the kernels; no GPU needed): "
    'install the "triton" extra, pip install -e ".[triton]" (or pip install triton)'
)


def triton_missing() -> str | None:
    """The message naming what to install when Triton cannot be found, else None."""
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        found = False
    return None if found else MISSING_TRITON


def main(argv: list[str] | None = None) -> int:
    """Record, compile and print every case's launches; 1 on a compile error, 2 on a
    missing requirement (Triton), 0 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--case", action="append", default=[], help="only this case (repeat)")
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--compile", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    missing = triton_missing()
    if missing is not None:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    if opts.record:
        opts.record.write_text(json.dumps(record_launches(opts.case or None)))
        return 0
    if opts.compile:
        specs = json.loads(opts.compile.read_text())
        opts.compile.write_text(json.dumps(compile_launches(specs, opts.arch)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "launches.json"
        for mode in ("record", "compile"):
            try:
                _run_child(mode, payload, opts.arch, opts.case)
            except subprocess.CalledProcessError as err:
                print(
                    f"error: the {mode} step failed (exit {err.returncode}); its output is above",
                    file=sys.stderr,
                )
                return 1
        rows = json.loads(payload.read_text())
    print(
        "| case | kernel | warps | regs | local (spill) bytes | stack | shared "
        f"| key constexprs (sm_{opts.arch}) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    keys = ("R", "CB", "SB", "MAP_MODE", "FILT", "NT", "DIRECTION", "V_MODE", "IN_PLACE")
    for r in rows:
        c = ", ".join(f"{k}={r['constexprs'][k]}" for k in keys if k in r["constexprs"])
        if "error" in r:
            print(
                f"| {r['case']} | {r['kernel']} | {r['num_warps']} | ERROR | | | | "
                f"{c}: {r['error'][:200]} |"
            )
        else:
            print(
                f"| {r['case']} | {r['kernel']} | {r['num_warps']} | {r['reg']} | {r['local']} "
                f"| {r['stack']} "
                f"| {r['shared']} | {c} |"
            )
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
