"""Engine stage: build every spec of the recipe, or record ``skipped: <reason>`` where TensorRT cannot run."""

from __future__ import annotations

import logging
from pathlib import Path

from nxm_deploy._io import atomic_write_json, read_json, sha256_file
from nxm_deploy.engine.spec import EngineSpec, load_engine_spec
from nxm_deploy.errors import RunDirError

log = logging.getLogger("nxm_deploy.engine")


def _onnx_for(spec: EngineSpec, run_dir: Path) -> Path:
    path = Path(spec.onnx)
    return path if path.is_absolute() else run_dir / "onnx" / path


def build_engine(spec: EngineSpec, run_dir: str | Path) -> dict:
    """Build one engine into ``<run_dir>/engines/`` with a JSON manifest; or return a skipped record.

    Raises:
        RunDirError: the ONNX file is missing. EngineBuildError: TensorRT is present and the build fails.
    """
    from nxm_deploy.engine import trt as trt_builder

    run_dir = Path(run_dir)
    onnx_path = _onnx_for(spec, run_dir)
    if not onnx_path.is_file():
        raise RunDirError(f"Engine {spec.name}: ONNX file {onnx_path} not found.", hint="Run `nxm-deploy export` first.")
    if spec.precision == "fp16":
        reason = trt_builder.tensorrt_unavailable_reason() or "fp16 graph conversion is not implemented yet (issue 6)"
        return {"name": spec.name, "status": f"skipped: {reason}"}
    reason = trt_builder.tensorrt_unavailable_reason()
    if reason is not None:
        log.warning("engine %s skipped: %s", spec.name, reason)
        return {"name": spec.name, "status": f"skipped: {reason}"}
    manifest = read_json(run_dir / "onnx" / "manifest.json")
    out_dir = run_dir / "engines"
    out_dir.mkdir(parents=True, exist_ok=True)
    engine_bytes, facts = trt_builder.build_engine_bytes(
        spec, onnx_path, manifest["inputs"], run_dir / spec.timing_cache
    )
    kind = "sparse" if spec.sparse_weights else "dense"
    plan = out_dir / f"{spec.name}__trt{facts['tensorrt']}__{kind}.plan"
    tmp = plan.with_name(f".{plan.name}.tmp")
    tmp.write_bytes(engine_bytes)
    tmp.replace(plan)
    record = {"name": spec.name, "status": "built", "engine": plan.name, "onnx_sha256": sha256_file(onnx_path),
              "engine_sha256": sha256_file(plan), **facts}
    atomic_write_json(plan.with_suffix(".json"), record)
    return record


def engine_stage(run_dir: str | Path, spec_paths: list[str | Path]) -> dict:
    """Build (or skip) every engine spec in ``spec_paths``; writes ``engines/status.json``."""
    run_dir = Path(run_dir)
    records = [build_engine(load_engine_spec(path), run_dir) for path in spec_paths]
    if not records:
        records.append({"name": "-", "status": "skipped: the recipe names no engine spec"})
    status = {"engines": records}
    atomic_write_json(run_dir / "engines" / "status.json", status)
    return status
