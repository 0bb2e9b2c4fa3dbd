"""pyproject.toml's [project] metadata: an SPDX license, classifiers, keywords, no
placeholder addresses."""

from __future__ import annotations

import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def test_license_is_an_spdx_string_with_its_file():
    project = _project()
    assert project["license"] == "Apache-2.0"  # not the deprecated {text = ...} table
    root = PYPROJECT.parent
    assert all((root / name).is_file() for name in project["license-files"])


def test_classifiers_and_keywords_are_present():
    project = _project()
    assert "Programming Language :: Python :: 3" in project["classifiers"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639
    assert "flow matching" in project["keywords"]


def test_no_placeholder_project_urls():
    assert "github.com/reflexflow/reflexflow" not in PYPROJECT.read_text()


def test_build_backend_supports_the_spdx_license_field():
    requires = tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]
    assert "setuptools>=77" in requires  # PEP 639 license expressions need setuptools 77
