"""Read what a run directory deploys: task, labels, sequence limit, ONNX files and hashes, TensorRT engines.

Sources (all written by the pipeline): ``recipe.yaml`` (``task.name``, ``task.max_seq_length``),
``onnx/manifest.json`` (``inputs``, ``dense`` / ``sparse_int8`` file records with ``sha256``),
``dense/config.json`` (``id2label``, ``max_position_embeddings``), ``{qat,dense}/tokenizer.json`` +
``tokenizer_config.json`` and ``engines/status.json`` (built TensorRT engines).

The run is read through :mod:`nxm_deploy.run.reader` (the recipe, the export manifest, the built engines); neither
torch nor transformers is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from nxm_deploy.run.layout import TOKENIZER, RunLayout
from nxm_deploy.run.reader import engine_for_onnx, read_export_manifest, read_model_config, tokenizer_files
from nxm_deploy.errors import ConfigError, RunDirError

#: model name -> (manifest key, training stages whose directory holds the tokenizer, in order of preference)
MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sparse_int8": ("sparse_int8", ("qat", "dense")),
    "dense": ("dense", ("dense", "qat")),
}
#: ``model_max_length`` values at or above this are the "no limit" sentinel of transformers.
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class RunArtifacts:
    """Everything the client needs from one run directory, for one model.

    Attributes:
        run_dir: the run directory.
        model: ``"sparse_int8"`` or ``"dense"``.
        task: task name from the recipe (``None`` when the recipe names none).
        labels: class names in class-id order; ``None`` for a regression task.
        max_length: longest token sequence (special tokens included) the model accepts: the recipe's
            ``task.max_seq_length`` capped by ``max_position_embeddings`` / ``model_max_length``.
        input_names: model inputs in feed order, e.g. ``("input_ids", "attention_mask", "token_type_ids")``.
        onnx_path: the ONNX file of ``model``.
        onnx_sha256: its sha256 recorded by the export stage.
        tokenizer_json: the ``tokenizer.json`` to load with the ``tokenizers`` library.
        tokenizer_config: ``tokenizer_config.json`` next to it (``{}`` when absent).
        engine_path: a built TensorRT plan made from ``onnx_path`` (same ONNX hash), or ``None``.
        engine_record: the ``engines/status.json`` record of that plan, or ``None``.
        text_columns: your own data's number of text columns (1 or 2), ``None`` for a GLUE preset.
    """

    run_dir: Path
    model: str
    task: str | None
    labels: tuple[str, ...] | None
    max_length: int
    input_names: tuple[str, ...]
    onnx_path: Path
    onnx_sha256: str
    tokenizer_json: Path
    tokenizer_config: dict = field(default_factory=dict)
    engine_path: Path | None = None
    engine_record: dict | None = None
    text_columns: int | None = None

    @property
    def is_regression(self) -> bool:
        """True when the model outputs one score (``labels is None``)."""
        return self.labels is None

    @property
    def is_pair_task(self) -> bool | None:
        """True/False for a registered GLUE task or your own data (``task.text_columns``): pairs / single texts;
        ``None`` when unknown."""
        if self.text_columns is not None:
            return self.text_columns == 2
        if self.task is None:
            return None
        spec = _task_spec(self.task)
        return None if spec is None else spec.is_pair


def _task_spec(name):
    """The registered GLUE task spec called ``name``, or None (unknown or no name)."""
    from nxm_deploy.data.tasks import get_task

    if not isinstance(name, str):
        return None
    try:
        return get_task(name)
    except ConfigError:
        return None


def _read_recipe(run_dir: Path) -> dict:
    """The run's recipe as a dict (:func:`nxm_deploy.run.reader.open_run_dir`, the torch-free schema).

    Raises:
        RunDirError: not a run directory, or its recipe is not valid.
    """
    from nxm_deploy.run.reader import open_run_dir

    try:
        return open_run_dir(run_dir).to_dict()
    except RunDirError:
        raise
    except ConfigError as exc:
        raise RunDirError(f"{RunLayout(run_dir).recipe} is not a valid recipe: {exc.message}", hint=exc.hint) from exc


def _labels(task_name: str | None, run_dir: Path, config: dict) -> tuple[str, ...] | None:
    spec = _task_spec(task_name)
    if spec is not None:
        return spec.label_list
    id2label = config.get("id2label")
    if config.get("problem_type") == "regression" or config.get("num_labels") == 1 or (id2label and len(id2label) == 1):
        return None
    if id2label:
        return tuple(str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k)))
    raise RunDirError(
        f"Cannot tell the labels of {run_dir}: task {task_name!r} is not a known task and dense/config.json has no id2label.",
        hint="Use a run directory written by nxm-deploy.",
    )


def load_artifacts(run_dir: str | Path, model: str = "sparse_int8") -> RunArtifacts:
    """Read the run manifest of ``run_dir`` for ``model`` (the model file's hash is checked when it is loaded:
    :func:`nxm_deploy.run.reader.read_verified`).

    Args:
        run_dir: a run directory written by ``nxm-deploy run`` (at least through the export stage).
        model: ``"sparse_int8"`` (the deployed 2:4 INT8 model) or ``"dense"`` (the FP32 baseline).

    Raises:
        ConfigError: unknown ``model``; the run is a causal language model (nothing to classify).
        RunDirError: not a run directory, the export stage has not run, or an artifact is missing.
    """
    if model not in MODELS:
        raise ConfigError(f"model={model!r} is not one of {sorted(MODELS)}.", hint="Use model='sparse_int8' or 'dense'.")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"Run directory {run_dir} does not exist.", hint="e.g. runs/minilm_mrpc_2of4_int8")
    recipe = _read_recipe(run_dir)
    task_cfg = recipe.get("task") or {}
    task_name = task_cfg.get("name")
    max_seq = task_cfg.get("max_seq_length")
    layout = RunLayout(run_dir)
    manifest_path = layout.onnx_manifest
    manifest = read_export_manifest(run_dir)
    key, tokenizer_dirs = MODELS[model]
    record = manifest.get(key)
    if not isinstance(record, dict) or "file" not in record or "sha256" not in record:
        raise RunDirError(f"{manifest_path} has no '{key}' file record (file, sha256).", hint=f"Re-run `nxm-deploy export {run_dir}`.")
    inputs = manifest.get("inputs")
    if not isinstance(inputs, list) or "input_ids" not in inputs:
        raise RunDirError(f"{manifest_path}: 'inputs' must list the model inputs, got {inputs!r}.")
    onnx_path = layout.onnx(str(record["file"]))
    if not onnx_path.is_file():
        raise RunDirError(f"ONNX model {onnx_path} named in {manifest_path} not found.", hint=f"Re-run `nxm-deploy export {run_dir}`.")

    tokenizer_json, tokenizer_config = tokenizer_files(run_dir, tokenizer_dirs)
    if tokenizer_json is None:
        raise RunDirError(
            f"No {TOKENIZER} in {' or '.join(str(layout.stage_dir(d)) for d in tokenizer_dirs)}.",
            hint="The client needs a fast-tokenizer file (saved by the training stages with transformers).",
        )
    _, config = read_model_config(run_dir, ("dense", "qat"))
    from nxm_deploy.models import config_max_positions, is_causal_lm_config  # torch-free

    if is_causal_lm_config(config):
        raise ConfigError(
            f"{run_dir} holds a causal language model (task {task_name}); the client classifies or scores text "
            "with a sequence-classification model.",
            hint="Run the exported ONNX (input_ids, attention_mask -> logits [B, L, vocab]) with ONNX Runtime or "
                 "TensorRT directly; generation needs a KV cache, which nxm-deploy does not export yet.")

    limits = [v for v in (max_seq, config_max_positions(config), tokenizer_config.get("model_max_length"))
              if isinstance(v, int) and not isinstance(v, bool) and 0 < v < _NO_LIMIT]
    if not limits:
        raise RunDirError(f"{layout.recipe} has no task.max_seq_length and the model records no limit.")
    engine = engine_for_onnx(run_dir, str(record["sha256"]), prefer_sparse=model == "sparse_int8")
    return RunArtifacts(
        run_dir=run_dir, model=model, task=None if task_name is None else str(task_name),
        labels=_labels(task_name, run_dir, config), max_length=min(limits), input_names=tuple(inputs),
        onnx_path=onnx_path, onnx_sha256=str(record["sha256"]), tokenizer_json=tokenizer_json,
        tokenizer_config=tokenizer_config, engine_path=None if engine is None else Path(engine["plan_path"]),
        engine_record=engine,
        text_columns=len(task_cfg["text_columns"]) if task_cfg.get("text_columns") else None,
    )
