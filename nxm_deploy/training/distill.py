"""Knowledge distillation as a ``transformers.Trainer`` piece: :class:`DistillationTrainerMixin` (GPUSQ-TLM hard/soft/
feature KD with a frozen teacher, losses in float32)."""

from __future__ import annotations

import torch
from torch import nn

from nxm_deploy.distillation.losses import DistillationConfig, check_teacher, distillation_loss
from nxm_deploy.training.admm import unwrap_model

class DistillationTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (before it): train on the GPUSQ-TLM distillation loss.

    ``L = alpha * L_hard + beta * L_soft + gamma * L_feature`` (GPUSQ-TLM, ACL Findings 2023, Sec. 3, Eq. 1-3;
    :func:`nxm_deploy.distillation.distillation_loss`). The frozen teacher runs on the same batch (eval mode,
    ``no_grad``, under the Trainer's mixed-precision autocast for speed); the three terms are computed in
    float32 outside autocast, so bf16/fp16 training does not round the KL and MSE terms.

    Args:
        teacher (nn.Module | None): frozen teacher with the student's label set (``None``: the model's own task
            loss). Moved to the Trainer's device.
        distillation (DistillationConfig | None): alpha, beta, gamma, temperature. Defaults to the paper's
            1, 10, 1 and T = 2.

    Raises:
        ConfigError: when the teacher's label set differs from the student's (see :func:`check_teacher`).
    """

    def __init__(self, *args, teacher: nn.Module | None = None, distillation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.distillation = distillation if distillation is not None else DistillationConfig()
        if teacher is not None:
            check_teacher(unwrap_model(self.model), teacher)
            teacher.eval()
            for param in teacher.parameters():
                param.requires_grad_(False)
            teacher.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """KD loss in training mode with a teacher; the model's own loss otherwise (evaluation, no teacher)."""
        if self.teacher is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        with torch.no_grad(), self.accelerator.autocast():
            t_out = self.teacher(**inputs, output_hidden_states=True)
        s_out = model(**inputs, output_hidden_states=True)
        with torch.autocast(device_type=s_out.logits.device.type, enabled=False):
            loss, parts = distillation_loss(
                s_out.logits.float(), t_out.logits.float(), labels, self.distillation,
                tuple(h.float() for h in s_out.hidden_states[1:]), tuple(h.float() for h in t_out.hidden_states[1:]),
            )
        self._add_log_terms({f"kd_{name}": value for name, value in parts.items()})
        return (loss, s_out) if return_outputs else loss

    def _add_log_terms(self, terms: dict[str, float]) -> None:
        """Accumulate loss terms; :meth:`log` adds their means since the last training log to it."""
        sums = self.__dict__.setdefault("_log_terms", {})
        for name, value in terms.items():
            total, count = sums.get(name, (0.0, 0))
            sums[name] = (total + float(value), count + 1)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """``Trainer.log``; a training log (with ``loss``) also gets the mean of each accumulated loss term."""
        sums = self.__dict__.get("_log_terms")
        if sums and "loss" in logs:
            logs.update({name: round(total / count, 6) for name, (total, count) in sums.items() if count})
            sums.clear()
        super().log(logs, *args, **kwargs)


