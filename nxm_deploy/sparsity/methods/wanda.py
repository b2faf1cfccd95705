"""Wanda n:m masks: score ``|W_ij| * ||X_j||_2``, keep the n best of every m consecutive inputs of each row.

Source: Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models" (ICLR 2024),
Eq. 1: ``S_ij = |W_ij| * ||X_j||_2``, with ``X_j`` the j-th input feature of the layer over every calibration token
(``N x L`` tokens), compared within each output row; the n:m variant (their Sec. 4) compares within each group of m
consecutive inputs of a row. As the authors' code does, the blocks are pruned in order: the norms of block k are
measured with blocks 0..k-1 already pruned. Padding tokens are left out of the norms (the attention mask).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict

import torch

from nxm_deploy.sparsity.admm import apply_masks_
from nxm_deploy.sparsity.mask import nm_mask
from nxm_deploy.sparsity.methods import MaskResult, MaskSearch

log = logging.getLogger("nxm_deploy.sparsity")

_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def blocks_of(targets: list[str]) -> "OrderedDict[str, list[str]]":
    """Targets grouped by block (the module path up to its first numeric part, e.g. ``bert.encoder.layer.3``), in
    the order the targets list them; a target outside any numbered block is a block of its own."""
    out: OrderedDict[str, list[str]] = OrderedDict()
    for name in targets:
        match = _BLOCK.match(name)
        out.setdefault(match.group(1) if match else name, []).append(name)
    return out


@torch.no_grad()
def input_norms(model, names: list[str], forward_loop) -> dict[str, torch.Tensor]:
    """``{module: ||X_j||_2 per input feature}`` (float64 ``[in]``) of the ``nn.Linear`` modules ``names`` over the
    calibration batches that ``forward_loop(model)`` runs; tokens where the batch's ``attention_mask`` is 0 are
    left out."""
    sums = {name: None for name in names}
    current = {}

    def capture_mask(module, args, kwargs):
        current["mask"] = kwargs.get("attention_mask")

    def hook(name):
        def fn(module, args, output):
            x = args[0].detach()
            mask = current.get("mask")
            if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask.to(torch.bool)]
            x = x.reshape(-1, x.shape[-1]).double()
            part = (x * x).sum(dim=0)
            sums[name] = part if sums[name] is None else sums[name] + part
        return fn

    handles = [model.register_forward_pre_hook(capture_mask, with_kwargs=True)]
    handles += [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        forward_loop(model)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, value in sums.items() if value is None]
    if missing:
        raise RuntimeError(f"Wanda: the calibration batches never reached {missing[:3]}")
    return {name: value.sqrt() for name, value in sums.items()}


def wanda_mask(weight: torch.Tensor, norms: torch.Tensor, pattern) -> torch.Tensor:
    """The n:m mask of ``weight`` ``[out, in]`` by the Wanda score ``|W_ij| * norms_j`` (``norms``: ``[in]``);
    bool, True = keep, ties to the lower index (:func:`~nxm_deploy.sparsity.mask.nm_mask`)."""
    score = weight.detach().abs().double() * norms.to(weight.device).double().unsqueeze(0)
    return nm_mask(score, pattern)


def find_masks(search: MaskSearch) -> MaskResult:
    """Wanda masks of the dense model's targets, block by block on ``sparsity.calibration_batches`` batches.

    The student is pruned as it goes (each block's masks are applied before the next block's norms are measured);
    the stage applies the returned masks again, which changes nothing.
    """
    model = search.student.to(search.device)
    was_training = model.training
    model.eval()
    masks = {}
    blocks = blocks_of(search.targets)
    try:
        for block, names in blocks.items():
            norms = input_norms(model, names, search.calibration)
            block_masks = {f"{name}.weight": wanda_mask(model.get_submodule(name).weight, norms[name],
                                                        search.pattern).cpu() for name in names}
            apply_masks_(model, block_masks)
            masks.update(block_masks)
            log.info("Wanda %s: %d layers masked", block, len(names))
    finally:
        model.train(was_training)
    batches = search.recipe.sparsity.calibration_batches
    return MaskResult(masks=masks, details={"calibration_batches": batches, "blocks": len(blocks)})
