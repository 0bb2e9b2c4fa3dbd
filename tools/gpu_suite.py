"""One command that validates reflexflow's GPU paths: ``bash tools/gpu_suite.sh OUT``.

Made for a fresh CUDA machine without network and with little time (one call of at most
9 minutes). Steps, in order, each under its own time limit and a global budget:

  build      the C++/CUDA extension for the GPU's architecture (setup.py build_ext
             --inplace, TORCH_CUDA_ARCH_LIST from the device, REFLEXFLOW_FORCE_CUDA=1),
             then a check that its CUDA kernels load
  tests      python -m pytest tests/ (every test; CUDA visible)
  sync       tests/test_sync_cuda.py: a fixed-k ReflexFlowLoss step under
             torch.cuda.set_sync_debug_mode("error")
  sanitizer  compute-sanitizer memcheck and racecheck on a selection of the CUDA rollout
             tests and the Triton kernel tests
  loss       python -m pytest benchmarks/bench_loss.py --benchmark-only (fp32, then bf16)
  rollout    python benchmarks/bench_rollout.py --device cuda --batch 64 --size 32 ...
  step       python -m reflexflow bench --device cuda

The validation steps (build, tests, sync, sanitizer) decide the exit code: a failing or
timed-out step, a failing test, or a test skipped for a reason outside
:data:`ALLOWED_SKIPS` on a CUDA machine exits 1 and the summary names it. A failing
benchmark step is recorded as failed and the others still run. Without CUDA it prints
"no CUDA: nothing to validate", writes the summary saying so and exits 0.

Files written into OUT (at most 8): summary.md, suite.json (environment, every step's
command, status, exit code and time), tests-<gpu>.json, loss-<gpu>.json,
rollout-<gpu>.json, step-<gpu>.json and logs.txt (every step's output, bundled).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PARTS",
    "ALLOWED_SKIPS",
    "StepResult",
    "run_step",
    "parse_junit",
    "unexpected_skips",
    "render_summary",
    "main",
]

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("build", "tests", "sync", "sanitizer", "loss", "rollout", "step")
VALIDATION = ("build", "tests", "sync", "sanitizer")
DEFAULT_BUDGET_S = 530.0  # one device call may run 600 s: leave room for start-up and copies
# per-step limits (seconds); every step also stops at the global budget
LIMITS = {
    "build": 240,
    "tests": 330,
    "sync": 120,
    "memcheck": 150,
    "racecheck": 150,
    "loss-float32": 200,
    "loss-bfloat16": 200,
    "rollout": 150,
    "step": 300,
}
MIN_STEP_S = 15.0  # a step that would get less is not started
LOG_TAIL_CHARS = 120_000  # per step, in logs.txt
# Skips that are fine on a CUDA machine: hardware this machine lacks, optional packages
# the image does not have, and CPU-interpreter-only tests. Every other skip fails the run.
ALLOWED_SKIPS = (
    r"needs \d+ CUDA devices",
    r"could not import",
    r"not installed",
    r"No module named",
    r"triton is not usable on CPU",
)
# run first, so that a run cut by its time limit still reports them (pytest drops the
# duplicates when tests/ follows)
CUDA_TESTS_FIRST = (
    "tests/test_rollout_cuda.py",
    "tests/test_sync_cuda.py",
    "tests/test_kernels_objective.py",
    "tests/test_kernels_gpu_ready.py",
    "tests/test_kernels_loss_backend.py",
    "tests/test_autocast.py",
)
SANITIZER_FILES = ("tests/test_rollout_cuda.py", "tests/test_kernels_objective.py")
# The CUDA rollout ops (plan, plain and masked updates, launch limits, the engines end to
# end) and one Triton kernel test (fp32 images, default knobs). memcheck runs without the
# caching allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1, so out-of-bounds accesses inside a
# cached block are seen), which CUDA-graph capture cannot work with: graphs only under
# racecheck.
SANITIZER_SELECTION = {
    "memcheck": (
        "plan_matches_torch_twin or launch_limits or "
        "(fused_euler_matches_torch and torch.bfloat16) or "
        "(masked_euler_matches_torch_twin and torch.bfloat16) or "
        "masked_plan_with_zeros or engine_matches_per_sample or "
        "(images and gaussian and direction and float32) or "
        "(joint_output_and_shared_v and mse) or large_sample_path"
    ),
    "racecheck": (
        "plan_matches_torch_twin or graph_takes_k or "
        "(masked_euler_matches_torch_twin and torch.bfloat16) or "
        "(images and gaussian and direction and float32) or large_sample_path"
    ),
}


@dataclass
class StepResult:
    """One step: what ran, how it ended, how long it took."""

    name: str
    command: list[str]
    status: str  # "ok", "failed", "timed out", "not run: ..."
    rc: int | None = None
    seconds: float = 0.0
    limit_s: float | None = None
    fatal: bool = True  # counts for the exit code
    notes: list[str] = field(default_factory=list)
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Budget:
    """The time left of the whole run."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def limit(self, step_limit: float) -> float:
        return min(step_limit, self.left())


