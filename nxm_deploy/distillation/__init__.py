"""Knowledge-distillation losses (GPUSQ-TLM, ACL 2023, Sec. 3: hard + soft + feature losses)."""

from nxm_deploy.distillation.losses import DistillationConfig, check_teacher, distillation_loss

__all__ = ["DistillationConfig", "check_teacher", "distillation_loss"]
