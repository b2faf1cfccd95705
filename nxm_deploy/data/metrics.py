"""Task metrics: accuracy, F1 (positive class 1), Matthews correlation, Pearson and Spearman (GLUE), and the
perplexity of a causal language model.

Which metrics a task reports is set by ``TaskSpec.metrics``; :func:`compute_metrics` returns exactly those.
"""

from __future__ import annotations

import math

import numpy as np

from nxm_deploy.data.tasks import TaskSpec, get_task
from nxm_deploy.errors import ConfigError


IGNORE_INDEX = -100
"""Label of a token that is not scored (Hugging Face's convention: padding)."""


def lm_nll_sums(logits, labels):
    """Next-token negative log-likelihood of a causal LM, summed per sequence (natural log, nats).

    Token ``t`` is predicted from the logits at ``t - 1`` (the shift of Hugging Face's ``*ForCausalLM`` loss);
    labels equal to :data:`IGNORE_INDEX` are not scored. Computed in float32 with ``torch.log_softmax``.

    Args:
        logits: ``[B, L, V]`` float logits (``torch.Tensor`` or ``np.ndarray``).
        labels: ``[B, L]`` int token ids (``IGNORE_INDEX`` for unscored positions), same type family.

    Returns:
        torch.Tensor: float64 ``[B, 2]``: the summed NLL of each sequence and its number of scored tokens
        (``np.ndarray`` when ``logits`` is one).

    Raises:
        ConfigError: shapes that do not fit ``[B, L, V]`` / ``[B, L]``.
    """
    import torch

    as_numpy = isinstance(logits, np.ndarray)
    x = torch.as_tensor(logits)
    y = torch.as_tensor(labels).to(x.device)
    if x.ndim != 3 or y.shape != x.shape[:2]:
        raise ConfigError(f"Causal-LM scoring needs logits [B, L, V] and labels [B, L], got {tuple(x.shape)} and "
                          f"{tuple(y.shape)}.", hint="Pass the model's logits and the input ids as labels.")
    x, y = x[:, :-1].float(), y[:, 1:].long()
    keep = y != IGNORE_INDEX
    logp = torch.log_softmax(x, dim=-1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    out = torch.stack([(-logp * keep).sum(1).double(), keep.sum(1).double()], dim=1)
    return out.cpu().numpy() if as_numpy else out


def compute_metrics(task: TaskSpec | str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Score model outputs against gold labels.

    Args:
        task (TaskSpec | str): task spec or name.
        predictions (np.ndarray): classification: logits (or probabilities) ``[B, num_labels]``, any float
            dtype; the class is their argmax. Regression: scores ``[B]`` or ``[B, 1]``, any float dtype.
            Causal LM: logits ``[B, L, V]``, or their per-sequence ``[B, 2]`` sums of :func:`lm_nll_sums`.
        labels (np.ndarray): ``[B]`` (or ``[B, 1]`` for regression) integer class ids or float scores; causal LM:
            ``[B, L]`` token ids (ignored when ``predictions`` are already sums).

    Returns:
        dict[str, float]: one entry per metric of the task, keys among ``"accuracy"``, ``"f1"``
        (binary F1 of class 1), ``"matthews_corr"``, ``"pearson"``, ``"spearman"``, ``"perplexity"``
        (``exp(total NLL / scored tokens)``). A correlation is ``nan`` when either side is constant.

    Raises:
        ConfigError: when shapes do not match the task (wrong rank, wrong class count, different batch
            sizes), or the batch is empty.
    """
    spec = get_task(task)
    preds = np.asarray(predictions)
    gold = np.asarray(labels)

    if spec.is_causal_lm:
        sums = preds if preds.ndim == 2 and preds.shape[1] == 2 else lm_nll_sums(preds, gold)
        tokens = float(sums[:, 1].sum())
        if tokens == 0:
            raise ConfigError("Cannot compute perplexity on 0 scored tokens.", hint="Evaluate at least one block.")
        return {"perplexity": float(math.exp(float(sums[:, 0].sum()) / tokens))}

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
