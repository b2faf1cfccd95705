"""Fixed n:m masks during a fine-tune (masked fine-tune, QAT): :class:`MaskedFinetuneCallback`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import TrainerCallback

from nxm_deploy.errors import ConfigError
from nxm_deploy.sparsity.admm import apply_masks_
from nxm_deploy.training.admm import unwrap_model

class MaskedFinetuneCallback(TrainerCallback):
    """Keep fixed n:m masks during a fine-tune: ``W <- W * mask`` at train begin and after every optimizer step.

    The ASP-style masked fine-tune after the hard projection (method-notes 1.3): pruned weights stay exact zeros.

    Args:
        masks (Mapping[str, torch.Tensor]): ``tensor fqn -> bool [out, in]`` mask (True = keep), fqns relative to
            the unwrapped model, e.g. ``ADMMCallback.masks``.

    Raises:
        ConfigError: for empty masks here; for an unknown fqn or a shape mismatch on ``on_train_begin``.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        if not masks:
            raise ConfigError("MaskedFinetuneCallback got no masks.", hint="Pass ADMMCallback.masks after training.")
        self.masks = {fqn: torch.as_tensor(mask).bool() for fqn, mask in masks.items()}
        self._model: nn.Module | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = unwrap_model(model)
        apply_masks_(self._model, self.masks)  # validates fqns and shapes
        self.masks = {fqn: m.to(self._model.get_parameter(fqn).device) for fqn, m in self.masks.items()}

    def on_step_end(self, args, state, control, **kwargs):
        if self._model is not None:
            apply_masks_(self._model, self.masks)


