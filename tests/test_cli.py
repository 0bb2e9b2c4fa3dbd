"""The ``reflexflow`` command: example, bench's arguments and checkout lookup, info."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

from reflexflow import cli
from reflexflow.cli import build_parser, main
from tests.helpers import hide_module


def test_example_command_trains_both_methods_and_reports_finite_mmd(capsys):
    from reflexflow.demo.example import run_example

    results = run_example(steps=20, seed=0)
    assert set(results) == {"fm", "reflexflow"}
    assert all(0 <= v < 10 for v in results.values())
    printed = capsys.readouterr().out
    # it says what it compares and which figure compares the methods
    assert "Plain flow matching (fm) against ReflexFlowLoss" in printed
    assert "MMD^2" in printed and "lower is better" in printed
    assert "not comparable across objectives" in printed
    header = next(line for line in printed.splitlines() if line.lstrip().startswith("objective"))
    assert header.split() == ["objective", "MMD^2", "final", "training", "loss", "time"]


@pytest.mark.parametrize("seed", [str(2**64 - 2), str(-(2**63) - 1), "x"])
def test_example_refuses_a_seed_torch_cannot_take_as_an_argument_error(seed, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["example", "--seed", seed])
    assert exit_.value.code == 2
    assert "--seed: must be an int in [-2^63, 2^64 - 3]" in capsys.readouterr().err


def test_cli_help_lists_the_subcommands():
    text = build_parser().format_help()
    for command in ("example", "demo", "bench", "info"):
        assert command in text
    done = subprocess.run(
        [sys.executable, "-m", "reflexflow", "--help"], capture_output=True, text=True, check=True
    )
    assert "example" in done.stdout and "info" in done.stdout


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cpu:1", "mps"])
def test_bench_refuses_an_unknown_device_as_an_argument_error(device, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", "--device", device])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device" in err and "'cpu', 'cuda' or 'cuda:N'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("device", ["cuda:", "cuda:-1", "cpu:0"])
def test_device_argument_refuses_an_incomplete_or_negative_index(device):
    with pytest.raises(argparse.ArgumentTypeError, match="expected 'cpu', 'cuda' or 'cuda:N'"):
        cli.device_argument(device)


def test_device_argument_ignores_case_and_blanks():
    assert cli.device_argument(" CPU ") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_bench_refuses_cuda_without_a_gpu_as_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", "--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device" in err and "'cuda' needs CUDA, which is not available" in err


def test_bench_outside_a_checkout_says_it_runs_from_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "checkout_root", lambda: tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "runs from a source checkout" in err and "git clone" in err


def test_python_dash_m_reflexflow_bench_finds_the_checkout():
    done = subprocess.run(
        [sys.executable, "-m", "reflexflow", "bench", "--device", "tpu"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "argument --device" in done.stderr
    assert "Traceback" not in done.stderr


def test_info_reports_extension_triton_cuda_and_versions(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    for label in ("C++ rollout extension:", "JIT sources:", "Triton:", "CUDA:", "CUDA graphs:"):
        assert label in printed
    assert f"torch {torch.__version__}" in printed
    info = cli.runtime_info()
    assert info["extension"]["status"] in ("prebuilt", "jit", "none")
    if info["extension"]["status"] == "none":
        assert info["extension"]["reason"]
    else:
        assert info["extension"]["kernels"]["cpu"] is True
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["cuda_graphs"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert "not available (" in printed and "CUDA graphs: not usable" in printed
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["torch"] == torch.__version__


def test_info_without_triton_names_the_extra(monkeypatch, capsys):
    hide_module(monkeypatch, "triton")
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert 'Triton: not installed (pip install "reflexflow[triton]")' in printed
    assert cli.runtime_info()["triton_devices"] == []
