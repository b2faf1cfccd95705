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


class ValidationError(ConfigError):
    """Validation cannot run on these inputs: models with different input names or label counts, an engine built
    for another GPU / TensorRT version, a latency grid point outside an engine's profile."""


class RegressionError(NxmError):
    """A CI gate of the validator failed. ``failures`` lists every failed check (dicts from the ``gates`` section
    of ``validation.json``); ``report`` is the path of the report written before raising."""

    def __init__(self, message: str, *, failures: list[dict] | None = None, report: str | None = None,
                 hint: str | None = None):
        super().__init__(message, hint=hint)
        self.failures = list(failures or [])
        self.report = report


class AccuracyRegressionError(RegressionError):
    """A model's dev-set primary metric dropped more than ``validate.max_accuracy_drop_pt`` points below the
    dense baseline (also raised when the latency gate failed too: accuracy comes first). CLI exit 4."""


class LatencyRegressionError(RegressionError):
    """At some grid point the sparse models' best speedup over the dense baseline is below
    ``validate.min_speedup``. CLI exit 5."""


class OutputMismatchError(RegressionError):
    """A gated output comparison (``validate.diff_gate``) exceeded its tolerance. CLI exit 1."""


class EngineCheckError(NxmError):
    """The built engine does not match its spec (precision, required sparse layers). Carries the check and the
    engine's status record (the engine and its manifest are written, with status ``check failed: ...``). CLI exit 5."""

    def __init__(self, message: str, *, check=None, record: dict | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.check = check
        self.record = record


#: The CLI's one exit-code table: (exception class, exit code, meaning), the most specific class first.
EXIT_CODES: tuple[tuple[type, int, str], ...] = (
    (AccuracyRegressionError, 4, "a validated model lost more than validate.max_accuracy_drop_pt to dense"),
    (LatencyRegressionError, 5, "the sparse models missed validate.min_speedup"),
    (EngineBuildError, 4, "a TensorRT engine build failed"),
    (EngineCheckError, 5, "a built engine failed its post-build check"),
    (MissingDependencyError, 3, "TensorRT, a GPU or another dependency is missing on this machine"),
    (ConfigError, 2, "bad input: recipe, flag, engine spec"),
    (DataError, 2, "bad input: task data"),
    (RunDirError, 2, "bad input: run directory or a changed artifact"),
    (NxmError, 1, "a check failed: n:m verification, export parity, output diff"),
)


def exit_code(exc: BaseException) -> int:
    """The CLI exit code of an error (:data:`EXIT_CODES`; 1 for anything else)."""
    return next((code for cls, code, _ in EXIT_CODES if isinstance(exc, cls)), 1)
