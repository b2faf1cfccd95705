"""The one way to read a run's artifacts: manifests checked against the sha256 their stage recorded, the stage models,
the n:m masks, the QAT model, the mask contract of a sparse model, and the run's recipe and ``run.json``.

Export, validation, the engines stage, the client, the GPU benchmark and the tools read a run through here; none of
them imports the training stages. Paths come from :class:`~nxm_deploy.run.layout.RunLayout`.

Importing it imports neither torch nor transformers: the model loaders import them when called, so the CLI and the
stage executor read run directories cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nxm_deploy.errors import RunDirError, SparsityVerificationError
from nxm_deploy.fileio import read_json, verify_stage_files
from nxm_deploy.run.layout import TRAINING_DIRS, RunLayout

if TYPE_CHECKING:  # pragma: no cover
    import torch


def read_run_info(run_dir: str | Path) -> dict:
    """``run.json`` of a run directory (recipe hash, glue dir, engine spec paths); {} when absent."""
    marker = RunLayout(run_dir).run_info
    return read_json(marker) if marker.is_file() else {}


def open_run_dir(run_dir: str | Path):
    """The recipe (:class:`~nxm_deploy.config.recipe.Recipe`) stored in an existing run directory.

    Raises:
        RunDirError: not a run directory.
    """
    run_dir = Path(run_dir)
    from nxm_deploy.config.recipe import load_recipe  # the torch-free schema

    layout = RunLayout(run_dir)
    if not layout.recipe.is_file():
        raise RunDirError(
            f"{run_dir} is not a run directory (no {layout.recipe.name}).",
            hint="Start a run with `nxm-deploy run RECIPE.yaml` or `nxm-deploy train RECIPE.yaml`.",
        )
    return load_recipe(layout.recipe)


def read_stage_manifest(run_dir: str | Path, stage: str) -> dict:
    """Manifest of a finished stage; every file it recorded is checked against its sha256.

    Raises:
        RunDirError: the stage has not finished in this run directory, or one of its files was changed after
            it was written (one line: which file, which manifest, the command that regenerates it).
    """
    path = RunLayout(run_dir).stage_manifest(stage)
    if not path.is_file():
        raise RunDirError(
            f"Stage '{stage}' has no finished artifact in {path.parent}.",
            hint=f"Run `nxm-deploy train {run_dir} --stage {stage}` (or `nxm-deploy run`) first.",
        )
    return verify_stage_files(path.parent, f"nxm-deploy train {run_dir} --stage {stage}")


def verify_finished_stages(run_dir: str | Path) -> list[str]:
    """Check the files of every training stage that has finished in ``run_dir`` against their manifests.

    Returns the stages checked. Raises :class:`RunDirError` as :func:`read_stage_manifest`.
    """
    done = [stage for stage in TRAINING_DIRS if (RunLayout(run_dir).stage_manifest(stage)).is_file()]
    for stage in done:
        read_stage_manifest(run_dir, stage)
    return done


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """The directory of a training stage (``dense``, ``admm`` -> ``sparse/``, ``qat``) in a run."""
    return RunLayout(run_dir).stage_dir(stage)


def load_stage_model(run_dir: str | Path, stage: str):
    """``(model, tokenizer)`` of a finished ``dense`` or ``admm`` (sparse FP) stage of a run."""
    from nxm_deploy.models import load_saved_model

    return load_saved_model(stage_dir(run_dir, stage))


def load_masks(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """Bool masks (True = keep) by tensor fqn, from ``sparse/masks.safetensors``."""
    from safetensors.torch import load_file

    return load_file(str(RunLayout(run_dir).masks()))


def load_qat_model(run_dir: str | Path):
    """Rebuild the QAT model (sparse model + QuantLinear targets + trained state): ``(model, tokenizer, quant_info)``.

    Raises:
        RunDirError: the QAT stage has not finished.
    """
    from safetensors.torch import load_model

    from nxm_deploy.quantization import quantize_model_
    from nxm_deploy.quantization.placement import place_quantizers_

    run_dir = Path(run_dir)
    read_stage_manifest(run_dir, "qat")
    layout = RunLayout(run_dir)
    info = read_json(layout.quant_info())
    model, tokenizer = load_stage_model(run_dir, "admm")
    quantize_model_(model, info["quantized_modules"], learn_amax=False)
    groups = info.get("quantizer_groups") or {"gemm_outputs": False, "attention": False}  # runs before the groups
    place_quantizers_(model, info["quantized_modules"], learn_amax=False, **groups)
    load_model(model, str(layout.qat_weights()))  # strict; a tied tensor (GPT-2's lm_head = wte) is saved once
    model.eval()
    return model, tokenizer, info


def check_masks(model, masks: dict[str, torch.Tensor], pattern) -> dict:
    """Every masked weight exactly 0 and every group within the pattern; INT8 codes of pruned weights 0.

    Raises:
        SparsityVerificationError: naming each layer that breaks a rule.
    """
    from nxm_deploy.quantization import quantized_modules
    from nxm_deploy.sparsity import count_nm_violations

    problems, layers = [], 0
    qmods = quantized_modules(model)
    for fqn, mask in masks.items():
        module_fqn = fqn.rpartition(".")[0]
        weight = model.get_submodule(module_fqn).weight.detach()
        mask = mask.to(weight.device)
        layers += 1
        nonzero_pruned = int((weight[~mask] != 0).sum())
        _, bad, first = count_nm_violations(weight.float().cpu().numpy(), pattern, axis=1)
        if nonzero_pruned or bad:
            problems.append(f"{module_fqn}: {nonzero_pruned} pruned weights nonzero, {bad} groups over {pattern} (first {first})")
        if module_fqn in qmods:
            codes = qmods[module_fqn].weight_quantizer.int8_codes(weight)
            if int((codes[~mask] != 0).sum()):
                problems.append(f"{module_fqn}: INT8 codes of pruned weights are not 0")
    if problems:
        raise SparsityVerificationError("Mask check failed: " + "; ".join(problems))
    return {"layers_checked": layers, "pattern": str(pattern), "ok": True}
