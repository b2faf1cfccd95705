"""The run directory: every path of a run, in one place.

::

    runs/<name>/
      recipe.yaml          the recipe this directory was last run with (schema-normalised)
      run.json             name, recipe sha256, GLUE dir and engine spec paths of the run
      stages.json          the executor's ledger: per stage its up-to-date key and manifest sha256
      timings.json         seconds per stage of the last `nxm-deploy run`
      checkpoints/<stage>/<phase>/   Trainer checkpoints of an unfinished training stage (removed when it ends)
      dense/   sparse/   qat/        training stages: model, tokenizer, manifest.json (qat/: quant.json)
      onnx/                export: dense_fp32.onnx, sparse_int8_qdq.onnx, sparse_int8_cpu.onnx, manifest.json
      engines/             TensorRT plans, their manifests, status.json
      validation.json  diff/          validation result and Polygraphy inputs/outputs
      report.md  report.json  plots/  the report
    runs/.<name>.lock      held by the process that runs stages in runs/<name> (pid, host, start, command)

No other module spells these names, nor the file names inside the folders (:data:`FILE_NAMES`): they ask
:class:`RunLayout` or take the constants from here (a test scans the package and ``tools/`` for the literals).
This module imports neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: training stage name -> its directory
TRAINING_DIRS = {"dense": "dense", "admm": "sparse", "qat": "qat"}

# -- the files inside the run's folders (stage folders included)
MANIFEST = "manifest.json"
#: sparse/: the n:m masks (bool, True = keep, by tensor fqn)
MASKS = "masks.safetensors"
#: qat/: the quantizer description and the QAT model's state dict (weights and scales)
QUANT_INFO = "quant.json"
QAT_WEIGHTS = "model.safetensors"
#: a training stage's Hugging Face model config and fast-tokenizer file (save_pretrained layout)
MODEL_CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
#: onnx/: the exported models
DENSE_ONNX = "dense_fp32.onnx"
SPARSE_ONNX = "sparse_int8_qdq.onnx"
CPU_INT8_ONNX = "sparse_int8_cpu.onnx"
#: the CPU INT8 model's name in runs exported before it was renamed (validation still finds it)
CPU_INT8_ONNX_LEGACY = "model.cpu_int8.onnx"
DENSE_FP32_OPT_ONNX = "dense_fp32_opt.onnx"
DENSE_INT8_DYNAMIC_ONNX = "dense_int8_dynamic.onnx"
SPARSITY_REPORT = "sparsity_report.json"
#: engines/: what the engines stage built or skipped
ENGINE_STATUS = "status.json"
#: every file name of a run's folders (what the path-literal test looks for outside this module)
FILE_NAMES = (MANIFEST, MASKS, QUANT_INFO, QAT_WEIGHTS, MODEL_CONFIG, TOKENIZER, TOKENIZER_CONFIG, DENSE_ONNX, SPARSE_ONNX, CPU_INT8_ONNX,
              CPU_INT8_ONNX_LEGACY, DENSE_FP32_OPT_ONNX, DENSE_INT8_DYNAMIC_ONNX, SPARSITY_REPORT, ENGINE_STATUS)
#: every top-level entry of a run directory (what the path-literal test looks for)
ENTRIES = ("recipe.yaml", "run.json", "stages.json", "timings.json", "checkpoints", "dense", "sparse", "qat", "onnx",
           "engines", "validation.json", "diff", "report.md", "report.json", "plots")
#: default TensorRT timing cache of an engine spec, relative to the run directory (``{trt}``, ``{sm}`` filled in at
#: build time: a cache fits only the TensorRT version and GPU that wrote it)
TIMING_CACHE = "engines/timing__trt{trt}__sm{sm}.cache"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory.

    Args:
        root (Path): the run directory, e.g. ``runs/tiny_smoke``.
    """

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    # -- run files
    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def run_info(self) -> Path:
        return self.root / "run.json"

    @property
    def ledger(self) -> Path:
        return self.root / "stages.json"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    # -- training
    def stage_dir(self, stage: str) -> Path:
        """The directory of training stage ``dense``, ``admm`` (``sparse/``) or ``qat``."""
        return self.root / TRAINING_DIRS[stage]

    def stage_manifest(self, stage: str) -> Path:
        return self.stage_dir(stage) / MANIFEST

    def masks(self) -> Path:
        """``sparse/masks.safetensors``: the n:m masks of the sparse stage."""
        return self.stage_dir("admm") / MASKS

    def quant_info(self) -> Path:
        """``qat/quant.json``: which modules and tensors are quantized, how they were calibrated."""
        return self.stage_dir("qat") / QUANT_INFO

    def qat_weights(self) -> Path:
        """``qat/model.safetensors``: the QAT model's state dict (weights and quantizer scales)."""
        return self.stage_dir("qat") / QAT_WEIGHTS

    def model_config(self, stage: str) -> Path:
        """A training stage's Hugging Face ``config.json``."""
        return self.stage_dir(stage) / MODEL_CONFIG

    def tokenizer_file(self, stage: str) -> Path:
        """A training stage's fast-tokenizer file, ``tokenizer.json``."""
        return self.stage_dir(stage) / TOKENIZER

    def checkpoints(self, stage: str | None = None, phase: str | None = None) -> Path:
        """``checkpoints/`` (or a stage's, or one phase's, folder inside)."""
        path = self.root / "checkpoints"
        if stage is not None:
            path = path / stage
            if phase is not None:
                path = path / phase
        return path

    # -- export
    @property
    def onnx_dir(self) -> Path:
        return self.root / "onnx"

    @property
    def onnx_manifest(self) -> Path:
        return self.onnx_dir / MANIFEST

    @property
    def sparsity_report(self) -> Path:
        """``onnx/sparsity_report.json``: the per-layer n:m check of the exported sparse graph."""
        return self.onnx_dir / SPARSITY_REPORT

    def onnx(self, name: str | Path) -> Path:
        """An exported model by file name (an absolute path is returned as is)."""
        path = Path(name)
        return path if path.is_absolute() else self.onnx_dir / path

    # -- engines
    @property
    def engines_dir(self) -> Path:
        return self.root / "engines"

    @property
    def engine_status(self) -> Path:
        return self.engines_dir / ENGINE_STATUS

    def engine(self, name: str | Path) -> Path:
        """A plan or engine manifest in ``engines/`` by file name."""
        return self.engines_dir / str(name)

    # -- validation and report
    @property
    def validation(self) -> Path:
        return self.root / "validation.json"

    @property
    def diff_dir(self) -> Path:
        return self.root / "diff"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    def stage_output(self, stage: str) -> Path:
        """The file that stands for a stage's output (:data:`nxm_deploy.stages.STAGES`): a training stage's or the
        export's ``manifest.json``, ``engines/status.json``, ``validation.json``."""
        if stage in TRAINING_DIRS:
            return self.stage_manifest(stage)
        return {"export": self.onnx_manifest, "engines": self.engine_status, "validate": self.validation}[stage]

    # -- beside the run directory
    @property
    def lock(self) -> Path:
        """The run's lock file, ``.<name>.lock`` beside the run directory (not inside: ``--overwrite`` replaces the
        directory while the lock is held); it names the process that holds it (:func:`nxm_deploy.stages.hold_run_dir`)."""
        resolved = self.root.resolve()
        return resolved.parent / f".{resolved.name}.lock"

    def relative(self, path: str | Path) -> str:
        """``path`` relative to the run directory (as reports show it)."""
        return str(Path(path).relative_to(self.root))
