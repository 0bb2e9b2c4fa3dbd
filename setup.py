"""Build script. Metadata lives in pyproject.toml; this file exists for native extensions."""

from setuptools import setup

setup()
