"""The runnable examples (examples/*.py) train two steps at toy size."""

from __future__ import annotations

import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "name, needs, argv",
    [
        ("sit_style.py", (), []),
        ("diffusers_style.py", ("diffusers",), ["--family", "sd3", "--sample-steps", "4"]),
        ("diffusers_style.py", ("diffusers",), ["--family", "flux", "--sample-steps", "4"]),
        ("flow_matching_paths.py", ("flow_matching", "torchcfm"), []),
    ],
)
def test_example_runs_at_toy_size(name, needs, argv, capsys, monkeypatch):
    for module in needs:  # the peer examples use the real packages
        pytest.importorskip(module)
    monkeypatch.setattr(sys, "argv", [name, "--steps", "2", *argv])
    runpy.run_path(os.path.join(ROOT, "examples", name), run_name="__main__")
    printed = capsys.readouterr().out
    assert "loss" in printed and "nan" not in printed
