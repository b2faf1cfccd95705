"""nxm-deploy's methods for your own ``transformers.Trainer`` script (the same pieces the pipeline trains with).

Re-exported from :mod:`nxm_deploy.training.trainer`: the ADMM callback and trainer, the masked fine-tune callback,
the distillation mixin and :class:`NxmTrainer` (ADMM + KD + our weight-decay rule in one Trainer).
"""

from nxm_deploy.training.trainer import (
    ADMM_STATE_NAME,
    ADMMCallback,
    ADMMTrainer,
    ADMMTrainerMixin,
    DistillationTrainerMixin,
    MaskedFinetuneCallback,
    NxmTrainer,
)

__all__ = ["ADMM_STATE_NAME", "ADMMCallback", "ADMMTrainer", "ADMMTrainerMixin", "DistillationTrainerMixin",
           "MaskedFinetuneCallback", "NxmTrainer"]