def run_step(
    name: str,
    command: list[str],
    limit_s: float,
    *,
    env: dict[str, str] | None = None,
    fatal: bool = True,
    cwd: Path = ROOT,
) -> StepResult:
    """Run command (its own process group) with a time limit; output kept for logs.txt."""
    if limit_s < MIN_STEP_S:
        return StepResult(name, command, "not run: out of time budget", fatal=fatal)
    start = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=limit_s)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        out = _stop(proc)
        status = "timed out"
    seconds = round(time.monotonic() - start, 1)
    result = StepResult(name, command, status, proc.returncode, seconds, round(limit_s), fatal)
    result.log = out or ""
    return result


def _stop(proc: subprocess.Popen) -> str:
    """Stop a step's process group: SIGINT first (pytest then ends the session and still
    writes its report), SIGKILL if it does not exit within 20 s; returns its output."""
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            out, _ = proc.communicate(timeout=wait)
            return out or ""
        except subprocess.TimeoutExpired:
            continue
    return ""


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and the failed/skipped tests (with reasons) of a pytest --junitxml file."""
    tree = ET.parse(path)
    cases = []
    for case in tree.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, reason = "passed", ""
        if not case.get("name"):  # the test running when the session was interrupted
            outcome, reason = "interrupted", "the run was stopped (time limit)"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                reason = (child.get("message") or child.text or "").strip()
                break
        cases.append(
            {"test": name, "outcome": outcome, "reason": reason, "time_s": case.get("time")}
        )
    counts: dict[str, int] = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    return {
        "counts": counts,
        "failed": [c for c in cases if c["outcome"] in ("failed", "error")],
        "skipped": [c for c in cases if c["outcome"] == "skipped"],
        "cases": cases,
    }


def unexpected_skips(skipped: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The skips whose reason matches none of :data:`ALLOWED_SKIPS`."""
    return [s for s in skipped if not any(re.search(p, s["reason"]) for p in ALLOWED_SKIPS)]


def _python() -> str:
    return os.environ.get("PYTHON") or sys.executable


