"""Engine specs: reviewed YAML files under ``engines/`` saying exactly what to build."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nxm_deploy.errors import ConfigError


class ShapeRange(BaseModel):
    """min/opt/max of one dynamic dimension."""

    model_config = ConfigDict(extra="forbid")
    min: int = Field(..., ge=1)
    opt: int = Field(..., ge=1)
    max: int = Field(..., ge=1)

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"need min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self


class EngineSpec(BaseModel):
    """One TensorRT engine.

    Attributes:
        name: engine name; the file is ``<name>__trt<ver>__sm<cc>__{sparse|dense}.plan``.
        onnx: ONNX file name inside the run's ``onnx/`` directory, or an absolute path.
        precision: ``int8-qdq`` (INT8 from the graph's Q/DQ), ``fp16`` (graph converted to FP16), ``fp32``.
        sparse_weights: set TensorRT's ``SPARSE_WEIGHTS`` builder flag.
        batch_size, sequence_length: optimization-profile ranges applied to every input.
        workspace_bytes: workspace memory pool limit in bytes.
        builder_optimization_level: TensorRT builder optimization level 0-5.
        timing_cache: timing cache file (loaded and saved), relative to the run directory.
    """

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    onnx: str
    precision: Literal["int8-qdq", "fp16", "fp32"]
    sparse_weights: bool = False
    batch_size: ShapeRange = ShapeRange(min=1, opt=32, max=64)
    sequence_length: ShapeRange = ShapeRange(min=8, opt=128, max=128)
    workspace_bytes: int = Field(4 * 1024**3, ge=1 << 20)
    builder_optimization_level: int = Field(3, ge=0, le=5)
    timing_cache: str = "engines/timing.cache"


def load_engine_spec(path: str | Path) -> EngineSpec:
    """Load and validate an engine spec.

    Raises:
        ConfigError: missing file, bad YAML, unknown key or bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Engine spec {path} not found.", hint="Specs live in engines/*.yaml.")
    try:
        return EngineSpec.model_validate(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as exc:
        raise ConfigError(f"Engine spec {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"Engine spec {path}: {errs}") from None
