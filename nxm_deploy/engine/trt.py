"""TensorRT builds through Polygraphy's loaders. The only module that imports ``tensorrt`` (lazily).

Works with TensorRT 10 and 11: networks are strongly typed (INT8 only from Q/DQ; FP16 only from an FP16 graph),
so no ``BuilderFlag.FP16/INT8`` is ever set; ``SPARSE_WEIGHTS`` is probed with ``hasattr``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from nxm_deploy._lazy import require
from nxm_deploy.engine.spec import EngineSpec
from nxm_deploy.errors import EngineBuildError, MissingDependencyError

log = logging.getLogger("nxm_deploy.engine")


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT imports and a CUDA device is visible; else the reason, in one line."""
    try:
        trt = require("tensorrt", "trt")
    except MissingDependencyError as exc:
        return exc.message
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        if builder is None:
            return "TensorRT could not create a builder (no CUDA device or driver)."
    except Exception as exc:  # CUDA init errors surface as RuntimeError/TypeError depending on version
        return f"TensorRT cannot start: {type(exc).__name__}: {exc}"
    return None


def build_engine_bytes(spec: EngineSpec, onnx_path: Path, input_names: list[str], timing_cache: Path) -> tuple[bytes, dict]:
    """Build a serialized engine from ``onnx_path`` per ``spec``.

    Returns:
        (engine bytes, facts): facts hold the TensorRT version, flags and build seconds.

    Raises:
        MissingDependencyError: TensorRT or Polygraphy's TRT backend unusable.
        EngineBuildError: parser or builder failure (all messages listed).
    """
    trt = require("tensorrt", "trt")
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    if spec.sparse_weights and not hasattr(trt.BuilderFlag, "SPARSE_WEIGHTS"):
        raise EngineBuildError(f"TensorRT {trt.__version__} has no BuilderFlag.SPARSE_WEIGHTS.")
    profile = Profile()
    bs, sl = spec.batch_size, spec.sequence_length
    for name in input_names:
        profile.add(name, min=(bs.min, sl.min), opt=(bs.opt, sl.opt), max=(bs.max, sl.max))
    config = CreateConfig(
        sparse_weights=spec.sparse_weights,
        profiles=[profile],
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: spec.workspace_bytes},
        builder_optimization_level=spec.builder_optimization_level,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
    )
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    start = time.perf_counter()
    try:
        engine_bytes = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(timing_cache))()
    except Exception as exc:
        raise EngineBuildError(f"TensorRT build of {spec.name} from {onnx_path} failed: {exc}") from exc
    facts = {
        "tensorrt": trt.__version__,
        "sparse_weights": spec.sparse_weights,
        "precision": spec.precision,
        "build_s": round(time.perf_counter() - start, 3),
    }
    return bytes(engine_bytes), facts
