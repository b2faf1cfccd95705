"""Recipe schema: one YAML file describes a whole run (model, task, sparsity, training, export, engines, validation).

Every section forbids unknown keys (``extra="forbid"``) and every field has a default, after ModelOpt's
``ModeloptBaseConfig``. :func:`load_recipe` turns any problem into one :class:`ConfigError` line.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nxm_deploy.errors import ConfigError
from nxm_deploy.sparsity.pattern import DEFAULT_RHO, NMPattern


def check_num_bits(num_bits) -> None:
    """Only 8-bit symmetric quantization is supported (INT8 Q/DQ with zero point 0, what TensorRT consumes).

    Raises:
        ConfigError: for any other value.
    """
    if num_bits != 8 or isinstance(num_bits, bool):
        raise ConfigError(
            f"num_bits={num_bits!r} is not supported: nxm-deploy quantizes to symmetric INT8 only (num_bits 8), "
            "the type of TensorRT's QuantizeLinear/DequantizeLinear on sparse tensor cores.",
            hint="Set num_bits: 8 (or drop it); INT4/FP8 weight-only schemes are a different export path.",
        )


_RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_run_name(name: str) -> None:
    """A recipe ``name`` names its run directory ``runs/<name>``: it must be one plain directory name, i.e. letters,
    digits, ``_``, ``-`` and ``.`` only (no ``/`` or ``\\``, not empty), and not ``.`` or ``..``.

    Raises:
        ConfigError: for any other name.
    """
    if not _RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"{name!r} is not a plain directory name: the run directory is runs/<name>, so a name holds only "
            "letters, digits, '_', '-' and '.', and is not '.' or '..'.",
            hint="e.g. name: minilm_rte_2of4",
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which checkpoint to start from."""

    source: str = Field("minilm", description="'minilm' (embedded all-MiniLM-L6-v2), a local HF model dir, or a hub id")
    random_init: dict[str, Any] | None = Field(
        None, description="if set, build a randomly initialised model from the source's config with these overrides"
    )


