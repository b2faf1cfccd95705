"""SparseGPT n:m masks through NVIDIA ModelOpt: ``mts.sparsify(model, mode="sparsegpt")``, as ModelOpt users run it.

Source: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (ICML 2023),
Alg. 1: per layer, the Hessian ``H = 2 X X^T`` of the layer's inputs over the calibration tokens (dampened:
ModelOpt's ``hessian_damp`` 0.1 of the mean diagonal), and in each n:m group the weights with the smallest OBS error
``w^2 / [H^-1]_jj^2`` are pruned, column block by column block. What ModelOpt 0.47 does differently from the paper
(``modelopt/torch/sparsity/weight_sparsity/sparsegpt.py``): every Hessian comes from one pass through the dense model
(not layer by layer), padding tokens included, and it keeps the mask only: the kept weights stay the dense ones (the
paper's reconstruction update is computed on a copy and dropped). Our masked fine-tune follows either way.

Needs the ``modelopt`` extra (``pip install 'nxm-deploy[modelopt]'``); imported only when the method runs.
"""

from __future__ import annotations

import contextlib
import io
import logging

from nxm_deploy.errors import ConfigError, SparsityVerificationError
from nxm_deploy.sparsity.methods import MaskResult, MaskSearch

log = logging.getLogger("nxm_deploy.sparsity")

#: ModelOpt's name of the 2:4 pattern, the only one its SparseGPT mode takes
_MODELOPT_PATTERN = "2:4 sparsity"


def sparsify_rules(targets: list[str]) -> dict:
    """ModelOpt's module rules that sparsify exactly ``targets``: fnmatch patterns over module names, the last
    matching one wins (``None``: left dense, ``{}``: sparsified), so ``"*"`` first keeps everything else dense."""
    return {"nn.Linear": {"*": None, **{name: {} for name in targets}}, "nn.Conv2d": {"*": None}}


def find_masks(search: MaskSearch) -> MaskResult:
    """ModelOpt SparseGPT masks of the dense model's targets on ``sparsity.calibration_batches`` batches.

    Raises:
        MissingDependencyError: ModelOpt is not installed (checked by the registry before this runs).
        ConfigError: a pattern other than 2:4 (ModelOpt's SparseGPT mode knows 2:4 only).
        SparsityVerificationError: ModelOpt left a target without its mask (e.g. a dimension it skips).
    """
    if (search.pattern.n_keep, search.pattern.m_group) != (2, 4):
        raise ConfigError(f"sparsity.method sparsegpt runs through ModelOpt, whose SparseGPT mode makes 2:4 masks only; "
                          f"the recipe asks for {search.pattern}.",
                          hint="Use sparsity.pattern 2:4 with sparsegpt, or another sparsity.method (wanda, admm, "
                               "magnitude) for other n:m patterns.")
    import modelopt
    import modelopt.torch.sparsity as mts

    model = search.student.to(search.device)
    was_training = model.training
    model.eval()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # ModelOpt prints progress; library code does not print
            model = mts.sparsify(model, mode=[("sparsegpt", sparsify_rules(search.targets))],
                                 config={"forward_loop": search.calibration, "verbose": False,
                                         "pattern": _MODELOPT_PATTERN})
            missing = [name for name in search.targets
                       if getattr(model.get_submodule(name), "_weight_mask", None) is None]
            if missing:
                raise SparsityVerificationError(f"ModelOpt SparseGPT left {len(missing)} targets unmasked, first "
                                                f"{missing[:3]}.")
            masks = {f"{name}.weight": model.get_submodule(name)._weight_mask.detach().bool().cpu().clone()
                     for name in search.targets}
            mts.export(model)  # plain nn.Linear again, weight = weight * mask
    finally:
        model.train(was_training)
    for attr in ("_modelopt_state", "_modelopt_state_version"):  # ModelOpt's bookkeeping, not part of the model
        vars(model).pop(attr, None)
    for line in printed.getvalue().splitlines():
        log.debug("modelopt: %s", line)
    kept = {fqn: int(mask.sum()) for fqn, mask in masks.items()}
    expected = {fqn: mask.numel() * search.pattern.n_keep // search.pattern.m_group for fqn, mask in masks.items()}
    if kept != expected:
        bad = [fqn for fqn in kept if kept[fqn] != expected[fqn]]
        raise SparsityVerificationError(f"ModelOpt SparseGPT masks are not exactly 2:4 in {bad[:3]}.")
    return MaskResult(masks=masks, details={"calibration_batches": search.recipe.sparsity.calibration_batches,
                                            "modelopt": getattr(modelopt, "__version__", "?"),
                                            "hessian_damp": 0.1, "weights": "dense weights kept (ModelOpt keeps the "
                                            "mask only)"})
