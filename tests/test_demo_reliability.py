"""`reflexflow demo` as a command: Ctrl-C, the output folder, the device, the terminal output
and the stated run times."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from reflexflow.cli import build_parser, main  # noqa: E402
from reflexflow.demo import study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["demo", "--dataset", "oracle", "--quick", "--steps", "2", "--seeds", "1"]
TINY += ["--eval-steps", "2", "--num-samples", "16", "--bias-samples", "4", "--workers", "1"]
TINY += ["--methods", "fm", "--no-progress"]


def _no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the study trained before refusing its output folder")

    monkeypatch.setattr(study, "train", fail)


def test_out_naming_a_file_is_an_argparse_error(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--out", str(target)])
    assert exc.value.code == 2
    assert "is a file" in capsys.readouterr().err


def test_non_empty_out_is_refused_before_training_without_force(tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    (tmp_path / "old.png").write_bytes(b"stale")
    assert main([*TINY, "--out", str(tmp_path), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert (tmp_path / "old.png").read_bytes() == b"stale"


def test_unwritable_out_fails_before_training(tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([*TINY, "--out", str(blocker / "sub"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_force_replaces_the_demos_own_files_and_keeps_others(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples-old-row.png").write_bytes(b"stale")
    (out / "results.md").write_text("stale")
    (out / "notes.txt").write_text("mine")
    (out / "holiday.png").write_bytes(b"mine")
    assert main([*TINY, "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--force"]) == 0
    assert not (out / "samples-old-row.png").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "holiday.png").read_bytes() == b"mine"  # not a figure the demo writes
    assert "oracle study" in (out / "results.md").read_text()


def test_the_run_cache_key_ignores_force_and_follows_the_code(monkeypatch):
    """--force (like --out or --workers) changes no number: the same study resumes from
    its cache; a change of the code (its fingerprint) means new runs."""
    from reflexflow.demo import jobs
    from reflexflow.demo.settings import DemoConfig

    plain = jobs.run_settings(DemoConfig(dataset="digits").as_dict())
    forced = jobs.run_settings(DemoConfig(dataset="digits", force=True).as_dict())
    assert jobs.settings_key(plain) == jobs.settings_key(forced)
    cfg = DemoConfig(dataset="digits", cache_dir=Path("/tmp/c"))
    settings, cache = jobs.study_cache(cfg)
    assert settings == plain
    assert cache.root == Path("/tmp/c") / "runs" / f"digits-{jobs.settings_key(plain)}"
    assert plain["code"] == jobs.code_fingerprint() and len(plain["code"]) == 16
    package = Path(jobs.__file__).resolve().parents[1]
    assert all((package / name).is_file() for name in jobs.PRESENTATION_ONLY)
    monkeypatch.setattr(jobs, "code_fingerprint", lambda: "0" * 16)
    changed = jobs.run_settings(DemoConfig(dataset="digits").as_dict())
    assert jobs.settings_key(changed) != jobs.settings_key(plain)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu"])
def test_unknown_device_is_an_argparse_error(device, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--device", device])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device" in err and "expected 'cpu', 'cuda' or 'cuda:N'" in err


def test_cuda_without_a_gpu_is_an_argparse_error(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--device", "cuda"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device" in err and "'cuda' needs CUDA, which is not available" in err


def test_terminal_output_is_a_short_summary_with_the_file_locations(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*TINY, "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) <= 20 and max(len(line) for line in lines) <= 200
    assert any(str(out / "results.md") in line for line in lines)
    assert not any(line.startswith("|") for line in lines)  # not the results.md tables


def _stated_minutes(help_text: str, dataset: str) -> float:
    block = help_text.split(f"--dataset {dataset}")[1].split("--dataset")[0]
    match = re.search(r"[Aa]bout (\d+) minutes", " ".join(block.split()))
    assert match, block
    return float(match.group(1))


def test_help_states_the_measured_run_times():
    """The minutes --help states match the committed runs' measured CPU time spread over the
    2 workers (what 2 idle cores take)."""
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    text = demo.format_help()
    for dataset, folder in (("oracle", "docs/demo-oracle"), ("digits", "docs/demo")):
        res = json.loads((ROOT / folder / "results.json").read_text())
        idle_minutes = res["cpu_seconds"] / res["config"]["workers"] / 60
        stated = _stated_minutes(text, dataset)
        assert abs(stated - idle_minutes) <= max(1.0, 0.25 * idle_minutes), (dataset, stated)


def test_ctrl_c_stops_promptly_keeps_finished_runs_and_says_how_to_resume(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) with 2 workers:
    exit 130 with a message, no traceback, the queued runs not run, finished runs cached."""
    cache = tmp_path / "cache"
    args = ["demo", "--dataset", "oracle", "--quick", "--methods", "fm,reflexflow"]
    args += ["--seeds", "4", "--steps", "150", "--eval-steps", "2", "--num-samples", "16"]
    args += ["--bias-samples", "4", "--workers", "2", "--no-progress"]
    args += ["--out", str(tmp_path / "out"), "--cache-dir", str(cache)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "reflexflow", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # a terminal's child has SIGINT at its default; a background shell's has it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 900
        while not list(cache.glob("runs/*/*.pt")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert list(cache.glob("runs/*/*.pt")), "no run finished"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err and "resumes" in err
    finished = list(cache.glob("runs/*/*.pt"))
    assert 1 <= len(finished) < 8  # the 8 jobs were not all run after Ctrl-C
    assert not (tmp_path / "out" / "results.json").exists()
