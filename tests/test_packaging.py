"""What a plain (non-editable) install gets: a wheel built from the checkout ships the
C++/CUDA sources for the JIT build and no support code (benchmarks, CI drivers)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built (without the compiled extension) from a copy of the checkout's
    packaging files, so that the build writes nothing into the checkout."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for folder in ("reflexflow", "csrc", "benchmarks", "tools"):
        shutil.copytree(ROOT / folder, src / folder, ignore=skip)
    env = dict(os.environ, REFLEXFLOW_NO_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-build-isolation", "--no-deps"]
    done = subprocess.run(
        [*cmd, "-w", str(out), "-q"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (found,) = out.glob("reflexflow-*.whl")
    return found


def test_a_wheel_ships_the_extension_sources_and_no_support_code(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    csrc = {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".h", ".cu")}
    assert {f"reflexflow/_csrc/{name}" for name in csrc} <= names
    assert not [n for n in names if n.startswith(("reflexflow/bench/", "benchmarks/", "tools/"))]
    assert "reflexflow/kernels/compile_check.py" not in names
    assert "reflexflow/demo/toy_models.py" in names and "reflexflow/cli.py" in names


def test_an_installed_wheel_points_its_jit_build_at_its_shipped_sources(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
        + [str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import reflexflow, reflexflow.native as n\n"
        "print(reflexflow.__file__)\n"
        "print(n.CSRC)\n"
        "print(all((n.CSRC / s).is_file() for s in n.SOURCES + n.CUDA_SOURCES))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,  # not the checkout: the installed copy is imported
        env=dict(os.environ, PYTHONPATH=str(target)),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    package, csrc, present = done.stdout.split()
    assert Path(package).parent == target / "reflexflow"
    assert Path(csrc) == target / "reflexflow" / "_csrc" and present == "True"
