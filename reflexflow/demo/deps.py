"""Optional dependencies of the demo (the ``demo`` extra), imported on demand."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]

INSTALL_HINT = 'pip install "reflexflow[demo]"'


class MissingExtraError(ImportError):
    """An optional package of the ``demo`` extra is not installed."""


def require(module: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise MissingExtraError naming the package and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        name = package or module.split(".")[0]
        raise MissingExtraError(
            f"reflexflow demo needs the optional package {name!r} ({err}); "
            f"install the demo extra: {INSTALL_HINT}"
        ) from err
