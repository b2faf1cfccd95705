"""Error tree of nxm-deploy.

The library raises these; only ``nxm_deploy.cli`` turns them into exit codes and one-line messages.
Messages follow the *what / rule / hint* form: the bad value, the rule it breaks, and how to fix it.
"""

from __future__ import annotations


class NxmError(Exception):
    """Base class of every error nxm-deploy raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\nHint: {hint}")


class ConfigError(NxmError, ValueError):
    """A recipe, CLI flag or argument has a bad value."""


class DataError(NxmError, ValueError):
    """Task data is missing or malformed."""


class MissingDependencyError(NxmError, ImportError):
    """An optional dependency (an extra) is not installed or cannot be used on this machine."""


class PatternError(NxmError, ValueError):
    """A tensor cannot hold the requested n:m pattern (shape, axis)."""


class SparsityVerificationError(NxmError):
    """A layer that must be n:m sparse is not. Carries the per-layer ``report``."""

    def __init__(self, message: str, *, report=None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.report = report


class ExportError(NxmError):
    """ONNX export failed or produced a graph that breaks a guard."""


class EngineBuildError(NxmError):
    """A TensorRT engine build failed; the message lists every parser/builder error."""


class RunDirError(NxmError):
    """A run directory is missing an artifact, or holds a different run."""
