"""Knowledge-distillation losses (GPUSQ-TLM, ACL 2023, Sec. 3: hard + soft + feature losses)."""

from nxm_deploy.distillation.losses import DistillationConfig, distillation_loss

__all__ = ["DistillationConfig", "distillation_loss"]
