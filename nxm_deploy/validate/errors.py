"""Errors of the validation stage.

Kept here until they move to :mod:`nxm_deploy.errors`; every class is an :class:`~nxm_deploy.errors.NxmError`,
so the CLI already turns them into one line and a non-zero exit. Intended exit codes of ``nxm-deploy validate``
(:data:`EXIT_CODES`): 2 bad input (:class:`ValidationError`, also a :class:`~nxm_deploy.errors.ConfigError`),
4 accuracy gate, 5 latency gate, 1 output diff gate.
"""

from __future__ import annotations

from nxm_deploy.errors import ConfigError, NxmError

__all__ = [
    "EXIT_ACCURACY_REGRESSION", "EXIT_CODES", "EXIT_LATENCY_REGRESSION", "AccuracyRegressionError",
    "LatencyRegressionError", "OutputMismatchError", "RegressionError", "ValidationError", "exit_code_for",
]

EXIT_ACCURACY_REGRESSION = 4
EXIT_LATENCY_REGRESSION = 5


class ValidationError(ConfigError):
    """Validation cannot run on these inputs: models with different input names or label counts, an engine
    built for another GPU / TensorRT version, a latency grid point outside an engine's profile."""


class RegressionError(NxmError):
    """A CI gate failed. ``failures`` lists every failed check (dicts from the ``gates`` section of
    ``validation.json``); ``report`` is the path of the report written before raising."""

    def __init__(self, message: str, *, failures: list[dict] | None = None, report: str | None = None,
                 hint: str | None = None):
        super().__init__(message, hint=hint)
        self.failures = list(failures or [])
        self.report = report


class AccuracyRegressionError(RegressionError):
    """A model's dev-set primary metric dropped more than ``validate.max_accuracy_drop_pt`` points below the dense
    baseline (also raised when the latency gate failed too: accuracy comes first)."""


class LatencyRegressionError(RegressionError):
    """At some grid point the sparse models' best speedup over the dense baseline is below ``validate.min_speedup``."""


class OutputMismatchError(RegressionError):
    """A gated output comparison (``validate.diff_gate``) exceeded its tolerance."""


EXIT_CODES = {
    AccuracyRegressionError: EXIT_ACCURACY_REGRESSION,
    LatencyRegressionError: EXIT_LATENCY_REGRESSION,
    OutputMismatchError: 1,
    ValidationError: 2,
}


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of a validation error (None for other exceptions)."""
    for cls, code in EXIT_CODES.items():
        if isinstance(exc, cls):
            return code
    return None