class TaskConfig(_Strict):
    """The task: a GLUE preset by name; your own classification / regression data (``train_file`` + ``eval_file``,
    or a Hugging Face ``dataset``; :mod:`nxm_deploy.data.files`); or ``name: causal_lm`` on your own text
    (:mod:`nxm_deploy.data.lm`)."""

    name: str = "rte"
    glue_dir: str | None = Field(None, description="GLUE TSV root; else --glue-dir, NXM_GLUE_DIR, or HF datasets")
    max_seq_length: int = Field(128, ge=8, le=512, description="truncation length; causal_lm: the block size")
    max_train_examples: int | None = Field(None, ge=1, description="training examples read (causal_lm: documents, "
                                           "lines); see train_subset_seed")
    max_eval_examples: int | None = Field(None, ge=1, description="causal_lm: documents (lines) read")
    # left out of the recipe's dump while unset, so that recipes without it keep their stage keys (stages.json)
    train_subset_seed: int | None = Field(
        None, exclude_if=lambda v: v is None,
        description="with max_train_examples: a uniform random subset of the training examples drawn with this "
        "seed (file order kept); unset: the first max_train_examples")
    train_file: str | None = Field(None, description="your own training data: .csv, .tsv, .jsonl/.json or .parquet "
                                   "(causal_lm also .txt: one document per line)")
    eval_file: str | None = Field(None, description="your own evaluation data (same columns as train_file)")
    dataset: str | None = Field(None, description="a Hugging Face dataset (hub name or local folder) instead of "
                                "train_file/eval_file, e.g. wikitext")
    dataset_config: str | None = Field(None, description="the dataset's config, e.g. wikitext-103-raw-v1")
    train_split: str = Field("train", description="the dataset split to train on")
    eval_split: str = Field("validation", description="the dataset split to evaluate on")
    text_columns: list[str] | None = Field(None, min_length=1, max_length=2,
                                           description="one text column, or two for text pairs (causal_lm: one; "
                                           "default text)")
    label_column: str = "label"
    labels: list[str] | None = Field(None, min_length=2, description="class names in class-id order; "
                                     "default: the sorted distinct labels of train_file")
    metric: Literal["accuracy", "f1", "matthews_corr", "pearson", "spearman", "perplexity"] | None = Field(
        None, description="primary metric of own data (default accuracy; pearson/spearman make it regression; "
        "causal_lm: perplexity)")

    @property
    def own_data(self) -> bool:
        """True when the task reads your own data (files or a Hugging Face dataset), not a GLUE preset."""
        return self.train_file is not None or self.dataset is not None

    @property
    def is_causal_lm(self) -> bool:
        """True for ``name: causal_lm``."""
        from nxm_deploy.data.tasks import CAUSAL_LM

        return self.name == CAUSAL_LM

    @model_validator(mode="before")
    @classmethod
    def _preset_name(cls, data):
        """A GLUE preset's canonical name ("RTE", "sst-2" -> "rte", "sst2")."""
        from nxm_deploy.data.tasks import CAUSAL_LM, get_task

        if (isinstance(data, dict) and data.get("train_file") is None and data.get("dataset") is None
                and isinstance(data.get("name"), str) and data["name"] != CAUSAL_LM):
            data = {**data, "name": get_task(data["name"]).name}  # raises ConfigError listing the known tasks
        return data

    @model_validator(mode="after")
    def _preset_or_files(self):
        from nxm_deploy.data.tasks import TASKS, get_task, normalize_task_name

        own = {k: getattr(self, k) for k in ("train_file", "eval_file", "dataset", "dataset_config", "text_columns",
                                             "labels", "metric") if getattr(self, k) is not None}
        if not self.own_data:
            if own:
                raise ConfigError(f"task.{', task.'.join(own)} describe your own data, but neither task.train_file nor "
                                  "task.dataset is set.",
                                  hint="Give task.train_file and task.eval_file (or task.dataset), or drop those keys "
                                       "for a GLUE task.")
            if self.is_causal_lm:
                raise ConfigError("task.name causal_lm needs your text: task.train_file and task.eval_file (plain "
                                  "text, one document per line) or task.dataset.",
                                  hint="e.g. train_file: data/train.txt, eval_file: data/valid.txt; or dataset: "
                                       "wikitext, dataset_config: wikitext-103-raw-v1")
            get_task(self.name)  # raises ConfigError listing the known tasks
            return self
        if self.train_file is not None and self.dataset is not None:
            raise ConfigError("task.train_file and task.dataset both name the data; give one of them.",
                              hint="Files: train_file + eval_file. A Hugging Face dataset: dataset (+ dataset_config).")
        if self.dataset is None and self.eval_file is None:
            raise ConfigError("Own data needs task.eval_file next to task.train_file.", hint="e.g. eval_file: data/dev.csv")
        if self.dataset is not None and self.eval_file is not None:
            raise ConfigError("task.eval_file is for files; a dataset's evaluation data is task.eval_split.",
                              hint="Drop task.eval_file, or set task.train_file instead of task.dataset.")
        if self.is_causal_lm:
            extra = [k for k in ("labels",) if getattr(self, k) is not None]
            if self.metric not in (None, "perplexity"):
                extra.append("metric")
            if self.text_columns is not None and len(self.text_columns) != 1:
                extra.append("text_columns (one column)")
            if extra:
                raise ConfigError(f"task.{', task.'.join(extra)} do not apply to causal_lm (next-token prediction, "
                                  "metric perplexity, one text column).",
                                  hint="Drop them, or use another task.name for classification.")
            return self
        if self.metric == "perplexity":
            raise ConfigError("task.metric perplexity belongs to causal language modelling.",
                              hint="Set task.name: causal_lm, or use accuracy, f1, matthews_corr, pearson, spearman.")
        if self.text_columns is None:
            raise ConfigError("Own data needs task.text_columns (one column, or two for text pairs).",
                              hint="e.g. text_columns: [question, answer]")
        if normalize_task_name(self.name) in TASKS:
            raise ConfigError(f"task.name {self.name!r} is a GLUE preset; your own data needs its own name.",
                              hint="e.g. task.name: support_tickets")
        if self.metric in ("pearson", "spearman") and self.labels is not None:
            raise ConfigError(f"task.metric {self.metric} is a regression metric, but task.labels lists classes.",
                              hint="Drop task.labels for a regression target, or use a classification metric.")
        return self

    def spec(self):
        """The task's :class:`~nxm_deploy.data.tasks.TaskSpec`: the GLUE preset, the causal-LM task, or one built
        from your data (labels inferred from the train split unless given).

        Raises:
            ConfigError / DataError: see :func:`nxm_deploy.data.files.file_task_spec`.
        """
        if not self.own_data:
            from nxm_deploy.data.tasks import get_task

            return get_task(self.name)
        from nxm_deploy.data.files import file_task_spec

        return file_task_spec(self)


