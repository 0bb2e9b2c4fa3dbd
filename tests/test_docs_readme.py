"""README.md is a front page: short, the quick start near the top, the test command the
one .ci/run runs, the CPU wheel index named, and every relative link resolving."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _ci_test_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(lines) if "keep the two in step" in line)
    return lines[marker + 1].strip()


def test_readme_shows_the_exact_test_command_that_ci_runs():
    command = _ci_test_command()
    assert command.endswith("python -m pytest")
    assert f"\n    {command}\n" in README


def test_readme_is_a_front_page_with_the_quick_start_near_the_top():
    lines = README.splitlines()
    assert len(lines) <= 200
    first_code = next(i for i, line in enumerate(lines, 1) if line.startswith("```python"))
    assert first_code <= 60
    assert "ReflexFlowLoss(" in "\n".join(lines[first_code : first_code + 10])
    assert "No preset has beaten plain flow matching" in README


def test_readme_says_how_to_get_the_cpu_build_of_pytorch():
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in README
    assert "reflexflow demo" in README and "reflexflow info" in README


@pytest.mark.parametrize(
    "page", ["README.md", "docs/results.md", "docs/usage.md", "docs/layout.md", "docs/knobs.md"]
)
def test_relative_links_resolve(page):
    path = ROOT / page
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        file = target.split("#", 1)[0]
        assert (path.parent / file).exists(), f"{page}: broken link {target}"