def _probe() -> dict[str, Any]:
    """torch, CUDA and the device, read in a child process (no CUDA context here)."""
    code = r"""
import json, platform, sys
out = {"python": platform.python_version()}
try:
    import torch
except Exception as err:
    out["torch_error"] = f"{type(err).__name__}: {err}"
    print(json.dumps(out)); sys.exit(0)
out.update(torch=torch.__version__, cuda=torch.version.cuda)
out["cuda_available"] = torch.cuda.is_available()
try:
    import triton
    out["triton"] = triton.__version__
except Exception as err:
    out["triton"] = f"not importable ({type(err).__name__})"
if out["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    out.update(device_count=torch.cuda.device_count(), device_name=p.name,
               capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
    from benchmarks.machinery.report import device_slug
    out["slug"] = device_slug("cuda")
print(json.dumps(out))
"""
    res = subprocess.run(
        [_python(), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"probe_error": (res.stderr or res.stdout)[-2000:]}


def _tool_version(cmd: list[str], pattern: str) -> str:
    if shutil.which(cmd[0]) is None:
        return "not installed"
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"error: {err}"
    match = re.search(pattern, res.stdout)
    return match.group(1).strip() if match else (res.stdout.strip().splitlines() or ["?"])[0]


def environment() -> dict[str, Any]:
    """Versions, device and date for the summary."""
    env = _probe()
    env["date_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    env["nvcc"] = _tool_version(["nvcc", "--version"], r"release ([^\n]+)")
    env["compute_sanitizer"] = _tool_version(["compute-sanitizer", "--version"], r"Version (\S+)")
    env["driver"] = _tool_version(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], r"(\S+)"
    )
    proc_version = Path("/proc/driver/nvidia/version")
    if env["driver"] == "not installed" and proc_version.exists():
        match = re.search(r"Kernel Module\s+(\S+)", proc_version.read_text())
        env["driver"] = match.group(1) if match else proc_version.read_text().splitlines()[0]
    env["cpu_count"] = os.cpu_count()
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        env["git_commit"] = None
    return env


def _pytest(args: list[str], junit: Path) -> list[str]:
    return [_python(), "-m", "pytest", *args, "-p", "no:cacheprovider", f"--junitxml={junit}"]


def _junit_step(
    result: StepResult, junit: Path, tests: dict[str, Any], key: str, *, check_skips: bool
) -> None:
    """Fold a pytest step's junit report into tests[key] and its verdict into result."""
    if not junit.exists():
        if result.ok:
            result.status = "failed"
        result.notes.append("no junit report (pytest did not finish)")
        return
    report = parse_junit(junit)
    tests[key] = {k: report[k] for k in ("counts", "failed", "skipped", "cases")}
    if report["failed"]:
        result.notes.append(f"{len(report['failed'])} test(s) failed")
    bad = unexpected_skips(report["skipped"]) if check_skips else []
    tests[key]["unexpected_skips"] = bad
    if bad:
        result.status = "failed"
        result.notes.append(f"{len(bad)} test(s) skipped for a reason that is not hardware")
    if result.ok and result.rc not in (0, None):
        result.status = "failed"


def _module(test: str) -> str:
    """The test module's name of "tests.test_x::test_y[...]": "test_x"."""
    return test.split("::", 1)[0].rsplit(".", 1)[-1]


def _newest(pattern: str, since: float) -> Path | None:
    found = [
        p for p in (ROOT / "benchmarks" / "results").glob(pattern) if p.stat().st_mtime >= since
    ]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _read_json(path: Path | None) -> Any:
    if path is None or not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return {"unreadable": str(err)}


def validate(out: Path, parts: tuple[str, ...], budget: Budget, env: dict[str, Any]) -> list:
    """Run the requested parts; returns the StepResults (files are written by the caller)."""
    py, slug = _python(), env.get("slug", "cuda")
    steps: list[StepResult] = []
    tests: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="reflexflow-gpu-suite-"))
    test_env = {"REFLEXFLOW_NO_JIT": "1", "PYTHONPATH": str(ROOT)}

    if "build" in parts:
        arch = env.get("capability", "9.0")
        build_env = {
            "TORCH_CUDA_ARCH_LIST": arch,
            "REFLEXFLOW_FORCE_CUDA": "1",
            "MAX_JOBS": str(os.cpu_count() or 4),
        }
        cmd = [py, "setup.py", "build_ext", "--inplace"]
        step = run_step("build", cmd, budget.limit(LIMITS["build"]), env=build_env)
        check = (
            "import torch, reflexflow.native as n; ok = n.load_extension() and "
            "n.has_kernel('cuda'); print(n.extension_status()); raise SystemExit(0 if ok else 1)"
        )
        if step.ok:
            probe = run_step("build-check", [py, "-c", check], budget.limit(60), env=test_env)
            step.log += "\n---- extension check ----\n" + probe.log
            if not probe.ok:
                step.status = "failed"
                step.notes.append("the built extension has no loadable CUDA kernels")
        step.notes.append(f"TORCH_CUDA_ARCH_LIST={arch}")
        steps.append(step)

    if "tests" in parts:
        junit = tmp / "tests.xml"
        first = [f for f in CUDA_TESTS_FIRST if (ROOT / f).exists()]  # if time runs out
        cmd = _pytest([*first, "tests/", "-q", "-rfEs", "--durations=25"], junit)
        step = run_step("tests", cmd, budget.limit(LIMITS["tests"]), env=test_env)
        _junit_step(step, junit, tests, "pytest", check_skips=True)
        ran = [
            c
            for c in tests.get("pytest", {}).get("cases", [])
            if "cuda" in _module(c["test"]) and c["outcome"] == "passed"
        ]
        if step.status != "not run: out of time budget" and not ran:
            step.status = "failed"
            step.notes.append("no CUDA test passed (test_*cuda*): CUDA tests did not run")
        steps.append(step)

    if "sync" in parts:
        junit = tmp / "sync.xml"
        cmd = _pytest(["tests/test_sync_cuda.py", "-v", "-rfEs"], junit)
        step = run_step("sync", cmd, budget.limit(LIMITS["sync"]), env=test_env)
        _junit_step(step, junit, tests, "sync_debug", check_skips=True)
        steps.append(step)

    if "sanitizer" in parts:
        for tool in ("memcheck", "racecheck"):
            junit = tmp / f"{tool}.xml"
            sanitizer = ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=99"]
            sanitizer += ["--target-processes=all", "--print-limit=20"]
            args = [*SANITIZER_FILES, "-q", "-k", SANITIZER_SELECTION[tool]]
            cmd = sanitizer + _pytest(args, junit)
            san_env = dict(test_env)
            if tool == "memcheck":  # every tensor its own allocation: out-of-bounds is seen
                san_env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
            if shutil.which("compute-sanitizer") is None:
                step = StepResult(tool, cmd, "failed", notes=["compute-sanitizer not found"])
            else:
                step = run_step(tool, cmd, budget.limit(LIMITS[tool]), env=san_env)
                _junit_step(step, junit, tests, tool, check_skips=True)
                summary = re.findall(r"ERROR SUMMARY: [^\n]*", step.log)
                step.notes += summary[-1:] or ["no ERROR SUMMARY line"]
                if step.rc == 99:
                    step.notes.append(f"{tool} reported errors")
                if step.rc == 5:
                    step.notes.append("the selection matched no test")
            steps.append(step)

    if tests:
        (out / f"tests-{slug}.json").write_text(
            json.dumps({"suite": "tests", "environment": env, **tests}, indent=2) + "\n"
        )

    if "loss" in parts:
        bundle: dict[str, Any] = {"suite": "loss", "environment": env, "runs": {}}
        for dtype in ("float32", "bfloat16"):
            since = time.time()
            bench_json = tmp / f"loss-{dtype}-pytest-benchmark.json"
            cmd = [py, "-m", "pytest", "benchmarks/bench_loss.py", "--benchmark-only", "-q"]
            cmd += ["-p", "no:cacheprovider", f"--benchmark-json={bench_json}", "-s"]
            step = run_step(
                f"loss-{dtype}",
                cmd,
                budget.limit(LIMITS[f"loss-{dtype}"]),
                env={**test_env, "REFLEXFLOW_BENCH_DTYPE": dtype},
                fatal=False,
            )
            bundle["runs"][dtype] = {
                "status": step.status,
                "results": _read_json(_newest("loss-*.json", since)),
                "pytest_benchmark": _read_json(bench_json),
            }
            steps.append(step)
        (out / f"loss-{slug}.json").write_text(json.dumps(bundle, indent=2) + "\n")

    if "rollout" in parts:
        cmd = [py, "benchmarks/bench_rollout.py", "--device", "cuda", "--batch", "64"]
        cmd += ["--size", "32", "--repeats", "20", "--update-shapes", "64x4x64x64"]
        cmd += ["256x4x64x64", "--out", str(out / f"rollout-{slug}.json")]
        steps.append(
            run_step("rollout", cmd, budget.limit(LIMITS["rollout"]), env=test_env, fatal=False)
        )

    if "step" in parts:
        cmd = [py, "-m", "reflexflow", "bench", "--device", "cuda"]
        cmd += ["--out", str(out / f"step-{slug}.json")]
        steps.append(run_step("step", cmd, budget.limit(LIMITS["step"]), env=test_env, fatal=False))
    shutil.rmtree(tmp, ignore_errors=True)
    return steps