class SparsityConfig(_Strict):
    """n:m pattern and which Linear layers get it (fnmatch globs over module names)."""

    pattern: str = "2:4"
    method: str = Field("admm", description="how the sparse stage finds the mask: a registered method "
                        "(nxm_deploy.sparsity.methods: magnitude, admm, wanda, sparsegpt)")
    calibration_batches: int = Field(8, ge=1, description="wanda, sparsegpt: training batches whose activations "
                                     "score the weights (the first ones of the first epoch)")
    include: list[str] | None = Field(
        None, min_length=1, description="fnmatch globs over Linear module names; default (None): the architecture "
        "registry's Q/K/V/O and MLP projections (nxm_deploy.architectures)")
    exclude: list[str] = Field(default_factory=list)

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value: str) -> str:
        NMPattern.parse(value)  # raises ConfigError with a hint
        return value

    @field_validator("method")
    @classmethod
    def _registered_method(cls, value: str) -> str:
        from nxm_deploy.sparsity.methods import get_method

        get_method(value)  # raises ConfigError listing the methods
        return value


class DenseStageConfig(_Strict):
    """Dense fine-tune: the teacher and the dense baseline."""

    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(5e-5, gt=0)


class ADMMStageConfig(_Strict):
    """The sparse stage: the mask method's training (ADMM) and the masked fine-tune, with distillation from the dense
    model (NxMTransformer + GPUSQ-TLM workflow 1).

    ``sparsity.method`` finds the mask (:mod:`nxm_deploy.sparsity.methods`). ADMM trains ``epochs`` epochs, then the
    masked fine-tune runs ``masked_finetune_epochs``; a one-shot method (magnitude, Wanda, SparseGPT) gets the same
    budget as masked fine-tune, ``epochs + masked_finetune_epochs``. The ADMM-only fields are read by ADMM alone.
    """

    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    rho: float = Field(DEFAULT_RHO, gt=0)
    rho_factor: float = Field(1.0, ge=1.0, description="rho multiplied by this after each Z/U update (U rescaled)")
    rho_max: float | None = Field(None, gt=0)
    update_interval: Literal["epoch"] | int = Field("epoch", description="Z/U update every epoch or every k steps")
    u_init: Literal["zero", "residual"] = "zero"
    penalty_mode: Literal["gradient", "proximal"] = Field(
        "gradient", description="gradient: rho/2||W-Z+U||^2 added to the loss (authors' code); proximal: exact prox "
        "step W <- (W + lr*rho*(Z-U)) / (1 + lr*rho) after each optimizer step (rho on another scale, e.g. 100-1000)")
    masked_finetune_epochs: float = Field(1.0, ge=0, description="masked fine-tune after the hard projection")
    distill: bool = True

    @field_validator("update_interval")
    @classmethod
    def _positive_interval(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("update_interval must be 'epoch' or a step count >= 1")
        return value


class QuantizerGroupsConfig(_Strict):
    """Which tensors get INT8 Q/DQ besides the inputs and weights of the n:m GEMMs (always quantized).

    TensorRT picks its structured-sparse INT8 GEMM kernels for INT8-in/INT8-out GEMMs, and runs attention in INT8
    when both attention matmuls have INT8 inputs (ModelOpt's ``q/k/v_bmm_quantizer`` + ``softmax_quantizer``;
    NVIDIA demoBERT). Both groups default on; ``benchmarks/qat_quantizer_groups.md`` measures what each costs.
    """

    gemm_outputs: bool = Field(True, description="an output quantizer after every n:m GEMM (after its bias) whose "
                               "output is not already an INT8 attention input")
    attention: bool = Field(True, description="INT8 attention matmuls: Q and K into Q·K^T, softmax probabilities "
                            "and V into probs·V (BERT-style self-attention)")


class DistillationConfig(_Strict):
    """Weights of the three KD terms and the softmax temperature."""

    alpha: float = Field(1.0, ge=0, description="weight of the hard (label) loss")
    beta: float = Field(10.0, ge=0, description="weight of the soft (teacher logits) loss")
    gamma: float = Field(1.0, ge=0, description="weight of the feature (hidden-state MSE) loss")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of the soft loss")


class QATStageConfig(_Strict):
    """INT8 QAT with distillation from the sparse FP model (GPUSQ-TLM workflow 2)."""

    epochs: float = Field(1.0, ge=0)
    learning_rate: float = Field(1e-5, gt=0)
    calibration_batches: int = Field(8, ge=1)
    calibration_method: Literal["max", "percentile"] = "percentile"
    percentile: float = Field(99.99, gt=50, le=100)
    learn_amax: bool = True
    distill: bool = True
    teacher: Literal["sparse", "dense"] = Field(
        "sparse", description="KD teacher of QAT: the sparse FP model (GPUSQ-TLM workflow 2) or the dense FP model")
    # left out of the recipe's dump while unset, so that recipes without it keep their stage keys (stages.json)
    distillation: DistillationConfig | None = Field(
        None, exclude_if=lambda v: v is None,
        description="alpha, beta, gamma, temperature of the QAT distillation loss; default: train.distillation")
    num_bits: int = Field(8, description="quantization width; only 8 (symmetric INT8 Q/DQ) is supported")
    quantizers: QuantizerGroupsConfig = Field(default_factory=QuantizerGroupsConfig)

    @field_validator("num_bits")
    @classmethod
    def _int8_only(cls, value: int) -> int:
        check_num_bits(value)
        return value


class TrainConfig(_Strict):
    """Shared training settings and the three stages."""

    @model_validator(mode="before")
    @classmethod
    def _bf16_was_renamed(cls, data):
        """``bf16: true|false`` (recipes before ``precision`` existed) reads as ``precision: bf16|fp32``."""
        if isinstance(data, dict) and "bf16" in data:
            data = dict(data)
            bf16 = data.pop("bf16")
            if "precision" in data:
                raise ValueError("give train.precision only: bf16 is its old spelling")
            if not isinstance(bf16, bool):
                raise ValueError(f"train.bf16 (old spelling of train.precision) must be true or false, got {bf16!r}")
            data["precision"] = "bf16" if bf16 else "fp32"
        return data

    seed: int = 42
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: all cores")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when torch finds a CUDA device")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="mixed precision of training (weights and optimizer stay float32); auto: bf16 on a GPU "
        "that has it, fp32 on CPU and for INT8 QAT")
    select: Literal["last", "best"] = Field(
        "last", description="which epoch of each training phase is kept (dense fine-tune, ADMM with hard-projected "
        "scores, masked fine-tune, QAT): the last, or the best dev value of "
        "the task's primary metric (the NxMTransformer protocol)")
    dataloader_workers: int | None = Field(None, ge=0, description="DataLoader workers; default 2 on GPU, 0 on CPU")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="resumable loop checkpoint every k optimizer steps (always at each epoch end)")
    dense: DenseStageConfig = Field(default_factory=DenseStageConfig)
    admm: ADMMStageConfig = Field(default_factory=ADMMStageConfig)
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)
    qat: QATStageConfig = Field(default_factory=QATStageConfig)


