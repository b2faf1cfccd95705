"""Engine specs: reviewed YAML files under ``engines/`` saying exactly what to build.

A spec names its source (an ONNX file of a run directory, or an absolute ONNX path), the precision, whether
2:4 sparse tactics are allowed, the optimization profile (min/opt/max of batch and sequence length, per input
when needed), the workspace limit, the builder optimization level and the timing cache. ``auto`` in the
sequence-length range means "the run recipe's ``task.max_seq_length``" (:func:`derive_profile`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Iterable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nxm_deploy.errors import ConfigError
from nxm_deploy.run.layout import TIMING_CACHE

Auto = Literal["auto"]

#: ONNX op types kept in FP32 when a spec converts its graph to FP16 (numerically sensitive reductions).
DEFAULT_KEEP_FP32_OPS = ("LayerNormalization", "Softmax")

#: default timing cache, relative to the run directory; ``{trt}`` and ``{sm}`` are filled in at build time
#: (a timing cache only fits the TensorRT version and GPU that wrote it).
DEFAULT_TIMING_CACHE = TIMING_CACHE
#: ``require_sparse`` entry: every n:m layer the graph makes eligible for sparse INT8 kernels.
REQUIRE_ELIGIBLE = "eligible"


class ShapeRange(BaseModel):
    """min/opt/max of one dynamic dimension; ``opt``/``max`` may be ``auto`` (sequence length only)."""

    model_config = ConfigDict(extra="forbid")
    min: int = Field(..., ge=1)
    opt: Union[int, Auto] = Field(...)
    max: Union[int, Auto] = Field(...)

    @model_validator(mode="after")
    def _ordered(self):
        for value in (self.opt, self.max):
            if isinstance(value, int) and value < 1:
                raise ValueError(f"dimensions must be >= 1, got {value}")
        if self.opt == "auto" and self.max != "auto":
            raise ValueError("opt: auto needs max: auto (opt is then the resolved max)")
        values = [v for v in (self.min, self.opt, self.max) if isinstance(v, int)]
        if values != sorted(values):
            raise ValueError(f"need min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self

    @property
    def is_auto(self) -> bool:
        return self.max == "auto"

    def resolve(self, auto_max: int | None, what: str) -> tuple[int, int, int]:
        """``(min, opt, max)`` with ``auto`` replaced by ``auto_max``.

        Raises:
            ConfigError: ``auto`` without a value to resolve it, or a resolved range out of order.
        """
        if not self.is_auto:
            return self.min, int(self.opt), int(self.max)
        if auto_max is None:
            raise ConfigError(
                f"{what}: max is 'auto' but the run has no recipe with task.max_seq_length.",
                hint="Give numbers in the spec, or build from a run directory written by nxm-deploy.",
            )
        opt = auto_max if self.opt == "auto" else int(self.opt)
        if not self.min <= opt <= auto_max:
            raise ConfigError(f"{what}: need min <= opt <= max, got {self.min}, {opt}, {auto_max} (max from the recipe).")
        return self.min, opt, auto_max


class InputProfile(BaseModel):
    """Per-input override of the spec-wide ranges."""

    model_config = ConfigDict(extra="forbid")
    batch_size: ShapeRange | None = None
    sequence_length: ShapeRange | None = None


class EngineSpec(BaseModel):
    """One TensorRT engine.

    Attributes:
        name: engine name; the file is ``<name>__trt<ver>__sm<cc>__{sparse|dense}.plan`` (+ ``.json``).
        description: free text.
        run_dir: run directory to build from when the command names none (relative to the repository root).
        onnx: ONNX file name inside the run's ``onnx/`` directory, or an absolute path.
        precision: ``int8-qdq`` (INT8 from the graph's Q/DQ), ``fp16`` (graph converted to FP16 on the CPU,
            ``keep_fp32_ops`` left in FP32), ``fp32``. Networks are always strongly typed.
        sparse_weights: set TensorRT's ``SPARSE_WEIGHTS`` builder flag (2:4 sparse tactics allowed).
        batch_size, sequence_length: optimization-profile ranges of every input ``[batch, sequence]``;
            ``sequence_length`` opt/max may be ``auto`` (the recipe's ``task.max_seq_length``).
        per_input: overrides of those ranges for single inputs.
        workspace_bytes: workspace memory pool limit in bytes.
        builder_optimization_level: TensorRT builder optimization level 0-5.
        tf32: allow TF32 tensor-core math for the FP32 layers (``BuilderFlag.TF32``; default true).
        timing_cache: timing cache file (loaded and saved), relative to the run directory or absolute;
            ``{trt}`` and ``{sm}`` are replaced by the TensorRT version and the GPU's SM.
        keep_fp32_ops: ONNX op types kept in FP32 by the FP16 graph conversion (``fp16``, and ``int8-qdq`` with
            ``remainder: fp16``).
        remainder: ``int8-qdq`` only: precision of everything outside the Q/DQ pairs. ``fp16`` (default) converts
            the graph first (FP16 scales, opset 19, ops whose FP32 range exceeds FP16's kept FP32; parity with
            the FP32-remainder graph by the INT8 rule); ``fp32`` builds the graph as exported.
        require_sparse: torch module patterns (fnmatch) that must run sparse tactics; a miss fails the
            post-build check (exit 5). Other trained-sparse layers that run dense are reported as warnings.
            The entry ``eligible`` stands for every n:m layer that the graph makes eligible for TensorRT's
            sparse INT8 kernels (``nxm-deploy inspect qdq``); a pattern that names a layer the graph does not
            make eligible is refused before the build.
    """

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    run_dir: str | None = None
    onnx: str = Field(..., min_length=1)
    precision: Literal["int8-qdq", "fp16", "fp32"]
    sparse_weights: bool = False
    batch_size: ShapeRange = ShapeRange(min=1, opt=32, max=64)
    sequence_length: ShapeRange = ShapeRange(min=8, opt="auto", max="auto")
    per_input: dict[str, InputProfile] = Field(default_factory=dict)
    workspace_bytes: int = Field(4 * 1024**3, ge=1 << 20)
    builder_optimization_level: int = Field(3, ge=0, le=5)
    tf32: bool = True
    timing_cache: str = DEFAULT_TIMING_CACHE
    keep_fp32_ops: list[str] = Field(default_factory=lambda: list(DEFAULT_KEEP_FP32_OPS))
    remainder: Literal["fp16", "fp32"] = "fp16"
    require_sparse: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self):
        if self.batch_size.is_auto:
            raise ValueError("batch_size: 'auto' is only allowed for sequence_length")
        for name, override in self.per_input.items():
            if override.batch_size is not None and override.batch_size.is_auto:
                raise ValueError(f"per_input.{name}.batch_size: 'auto' is only allowed for sequence_length")
        if self.require_sparse and not self.sparse_weights:
            raise ValueError("require_sparse needs sparse_weights: true")
        if not self.converts_to_fp16 and self.keep_fp32_ops != list(DEFAULT_KEEP_FP32_OPS):
            raise ValueError("keep_fp32_ops applies to precision: fp16, or int8-qdq with remainder: fp16")
        if self.precision != "int8-qdq" and self.remainder != "fp16":
            raise ValueError("remainder applies to precision: int8-qdq only")
        if "/" in self.onnx and not Path(self.onnx).is_absolute():
            raise ValueError(f"onnx: give a file name inside the run's onnx/ directory or an absolute path, got {self.onnx!r}")
        return self

    @property
    def converts_to_fp16(self) -> bool:
        """The graph is converted to FP16 on the CPU before the build (``fp16``, or INT8 with an FP16 remainder)."""
        return self.precision == "fp16" or (self.precision == "int8-qdq" and self.remainder == "fp16")

    @property
    def kind(self) -> str:
        """``sparse`` or ``dense`` (the last part of the engine file name)."""
        return "sparse" if self.sparse_weights else "dense"

    def sha256(self) -> str:
        """Hash of the validated spec (canonical JSON): comments and key order do not change it."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def requires_sparse(self, module: str | None, eligible: Iterable[str] = ()) -> bool:
        """True when ``module`` matches a ``require_sparse`` pattern, or (entry ``eligible``) is in ``eligible``."""
        if module is None:
            return False
        if REQUIRE_ELIGIBLE in self.require_sparse and module in set(eligible):
            return True
        return any(fnmatch.fnmatchcase(module, p) for p in self.require_sparse if p != REQUIRE_ELIGIBLE)

    def engine_filename(self, tensorrt_version: str, sm: str) -> str:
        """``<name>__trt<ver>__sm<cc>__{sparse|dense}.plan``."""
        return engine_filename(self.name, tensorrt_version, sm, self.sparse_weights)

    def timing_cache_path(self, run_dir: Path, tensorrt_version: str, sm: str) -> Path:
        path = Path(self.timing_cache.format(trt=tensorrt_version, sm=sm))
        return path if path.is_absolute() else Path(run_dir) / path


def engine_filename(name: str, tensorrt_version: str, sm: str, sparse: bool) -> str:
    """Plan file name carrying recipe name, TensorRT version, SM and sparse/dense."""
    for what, value in (("TensorRT version", tensorrt_version), ("SM", sm)):
        if not value or any(c in value for c in "/\\ _") or value.startswith("."):
            raise ConfigError(f"{what} {value!r} cannot go into an engine file name.")
    return f"{name}__trt{tensorrt_version}__sm{sm}__{'sparse' if sparse else 'dense'}.plan"


def derive_profile(spec: EngineSpec, input_names: list[str], max_seq_length: int | None = None,
                   model_max_positions: int | None = None) -> dict[str, dict[str, list[int]]]:
    """The optimization profile of ``spec`` for the model's inputs: ``{input: {min, opt, max: [B, L]}}``.

    Args:
        input_names: the ONNX inputs (the export manifest's ``inputs``), each ``[batch, sequence]``.
        max_seq_length: the recipe's ``task.max_seq_length`` (resolves ``auto``).
        model_max_positions: the model's ``max_position_embeddings``; a longer sequence max is an error.

    Raises:
        ConfigError: ``auto`` without a recipe, an override for an input the model does not have, a range
            out of order or past the model's positions.
    """
    if not input_names:
        raise ConfigError(f"Engine {spec.name}: the model lists no inputs.")
    unknown = sorted(set(spec.per_input) - set(input_names))
    if unknown:
        raise ConfigError(f"Engine spec {spec.name}: per_input names {unknown}, but the model's inputs are {list(input_names)}.")
    profile = {}
    for name in input_names:
        override = spec.per_input.get(name, InputProfile())
        batch = (override.batch_size or spec.batch_size).resolve(None, f"{spec.name}.{name}.batch_size")
        seq = (override.sequence_length or spec.sequence_length).resolve(max_seq_length, f"{spec.name}.{name}.sequence_length")
        if model_max_positions is not None and seq[2] > model_max_positions:
            raise ConfigError(
                f"Engine spec {spec.name}: sequence max {seq[2]} for {name} exceeds the model's "
                f"max_position_embeddings {model_max_positions}.",
            )
        profile[name] = {k: [b, s] for k, b, s in zip(("min", "opt", "max"), batch, seq)}
    return profile


def load_engine_spec(path: str | Path) -> EngineSpec:
    """Load and validate an engine spec.

    Raises:
        ConfigError: missing file, bad YAML, unknown key or bad value.
    """
    from nxm_deploy.config.yamlfile import read_yaml_mapping, validate_mapping

    data = read_yaml_mapping(path, "Engine spec", missing_hint="Specs live in engines/*.yaml.")
    return validate_mapping(EngineSpec, data, f"Engine spec {path}",
                            hint="Every key and its default: nxm_deploy/engine/spec.py; examples in engines/*.yaml.")


def resolve_run_dir(spec: EngineSpec, spec_path: str | Path | None, run_dir: str | Path | None) -> Path:
    """The run directory to build ``spec`` from: ``run_dir`` when given, else the spec's ``run_dir``
    (absolute, else relative to the cwd, else to the project root holding the spec's ``engines/`` folder).

    Raises:
        ConfigError: neither is given.
    """
    if run_dir is not None:
        return Path(run_dir)
    if spec.run_dir is None:
        raise ConfigError(
            f"Engine spec {spec.name} names no run_dir and no run directory was given.",
            hint="Pass the run directory (nxm-deploy build-engine RUN_DIR --spec ...) or set run_dir in the spec.",
        )
    path = Path(spec.run_dir)
    if path.is_absolute():
        return path
    candidates = [Path.cwd() / path]
    if spec_path is not None:
        candidates.append(Path(spec_path).resolve().parent.parent / path)
    return next((c for c in candidates if c.is_dir()), candidates[0])
