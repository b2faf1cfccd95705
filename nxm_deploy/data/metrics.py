"""GLUE metrics: accuracy, F1 (positive class 1), Matthews correlation, Pearson and Spearman.

Which metrics a task reports is set by ``TaskSpec.metrics``; :func:`compute_metrics` returns exactly those.
"""

from __future__ import annotations

import math

import numpy as np

from nxm_deploy.data.tasks import TaskSpec, get_task
from nxm_deploy.errors import ConfigError


def compute_metrics(task: TaskSpec | str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Score model outputs against gold labels.

    Args:
        task (TaskSpec | str): task spec or name.
        predictions (np.ndarray): classification: logits (or probabilities) ``[B, num_labels]``, any float
            dtype; the class is their argmax. Regression: scores ``[B]`` or ``[B, 1]``, any float dtype.
        labels (np.ndarray): ``[B]`` (or ``[B, 1]`` for regression) integer class ids or float scores.

    Returns:
        dict[str, float]: one entry per metric of the task, keys among ``"accuracy"``, ``"f1"``
        (binary F1 of class 1), ``"matthews_corr"``, ``"pearson"``, ``"spearman"``. A correlation is
        ``nan`` when either side is constant.

    Raises:
        ConfigError: when shapes do not match the task (wrong rank, wrong class count, different batch
            sizes), or the batch is empty.
    """
    spec = get_task(task)
    preds = np.asarray(predictions)
    gold = np.asarray(labels)

    if spec.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if gold.ndim == 2 and gold.shape[1] == 1:
            gold = gold[:, 0]
        if preds.ndim != 1:
            raise ConfigError(
                f"Task '{spec.name}' is regression: predictions must have shape [B] or [B, 1], got {preds.shape}.",
                hint="Pass the model's single output per example.",
            )
        y_pred = preds.astype(np.float64)
    else:
        if preds.ndim != 2 or preds.shape[1] != spec.num_labels:
            raise ConfigError(
                f"Task '{spec.name}' has {spec.num_labels} classes: predictions must be logits of shape "
                f"[B, {spec.num_labels}], got {preds.shape}.",
                hint="Pass the raw logits, not argmaxed class ids.",
            )
        y_pred = preds.argmax(axis=-1)

    if gold.ndim != 1 or gold.shape[0] != y_pred.shape[0]:
        raise ConfigError(
            f"Labels shape {gold.shape} does not match predictions shape {preds.shape}; "
            f"labels must have shape [{y_pred.shape[0]}].",
            hint="Pass one gold label per prediction row.",
        )
    if gold.shape[0] == 0:
        raise ConfigError("Cannot compute metrics on an empty batch (B=0).", hint="Evaluate at least one example.")

    out: dict[str, float] = {}
    if spec.is_regression:
        from scipy.stats import pearsonr, spearmanr  # noqa: PLC0415 - keep import of the module light

        y_true = gold.astype(np.float64)
        constant = y_true.shape[0] < 2 or np.ptp(y_true) == 0 or np.ptp(y_pred) == 0
        for name in spec.metrics:
            if constant:
                out[name] = math.nan
            elif name == "pearson":
                out[name] = float(pearsonr(y_pred, y_true)[0])
            elif name == "spearman":
                out[name] = float(spearmanr(y_pred, y_true)[0])
        return out

    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef  # noqa: PLC0415

    y_true = gold.astype(np.int64)
    for name in spec.metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(y_true, y_pred))
        elif name == "f1":
            out[name] = float(f1_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0.0))
        elif name == "matthews_corr":
            out[name] = float(matthews_corrcoef(y_true, y_pred))
    return out