class ExportConfig(_Strict):
    """ONNX export."""

    opset: int = Field(17, ge=13)


class EngineConfig(_Strict):
    """TensorRT engine specs (paths relative to the repository root or absolute)."""

    specs: list[str] = Field(default_factory=list)


class ValidateConfig(_Strict):
    """Validation on the task's dev set and latency grid."""

    latency_shapes: list[tuple[int, int]] = Field(default_factory=lambda: [(1, 128), (32, 128)])
    warmup_runs: int = Field(3, ge=0)
    timed_runs: int = Field(20, ge=1)
    intra_op_threads: int | None = Field(None, ge=1)
    max_accuracy_drop_pt: float | None = Field(None, description="CI gate: max dev primary-metric drop vs dense FP32, points; exit 4")
    min_speedup: float | None = Field(None, gt=0, description="CI gate: best sparse p50 speedup over dense at every grid point; exit 5")
    diff_gate: bool = Field(False, description="exit 1 when a checked Polygraphy output comparison exceeds its tolerance")
    diff_examples: int = Field(32, ge=1)
    diff_batch_size: int = Field(8, ge=1)
    diff_tolerance_factor: float = Field(4.0, gt=0, description="k of the INT8 tolerance rule")
    polygraphy_cli_checks: int = Field(1, ge=0, description="re-run this many of the report's printed `polygraphy run` "
                                       "commands (ONNX Runtime CPU, INT8 first) with the Polygraphy CLI: its verdict "
                                       "must agree with the in-process one; 0: none")
    plots: bool = Field(True, description="draw the report's PNG plots (plots/)")


