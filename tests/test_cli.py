import subprocess
import sys

from reflexflow.cli import build_parser


def test_example_command_trains_both_methods_and_reports_finite_mmd():
    from reflexflow.demo.example import run_example

    results = run_example(steps=20, seed=0)
    assert set(results) == {"fm", "reflexflow"}
    assert all(0 <= v < 10 for v in results.values())


def test_cli_help_lists_the_subcommands():
    text = build_parser().format_help()
    assert "example" in text
    done = subprocess.run(
        [sys.executable, "-m", "reflexflow", "--help"], capture_output=True, text=True, check=True
    )
    assert "example" in done.stdout
