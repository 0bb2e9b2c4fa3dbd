"""tools/gpu_suite.sh on CPU: the no-CUDA rehearsal, and the driver's verdicts
(tools/gpu_suite.py) with the GPU steps replaced by recorded outcomes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import gpu_suite as gs

ROOT = Path(__file__).resolve().parent.parent


def test_without_cuda_the_suite_says_so_writes_the_summary_and_exits_0(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    res = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_suite.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no CUDA: nothing to validate" in res.stdout
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "no CUDA: nothing to validate" in summary and "| torch |" in summary
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["suite.json", "summary.md"]


def test_the_script_needs_an_output_folder():
    res = subprocess.run(["bash", str(ROOT / "tools" / "gpu_suite.sh")], capture_output=True)
    assert res.returncode == 2 and b"usage" in res.stderr


def test_a_step_past_its_limit_is_killed_and_reported():
    res = gs.run_step("sleep", [sys.executable, "-c", "import time; time.sleep(60)"], 15.5)
    assert res.status == "timed out" and res.seconds < 40
    done = gs.run_step("echo", [sys.executable, "-c", "print('hi')"], 30)
    assert done.ok and done.rc == 0 and "hi" in done.log
    assert gs.run_step("late", ["true"], 3).status == "not run: out of time budget"


def test_a_pytest_step_cut_by_its_limit_still_writes_its_report(tmp_path):
    """On timeout the step's process group gets SIGINT first: pytest ends the session and
    writes the junit report of what ran, which the summary then shows."""
    (tmp_path / "test_slow.py").write_text(
        "import time\n\ndef test_fast():\n    pass\n\ndef test_slow():\n    time.sleep(120)\n"
    )
    junit = tmp_path / "r.xml"
    cmd = [sys.executable, "-m", "pytest", "test_slow.py", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={junit}", "--rootdir", str(tmp_path)]
    res = gs.run_step("tests", cmd, 16, cwd=tmp_path)
    assert res.status == "timed out" and res.seconds < 60
    report = gs.parse_junit(junit)
    assert report["counts"] == {"passed": 1, "interrupted": 1}


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="tests.test_rollout_cuda" name="test_cuda_op[a]" time="0.1"/>
<testcase classname="tests.test_loss" name="test_x" time="0.1">
  <failure message="AssertionError: 1 != 2">trace</failure></testcase>
<testcase classname="tests.test_rollout_cuda" name="test_two_gpus" time="0">
  <skipped type="pytest.skip" message="needs 2 CUDA devices"/></testcase>
<testcase classname="tests.test_adapters" name="test_diffusers" time="0">
  <skipped type="pytest.skip" message="diffusers not installed"/></testcase>
<testcase classname="tests.test_rollout_cuda" name="test_ops" time="0">
  <skipped type="pytest.skip" message="extension has no CUDA kernels: {...}"/></testcase>
</testsuite></testsuites>
"""


def test_junit_report_and_skip_classification(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(JUNIT)
    report = gs.parse_junit(path)
    assert report["counts"] == {"passed": 1, "failed": 1, "skipped": 3}
    assert report["failed"][0]["reason"].startswith("AssertionError")
    bad = gs.unexpected_skips(report["skipped"])
    assert [b["test"] for b in bad] == ["tests.test_rollout_cuda::test_ops"]


def _fake_runs(monkeypatch, junit_text: str, failing: tuple[str, ...] = ()):
    """run_step replaced: pytest steps write junit_text, benchmark steps write their JSON."""
    calls = []

    def fake(name, command, limit_s, *, env=None, fatal=True, cwd=gs.ROOT):
        calls.append(name)
        for arg in command:
            if arg.startswith("--junitxml="):
                Path(arg.split("=", 1)[1]).write_text(junit_text)
            if arg.startswith("--benchmark-json="):
                Path(arg.split("=", 1)[1]).write_text('{"benchmarks": []}')
        if "--out" in command:
            Path(command[command.index("--out") + 1]).write_text('{"rows": []}')
        rc = 1 if name in failing else 0
        status = "failed" if rc else "ok"
        return gs.StepResult(name, command, status, rc, 1.0, limit_s, fatal, log=f"{name} log")

    monkeypatch.setattr(gs, "run_step", fake)
    monkeypatch.setattr(gs.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    return calls


PASSING = """<testsuites><testsuite>
<testcase classname="tests.test_rollout_cuda" name="test_cuda_op" time="0.1"/>
<testcase classname="tests.test_rollout_cuda" name="test_two" time="0">
  <skipped message="needs 2 CUDA devices"/></testcase>
</testsuite></testsuites>"""


def test_validation_passes_and_writes_at_most_eight_files(monkeypatch, tmp_path):
    calls = _fake_runs(monkeypatch, PASSING, failing=("rollout",))
    env = {"slug": "h100", "capability": "9.0", "device_name": "NVIDIA H100"}
    steps = gs.validate(tmp_path, gs.PARTS, gs.Budget(500), env)
    assert calls == [
        "build",
        "build-check",
        "tests",
        "sync",
        "memcheck",
        "racecheck",
        "loss-float32",
        "loss-bfloat16",
        "rollout",
        "step",
    ]
    by = {s.name: s for s in steps}
    assert all(by[n].ok for n in ("build", "tests", "sync", "memcheck", "racecheck"))
    assert by["rollout"].status == "failed" and not by["rollout"].fatal  # recorded only
    gs._finish(tmp_path, env, steps, "PASSED")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) <= 8, names
    assert {"summary.md", "suite.json", "logs.txt", "tests-h100.json", "loss-h100.json"} <= set(
        names
    )
    assert "rollout log" in (tmp_path / "logs.txt").read_text()
    assert "| rollout | failed |" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize(
    "junit, failing, reason",
    [
        (JUNIT, ("tests",), "failed"),  # a failing test (pytest exits 1)
        (PASSING.replace("needs 2 CUDA devices", "extension has no CUDA kernels"), (), "skipped"),
        (PASSING.replace("test_rollout_cuda", "test_loss"), (), "no CUDA test passed"),
    ],
)
def test_a_failing_or_skipped_cuda_test_fails_the_tests_step(
    monkeypatch, tmp_path, junit, failing, reason
):
    _fake_runs(monkeypatch, junit, failing)
    steps = gs.validate(tmp_path, ("tests",), gs.Budget(500), {"slug": "h100"})
    assert steps[0].status == "failed" and reason in "; ".join(steps[0].notes) + steps[0].status
