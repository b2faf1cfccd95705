"""The one way to read a run's artifacts: manifests checked against the sha256 their stage recorded, the stage models,
the n:m masks, the QAT model, the mask contract of a sparse model, the run's recipe and ``run.json``, the exported
ONNX models (checked against the export manifest) and the built TensorRT engines (checked against their manifests).

Export, validation, the engines stage, the client, the GPU benchmark and the tools read a run through here; none of
them imports the training stages. Paths come from :class:`~nxm_deploy.run.layout.RunLayout`.

Importing it imports neither torch nor transformers: the model loaders import them when called, so the CLI and the
stage executor read run directories cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nxm_deploy.errors import RunDirError, SparsityVerificationError, ValidationError
from nxm_deploy.fileio import check_recorded_file, check_sha256, read_json, sha256_file, verify_stage_files
from nxm_deploy.run.layout import (
    CPU_INT8_ONNX, CPU_INT8_ONNX_LEGACY, DENSE_ONNX, MANIFEST, SPARSE_ONNX, TOKENIZER_CONFIG, TRAINING_DIRS, RunLayout,
)

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


# --------------------------------------------------------------------------------------------- model config, tokenizer


def read_model_config(run_dir: str | Path, stages: tuple[str, ...] = ("dense", "qat", "admm")) -> tuple[Path | None, dict]:
    """``(path, content)`` of the first training stage's ``config.json`` (Hugging Face model config) in ``stages``
    order, checked against the sha256 its stage manifest records; ``(None, {})`` when no stage has one.

    Raises:
        RunDirError: the file differs from its recorded sha256, or is not a JSON object.
    """
    layout = RunLayout(run_dir)
    path = next((layout.model_config(s) for s in stages if layout.model_config(s).is_file()), None)
    if path is None:
        return None, {}
    check_recorded_file(path, f"nxm-deploy train {run_dir} --stage {path.parent.name}")
    return path, _json_object(path, "Model config")


def tokenizer_files(run_dir: str | Path, stages: tuple[str, ...] = ("qat", "dense")) -> tuple[Path | None, dict]:
    """``(tokenizer.json, tokenizer_config.json content)`` of the first training stage in ``stages`` order that
    saved a fast tokenizer, both checked against their stage manifest; ``(None, {})`` when none did."""
    layout = RunLayout(run_dir)
    tokenizer = next((layout.tokenizer_file(s) for s in stages if layout.tokenizer_file(s).is_file()), None)
    if tokenizer is None:
        return None, {}
    config = tokenizer.with_name(TOKENIZER_CONFIG)
    for path in (tokenizer, config):  # as the training stage wrote them
        check_recorded_file(path, f"nxm-deploy train {run_dir} --stage {path.parent.name}")
    return tokenizer, _json_object(config, "Tokenizer config") if config.is_file() else {}


def _json_object(path: Path, what: str) -> dict:
    try:
        data = read_json(path)
    except ValueError as exc:
        raise RunDirError(f"{what} {path} is not valid JSON ({exc}).", hint="Re-run the stage that writes it.") from exc
    if not isinstance(data, dict):
        raise RunDirError(f"{what} {path} must hold a JSON object, got {type(data).__name__}.")
    return data


# --------------------------------------------------------------------------------------------- exported models

#: the run's ONNX model names (validation's runner names, the client's ``model=``) and their export manifest keys
DENSE_MODEL, SPARSE_MODEL, CPU_INT8_MODEL = "dense_fp32", "sparse_int8", "cpu_int8"
#: files the CPU INT8 model may have when the export manifest does not name it (runs exported before it did)
CPU_INT8_CANDIDATES = (CPU_INT8_ONNX, CPU_INT8_ONNX_LEGACY)


def read_export_manifest(run_dir: str | Path) -> dict:
    """``onnx/manifest.json`` of a run.

    Raises:
        RunDirError: the export stage has not run (no manifest).
    """
    layout = RunLayout(run_dir)
    if not layout.onnx_manifest.is_file():
        raise RunDirError(f"No exported models in {layout.onnx_dir} (no {layout.onnx_manifest.name}).",
                          hint=f"Run `nxm-deploy export {run_dir}` first.")
    return read_json(layout.onnx_manifest)


def export_models(run_dir: str | Path, manifest: dict | None = None) -> dict[str, dict]:
    """name -> ``{"path", "precision", "sparse"[, "peer"]}`` of the run's ONNX models: ``dense_fp32``,
    ``sparse_int8``, ``cpu_int8`` when present, and ONNX Runtime's peers (:mod:`nxm_deploy.export.ort_peer`, key
    ``ort_peers``, ``peer: True``), each file checked against the sha256 the export stage recorded.

    Raises:
        RunDirError: no export manifest; a model it names is missing or differs from its recorded sha256.
    """
    layout = RunLayout(run_dir)
    manifest = read_export_manifest(run_dir) if manifest is None else manifest
    onnx_dir = layout.onnx_dir
    models = {
        DENSE_MODEL: {"path": onnx_dir / (manifest.get("dense") or {}).get("file", DENSE_ONNX), "precision": "fp32",
                      "sparse": False},
        SPARSE_MODEL: {"path": onnx_dir / (manifest.get(SPARSE_MODEL) or {}).get("file", SPARSE_ONNX),
                       "precision": "int8", "sparse": True},
    }
    cpu_file = (manifest.get(CPU_INT8_MODEL) or {}).get("file")
    candidates = (cpu_file,) if cpu_file else CPU_INT8_CANDIDATES
    found = next((onnx_dir / c for c in candidates if cpu_file or (onnx_dir / c).is_file()), None)
    if found is not None:
        models[CPU_INT8_MODEL] = {"path": found, "precision": "int8", "sparse": True}
    for name, record in (manifest.get("ort_peers") or {}).items():
        if "file" in record:  # ONNX Runtime's own CPU path for the dense model
            models[name] = {"path": onnx_dir / record["file"], "precision": "int8" if "quantize_dynamic" in record
                            else "fp32", "sparse": False, "peer": True}
    for name, info in models.items():
        if not info["path"].is_file():
            raise RunDirError(f"ONNX model {name} ({info['path']}) named by {layout.onnx_manifest} is missing.",
                              hint=f"Re-run `nxm-deploy export {run_dir}`.")
        check_recorded_file(info["path"], f"nxm-deploy export {run_dir}")  # the bytes the export stage wrote
    return models


def read_verified(path: str | Path, expected_sha256: str | None) -> bytes:
    """The bytes of an artifact (an ONNX model, an engine plan), checked against ``expected_sha256`` (None: not
    checked), so the bytes that were checked are the bytes that get loaded.

    Raises:
        RunDirError: the file is missing, or its hash differs (the message names the file and both hashes).
    """
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"Artifact {path} not found.", hint="Re-run `nxm-deploy export RUN_DIR`.")
    data = path.read_bytes()
    if expected_sha256 is not None:
        check_sha256(path, expected_sha256, manifest=path.parent / MANIFEST,
                     regenerate=f"nxm-deploy export {path.parent.parent}", data=data)
    return data


# --------------------------------------------------------------------------------------------- TensorRT engines


def engine_records(run_dir: str | Path) -> list[dict]:
    """The ``engines/status.json`` records of the engines built in a run, each with ``plan_path`` (the plan may be
    missing: :func:`engine_for_onnx` skips such records, :func:`built_engines` refuses them); [] when no engine
    stage ran or the file is unreadable."""
    layout = RunLayout(run_dir)
    if not layout.engine_status.is_file():
        return []
    try:
        records = read_json(layout.engine_status).get("engines", [])
    except (OSError, ValueError, AttributeError):
        return []
    out = []
    for record in records:
        if not isinstance(record, dict) or record.get("status") != "built" or not record.get("engine"):
            continue
        plan = layout.engine(record["engine"])
        out.append({**record, "plan_path": str(plan)})
    return out


def engine_for_onnx(run_dir: str | Path, onnx_sha256: str, prefer_sparse: bool) -> dict | None:
    """The record (:func:`engine_records`) of a built engine made from the ONNX file with ``onnx_sha256`` whose
    plan exists, or None; with several, ``prefer_sparse`` picks one built with ``sparse_weights`` first."""
    built = [r for r in engine_records(run_dir) if r.get("onnx_sha256") == onnx_sha256 and Path(r["plan_path"]).is_file()]
    built.sort(key=lambda r: bool(r.get("sparse_weights")) != prefer_sparse)
    return built[0] if built else None


def built_engines(run_dir: str | Path) -> list[dict]:
    """Manifests of the engines ``engines/status.json`` records as built, each with ``plan_path``, checked: the
    plan and its manifest exist and the plan has the sha256 its manifest records.

    Raises:
        ValidationError: a recorded engine's plan or manifest is missing, or the plan's hash differs.
    """
    layout = RunLayout(run_dir)
    out = []
    for record in engine_records(run_dir):
        plan = Path(record["plan_path"])
        manifest_path = layout.engine(record.get("manifest") or plan.with_suffix(".json").name)
        if not plan.is_file() or not manifest_path.is_file():
            raise ValidationError(f"Engine {record.get('name')}: {plan if not plan.is_file() else manifest_path} is "
                                  "missing.", hint="Rebuild with `nxm-deploy build-engine RUN_DIR`.")
        manifest = read_json(manifest_path)
        if manifest.get("engine_sha256") and manifest["engine_sha256"] != sha256_file(plan):
            raise ValidationError(f"Engine {record.get('name')}: {plan.name} does not match the sha256 in its manifest.",
                                  hint="The plan was replaced or corrupted; rebuild with `nxm-deploy build-engine RUN_DIR`.")
        out.append({**manifest, "plan_path": str(plan)})
    return out