def render_summary(env: dict[str, Any], steps: list[StepResult], verdict: str) -> str:
    """The Markdown summary: environment, one row per step, the verdict."""
    lines = ["# reflexflow GPU validation", "", f"**{verdict}**", ""]
    keys = ("device_name", "capability", "memory_gib", "driver", "torch", "cuda", "triton")
    keys += ("nvcc", "compute_sanitizer", "python", "date_utc", "git_commit", "cpu_count")
    lines += ["| | |", "|---|---|"]
    lines += [f"| {k} | {env.get(k, 'not reported')} |" for k in keys]
    if steps:
        lines += ["", "| step | status | exit code | seconds | limit s | decides exit | notes |"]
        lines += ["|---|---|---:|---:|---:|---|---|"]
        for s in steps:
            notes = "; ".join(s.notes).replace("|", "/")
            rc = "" if s.rc is None else s.rc
            lines.append(
                f"| {s.name} | {s.status} | {rc} | {s.seconds} | {s.limit_s or ''} | "
                f"{'yes' if s.fatal else 'no (benchmark)'} | {notes} |"
            )
        lines += ["", "Commands:", ""]
        lines += [f"- {s.name}: `{' '.join(s.command)}`" for s in steps]
    return "\n".join(lines) + "\n"


def _write_logs(out: Path, steps: list[StepResult]) -> None:
    parts = []
    for s in steps:
        log = s.log
        if len(log) > LOG_TAIL_CHARS:
            log = f"[... {len(log) - LOG_TAIL_CHARS} characters cut ...]\n" + log[-LOG_TAIL_CHARS:]
        parts.append(
            f"==== {s.name}: {s.status} (rc {s.rc}, {s.seconds} s)\n$ {' '.join(s.command)}\n{log}"
        )
    (out / "logs.txt").write_text("\n\n".join(parts) + "\n")


