"""Magnitude n:m masks (ASP): keep the n largest ``|w|`` of every m consecutive weights along the input axis.

Source: Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks" (NVIDIA ASP; ModelOpt's
``mts.sparsify(mode="sparse_magnitude")``): one-shot, no data.
"""

from __future__ import annotations

from nxm_deploy.sparsity.mask import nm_mask
from nxm_deploy.sparsity.methods import MaskResult, MaskSearch


def magnitude_masks(model, targets, pattern) -> dict:
    """``{"<module>.weight": bool [out, in]}``: the n:m magnitude mask of every target of ``model`` (ties to the lower
    index, :func:`~nxm_deploy.sparsity.mask.nm_mask`)."""
    return {f"{name}.weight": nm_mask(model.get_submodule(name).weight, pattern).cpu() for name in targets}


def find_masks(search: MaskSearch) -> MaskResult:
    """The magnitude masks of the dense model's target weights (no training, no data)."""
    return MaskResult(masks=magnitude_masks(search.student, search.targets, search.pattern))