class Recipe(_Strict):
    """A whole run. ``name`` names the run directory ``runs/<name>``."""

    name: str = Field(..., description="the run's name: a plain directory name (letters, digits, '_', '-', '.'; "
                      "not '.' or '..'), as it names the run directory runs/<name>")
    description: str = ""
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _method_moved(cls, data):
        """``train.admm.method`` (recipes before the mask-method registry) reads as ``sparsity.method``."""
        train = data.get("train") if isinstance(data, dict) else None  # a validated section on assignment
        admm = train.get("admm") if isinstance(train, dict) else None
        if not isinstance(admm, dict) or "method" not in admm:
            return data
        data = copy.deepcopy(data)
        method = data["train"]["admm"].pop("method")
        sparsity = data.get("sparsity")
        if sparsity is None:
            sparsity = data["sparsity"] = {}
        if not isinstance(sparsity, dict):
            return data  # the schema names the bad section
        if "method" in sparsity and sparsity["method"] != method:
            raise ValueError(f"train.admm.method {method!r} and sparsity.method {sparsity['method']!r} disagree: "
                             "give sparsity.method only (train.admm.method is its old spelling)")
        sparsity["method"] = method
        return data

    @field_validator("name")
    @classmethod
    def _plain_directory_name(cls, value: str) -> str:
        check_run_name(value)
        return value

    @property
    def pattern(self) -> NMPattern:
        return NMPattern.parse(self.sparsity.pattern)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

    def unread_keys(self) -> frozenset[str]:
        """Dotted keys (as in :meth:`to_dict`) that no stage reads under this recipe's choices: the method-only keys
        that ``sparsity.method`` does not read (:func:`nxm_deploy.sparsity.methods.unread_keys`: the ADMM fields of
        ``train.admm`` under a one-shot method, the calibration of the data-aware methods under ADMM and magnitude)."""
        from nxm_deploy.sparsity.methods import unread_keys

        return unread_keys(self.sparsity.method)

    def data_digests(self) -> dict[str, str]:
        """sha256 of your own data files (``task.train_file`` / ``task.eval_file``; ``missing`` when absent); {} for
        a GLUE preset, whose data are fixed. Part of :meth:`sha256`: a run of changed data is another run."""
        out = {}
        for key in ("train_file", "eval_file"):
            name = getattr(self.task, key)
            if name is not None:
                path = Path(name).expanduser()
                out[key] = _file_digest(str(path.resolve()), *_stamp(path)) if path.is_file() else "missing"
        return out

    def sha256(self) -> str:
        """Hash of the normalised recipe (key order and YAML formatting do not matter) and of its own data files
        (:meth:`data_digests`)."""
        data = self.to_dict()
        digests = self.data_digests()
        if digests:
            data = {**data, "data_sha256": digests}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    """sha256 of a data file, hashed once per (path, modification time, size): recipes hash often."""
    from nxm_deploy.fileio import sha256_file

    return sha256_file(path)