def _finish(out: Path, env: dict[str, Any], steps: list[StepResult], verdict: str) -> None:
    (out / "summary.md").write_text(render_summary(env, steps, verdict))
    payload = {
        "verdict": verdict,
        "environment": env,
        "steps": [{k: v for k, v in asdict(s).items() if k != "log"} for s in steps],
    }
    (out / "suite.json").write_text(json.dumps(payload, indent=2) + "\n")
    if steps:
        _write_logs(out, steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for the results (e.g. $OUT of the device tool)")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run"
    )
    args = parser.parse_args(argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        parser.error(f"--parts: unknown {bad}; choose from {','.join(PARTS)}")
    budget = Budget(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    if "torch_error" in env or "probe_error" in env:
        verdict = (
            f"FAILED: torch does not import ({env.get('torch_error') or env.get('probe_error')})"
        )
        print(verdict, file=sys.stderr)
        _finish(out, env, [], verdict)
        return 2
    if not env.get("cuda_available"):
        verdict = "no CUDA: nothing to validate"
        print(verdict)
        _finish(out, env, [], verdict)
        return 0
    print(f"reflexflow GPU suite on {env['device_name']} (parts: {','.join(parts)})", flush=True)
    steps = validate(out, parts, budget, env)
    for s in steps:
        print(f"  {s.name:14s} {s.status:28s} {s.seconds:7.1f} s  {'; '.join(s.notes)}")
    failed = [s.name for s in steps if s.fatal and not s.ok]
    bench_failed = [s.name for s in steps if not s.fatal and not s.ok]
    if failed:
        verdict = f"FAILED: {', '.join(failed)}"
    else:
        verdict = "PASSED: every validation step" if any(s.fatal for s in steps) else "DONE"
    if bench_failed:
        verdict += f" (benchmark steps not ok: {', '.join(bench_failed)})"
    _finish(out, env, steps, verdict)
    print(verdict, flush=True)
    print(f"wrote {out}/summary.md", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
