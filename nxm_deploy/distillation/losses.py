"""Distillation loss of GPUSQ-TLM (Chen et al., ACL Findings 2023, Sec. 3, Eq. 1-3; method-notes 3.2 item 4).

``L = alpha * L_hard + beta * L_soft + gamma * L_feature`` with

* ``L_hard``: cross entropy with the labels (MSE for regression);
* ``L_soft``: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` (Hinton et al. 2015 scaling); for regression the MSE
  between student and teacher predictions;
* ``L_feature``: sum over transformer blocks of ``MSE(h_s^l, h_t^l)`` plus ``MSE(logits_s, logits_t)`` for the
  final projection.

Defaults alpha, beta, gamma = 1, 10, 1 as in the paper. For a causal LM (logits ``[B, L, V]``) every scored
next-token position is one example of the classification terms (GPUSQ-TLM applies the same loss to GPT models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nxm_deploy.config.recipe import DistillationConfig  # the torch-free schema owns it


def check_teacher(student, teacher) -> None:
    """Refuse a KD teacher whose label set differs from the student's (HF ``config.num_labels`` / ``id2label``).

    Distillation compares logits column by column, so the teacher must predict the same classes in the same
    order (or both be regression heads, ``num_labels == 1``).

    Raises:
        ConfigError: naming both label sets when they differ.
    """
    from nxm_deploy.errors import ConfigError

    s_cfg, t_cfg = getattr(student, "config", None), getattr(teacher, "config", None)
    if s_cfg is None or t_cfg is None:
        return
    s_labels = {int(k): str(v) for k, v in (getattr(s_cfg, "id2label", None) or {}).items()}
    t_labels = {int(k): str(v) for k, v in (getattr(t_cfg, "id2label", None) or {}).items()}
    if s_cfg.num_labels != t_cfg.num_labels or (s_labels and t_labels and s_labels != t_labels):
        raise ConfigError(
            f"KD teacher label set {t_cfg.num_labels} labels {t_labels} differs from the student's "
            f"{s_cfg.num_labels} labels {s_labels}: distillation compares logits class by class, so both must "
            "predict the same classes in the same order.",
            hint="Use a teacher fine-tuned on the same task (the dense model of this run for the sparse stage, the "
            "sparse FP model for QAT), or turn distillation off.",
        )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    config: DistillationConfig,
    student_hidden: tuple[torch.Tensor, ...] | None = None,
    teacher_hidden: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Combined KD loss (mean over the batch).

    Args:
        student_logits, teacher_logits: ``[B, C]`` float; ``C == 1`` means regression. A causal LM's ``[B, L, V]``:
            position ``t`` predicts token ``t + 1``; the positions whose next label is -100 are left out.
        labels: ``[B]`` int64 class ids (float32 scores for regression), or None for unlabeled data, in which
            case the hard loss uses the teacher's argmax (classification) or prediction (regression); causal
            LM: ``[B, L]`` token ids (-100: not scored).
        config: weights and temperature.
        student_hidden, teacher_hidden: per-block hidden states, each ``[B, L, H]`` (HF ``hidden_states``
            without the embedding output); both None to skip the block terms.

    Returns:
        (loss, parts): scalar loss tensor, and the float value of each weighted term
        (``hard``, ``soft``, ``feature``).

    Raises:
        ValueError: when student and teacher shapes differ.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher logits {tuple(teacher_logits.shape)}")
    teacher_logits = teacher_logits.detach()
    if student_logits.ndim == 3:  # causal LM: one classification example per scored next-token position
        vocab = student_logits.shape[-1]
        student_logits, teacher_logits = student_logits[:, :-1].reshape(-1, vocab), teacher_logits[:, :-1].reshape(-1, vocab)
        if labels is not None:
            labels = labels[:, 1:].reshape(-1)
            keep = labels != -100
            student_logits, teacher_logits, labels = student_logits[keep], teacher_logits[keep], labels[keep]
    regression = student_logits.shape[-1] == 1
    if regression:
        target = labels.float() if labels is not None else teacher_logits.squeeze(-1)
        hard = F.mse_loss(student_logits.squeeze(-1), target)
        soft = F.mse_loss(student_logits, teacher_logits)
    else:
        target = labels if labels is not None else teacher_logits.argmax(-1)
        hard = F.cross_entropy(student_logits, target)
        temp = config.temperature
        soft = F.kl_div(
            F.log_softmax(student_logits / temp, dim=-1),
            F.log_softmax(teacher_logits / temp, dim=-1),
            reduction="batchmean",
            log_target=True,
        ) * (temp * temp)
    feature = F.mse_loss(student_logits, teacher_logits)  # final projection
    if student_hidden is not None and teacher_hidden is not None:
        if len(student_hidden) != len(teacher_hidden):
            raise ValueError(f"student has {len(student_hidden)} blocks, teacher {len(teacher_hidden)}")
        for hs, ht in zip(student_hidden, teacher_hidden):
            feature = feature + F.mse_loss(hs, ht.detach())
    loss = config.alpha * hard + config.beta * soft + config.gamma * feature
    parts = {
        "hard": float(config.alpha * hard.detach()),
        "soft": float(config.beta * soft.detach()),
        "feature": float(config.gamma * feature.detach()),
    }
    return loss, parts
