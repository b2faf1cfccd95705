"""Integrations of nxm-deploy's methods into other training frameworks (Hugging Face ``transformers.Trainer``)."""

from nxm_deploy.integrations.hf_trainer import (
    ADMM_STATE_NAME,
    ADMMCallback,
    ADMMTrainer,
    ADMMTrainerMixin,
    MaskedFinetuneCallback,
)

__all__ = ["ADMM_STATE_NAME", "ADMMCallback", "ADMMTrainer", "ADMMTrainerMixin", "MaskedFinetuneCallback"]
