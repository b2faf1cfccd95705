"""Lazy imports of optional dependencies (after Polygraphy ``mod/importer.py``, without auto-install)."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from nxm_deploy.errors import MissingDependencyError


def has_module(name: str) -> bool:
    """Return True when ``name`` can be imported (checked with ``find_spec``; nothing is imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(name: str, extra: str) -> ModuleType:
    """Import ``name`` now or raise :class:`MissingDependencyError` naming the extra that provides it.

    Raises:
        MissingDependencyError: the module is absent or fails to import (e.g. TensorRT without its libs).
    """
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, OSError from missing shared libs, ...
        raise MissingDependencyError(
            f"Module '{name}' is required but could not be imported ({type(exc).__name__}: {exc}).",
            hint=f"pip install 'nxm-deploy[{extra}]' on a machine where it is available.",
        ) from exc