def recipe_from_dict(data: dict, source: str = "<dict>") -> Recipe:
    """Validate a recipe mapping. Raises :class:`ConfigError` naming every bad key
    (:func:`nxm_deploy.config.yamlfile.validate_mapping`)."""
    from nxm_deploy.config.yamlfile import validate_mapping

    return validate_mapping(Recipe, data, f"Recipe {source}", hint="See recipes/bench_accuracy.yaml for the keys in use; "
                            "every key and its default: nxm_deploy/config/recipe.py.")


_PATTERN_TEXT = re.compile(r"^\s*\d+\s*:\s*\d+\s*$")


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """A copy of the recipe mapping ``data`` with ``KEY=VALUE`` overrides applied (``nxm-deploy run --set``).

    ``KEY`` is a dotted path (``train.seed``, ``train.admm.rho``, ``sparsity.pattern``); ``VALUE`` is read as YAML
    (``1``, ``1e-4``, ``true``, ``[1, 2]``), except that an ``n:m`` text stays text (YAML 1.1 would read ``1:4``
    as the base-60 number 64). The result is validated like a recipe file by :func:`recipe_from_dict`, so an
    unknown key or a bad value fails there, named.

    Raises:
        ConfigError: an override that is not ``KEY=VALUE``, a value that is not YAML, or a key that walks
            through a value that is not a section.
    """
    out = copy.deepcopy(data) if isinstance(data, dict) else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key.",
                              hint="e.g. --set train.seed=1 --set sparsity.pattern=1:4")
        if _PATTERN_TEXT.match(raw):
            value = raw.strip()
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as exc:
                raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})".replace("\n", " ")) from None
        node, parts = out, key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{'.'.join(parts[:i + 1])}' is a value, not a section.")
            node = child
        node[parts[-1]] = value
    return out


#: the recipe key that names another recipe file this one starts from
BASE_KEY = "base"


def merge_recipes(base: dict, recipe: dict) -> dict:
    """``recipe`` laid over ``base``: sections (mappings) merge key by key, any other value (lists too) replaces.

    Returns a new mapping; neither argument is changed."""
    out = copy.deepcopy(base)
    for key, value in recipe.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_recipes(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_recipe_mapping(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The mapping of a recipe file with its ``base:`` chain resolved (``base``: a recipe path relative to the
    file, whose keys this file overrides, :func:`merge_recipes`); not yet validated.

    Raises:
        ConfigError: missing file, YAML syntax error, a ``base`` that is not a file, or a ``base`` cycle.
    """
    from nxm_deploy.config.yamlfile import read_yaml_mapping

    path = Path(path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"Recipe {path}: its base chain is a cycle ({chain}).", hint="Remove one `base:` key.")
    data = read_yaml_mapping(path, "Recipe", missing_hint="Pass a path such as recipes/tiny_smoke.yaml.")
    if BASE_KEY in data:
        base = data.pop(BASE_KEY)
        if not isinstance(base, str) or not base:
            raise ConfigError(f"Recipe {path}: `base` must be a recipe path, got {base!r}.",
                              hint="e.g. base: bench_accuracy.yaml (relative to this file)")
        data = merge_recipes(read_recipe_mapping(path.parent / base, (*_seen, path.resolve())), data)
    return data


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Load and validate a YAML recipe: its ``base`` chain resolved (:func:`read_recipe_mapping`), then
    ``KEY=VALUE`` overrides applied (:func:`apply_overrides`).

    Raises:
        ConfigError: missing file, YAML syntax error, bad base, bad override, unknown key, or bad value (one line
            naming each).
    """
    data = read_recipe_mapping(path)
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(data, overrides)
    source = str(path) + (f" with --set {' '.join(overrides)}" if overrides else "")
    return recipe_from_dict(data, source)
