"""Exit codes of the validation stage's errors (the classes live in :mod:`nxm_deploy.errors`).

Exit codes of ``nxm-deploy validate``
(:data:`EXIT_CODES`): 2 bad input (:class:`ValidationError`, also a :class:`~nxm_deploy.errors.ConfigError`),
4 accuracy gate, 5 latency gate, 1 output diff gate.
"""

from __future__ import annotations

from nxm_deploy.errors import (
    AccuracyRegressionError,
    LatencyRegressionError,
    OutputMismatchError,
    RegressionError,
    ValidationError,
)

__all__ = [
    "EXIT_ACCURACY_REGRESSION", "EXIT_CODES", "EXIT_LATENCY_REGRESSION", "AccuracyRegressionError",
    "LatencyRegressionError", "OutputMismatchError", "RegressionError", "ValidationError", "exit_code_for",
]

EXIT_ACCURACY_REGRESSION = 4
EXIT_LATENCY_REGRESSION = 5

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
