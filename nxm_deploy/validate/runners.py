"""Validation's check of a runner before it is scored: it takes the run's inputs and returns the task's logits.

The runners themselves are the runtimes' (:mod:`nxm_deploy.runtimes`).
"""

from __future__ import annotations

import numpy as np

from nxm_deploy.errors import ValidationError


def check_io(runner, expected_inputs: list[str], num_labels: int, probe: dict[str, np.ndarray]) -> None:
    """Check an active runner takes ``expected_inputs`` and returns ``[B, num_labels]`` logits on ``probe``
    (``num_labels`` 0: a causal LM's ``[B, L, vocab]``).

    Raises:
        ValidationError: different input names, no ``logits`` output, or another label count.
    """
    names = runner.input_names
    if sorted(names) != sorted(expected_inputs):
        raise ValidationError(
            f"Runner {runner.name} ({runner.source}) takes inputs {names}, but the run's models take {list(expected_inputs)}.",
            hint="Validate models exported from the same run (same tokenizer and export manifest).",
        )
    out = runner.infer(probe)
    if "logits" not in out:
        raise ValidationError(f"Runner {runner.name} ({runner.source}) has outputs {list(out)}, expected 'logits'.")
    from nxm_deploy.models import logits_shape_problem

    problem = logits_shape_problem(np.shape(out["logits"]), num_labels, next(iter(probe.values())).shape)
    if problem:
        raise ValidationError(
            f"Runner {runner.name} ({runner.source}) returns {problem}.",
            hint="The model was exported as a classifier; re-export it from this run." if num_labels == 0 else
            "The model was trained for another task or label count; re-export it from this run.")
