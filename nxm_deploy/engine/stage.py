"""Engine builds from specs: inputs, FP16 graph, build, post-build check, manifest, idempotence, exit codes.

Two entry points:

* :func:`engine_stage` - the pipeline's stage. Where TensorRT or a GPU is missing each spec is recorded as
  ``skipped: <reason>`` and the run goes on; the CPU-side work (profile, FP16 graph + its ONNX Runtime
  parity check) is still done, so ``onnx/dense_fp16.onnx`` exists after any run.
* :func:`build_engines` - ``nxm-deploy build-engine`` and ``tools/build_engines.sh``: a CI build. It returns a
  :class:`BuildReport`; the CLI prints it and exits with the code of the first failure
  (:data:`nxm_deploy.errors.EXIT_CODES`): 0 every engine built or up to date; 2 bad spec or input (spec file, run
  directory, ONNX file, profile); 3 this machine lacks TensorRT or a GPU (one line says what is missing and how
  to install ``nxm-deploy[trt]``); 4 a build failed (parser/builder errors listed); 5 a post-build check failed
  (a layer at another precision than requested, or a ``require_sparse`` layer that does not run sparse).

Engines are written to ``<run_dir>/engines/<name>__trt<ver>__sm<cc>__{sparse|dense}.plan`` with a manifest
``.json`` (TensorRT version, GPU, driver/CUDA, ONNX and spec sha256, flags, profile, build seconds, engine
sha256, the check) and the inspector's layer JSON ``.layers.json``. A build is skipped as "up to date" when
the manifest's build key (spec, ONNX, FP16 graph, TensorRT version, SM, profile) matches and the plan still has
its recorded hash: the run's one rule, :func:`nxm_deploy.stages.recorded_up_to_date`, applied to each engine
(:func:`up_to_date`). Files are written to a temporary name and renamed; one lock file per engine and one for
``status.json`` make concurrent builds of the same run safe (the timing cache is locked by Polygraphy).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path


from nxm_deploy.run.layout import MANIFEST, RunLayout
from nxm_deploy.fileio import (
    atomic_write_bytes, atomic_write_json, atomic_write_text, check_recorded_file, file_lock, read_json, sha256_file,
)
from nxm_deploy.engine.spec import EngineSpec, derive_profile, load_engine_spec, resolve_run_dir
from nxm_deploy.errors import (
    ConfigError, EngineBuildError, EngineCheckError, ExportError, MissingDependencyError, NxmError,
    RunDirError, exit_code,
)

log = logging.getLogger("nxm_deploy.engine")

# --------------------------------------------------------------------------------------------- helpers


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def onnx_path_for(spec: EngineSpec, run_dir: Path) -> Path:
    """The spec's source ONNX: absolute as given, else ``<run_dir>/onnx/<onnx>``."""
    path = Path(spec.onnx)
    return RunLayout(run_dir).onnx(path)


def update_status(run_dir: Path, records: list[dict]) -> dict:
    """Merge ``records`` (by name) into ``<run_dir>/engines/status.json`` under a lock; returns the file's content."""
    path = RunLayout(run_dir).engine_status
    with file_lock(path.with_name(".status.lock")):
        old = []
        if path.is_file():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                old = list(read_json(path).get("engines", []))
        names = {r["name"] for r in records}
        merged = [r for r in old if isinstance(r, dict) and r.get("name") not in names and r.get("name") != "-"]
        merged += records
        if not merged:
            merged = [{"name": "-", "status": "skipped: the recipe names no engine spec"}]
        status = {"engines": merged}
        atomic_write_json(path, status)
    return status


# --------------------------------------------------------------------------------------------- inputs


@dataclass
class EngineInputs:
    """Everything a build needs that can be worked out on a CPU."""

    spec: EngineSpec
    spec_path: Path | None
    run_dir: Path
    source_onnx: Path
    source_sha256: str
    graph_onnx: Path  # what TensorRT parses: the source, or its FP16 conversion
    graph_sha256: str
    input_names: list[str]
    profile: dict
    layer_map: dict | None
    sparse_modules: list[str]
    pattern: str
    fp16: dict | None  # Fp16Conversion.to_dict()
    eligible: list[str] = field(default_factory=list)  # n:m modules eligible for sparse INT8 kernels


def _recipe_limits(run_dir: Path) -> tuple[int | None, int | None]:
    """(recipe ``task.max_seq_length``, model ``max_position_embeddings``) of a run, None where unknown."""
    max_seq = max_pos = None
    if RunLayout(run_dir).recipe.is_file():
        from nxm_deploy.run.reader import open_run_dir  # the schema (no torch), as the pipeline reads it

        with contextlib.suppress(ConfigError):
            max_seq = open_run_dir(run_dir).task.max_seq_length
    from nxm_deploy.models import config_max_positions  # torch-free
    from nxm_deploy.run.reader import read_model_config

    with contextlib.suppress(OSError, RunDirError, AttributeError):
        path, config = read_model_config(run_dir)
        max_pos = config_max_positions(config) if path is not None else None
    return max_seq, max_pos


def _onnx_inputs(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def prepare_inputs(spec: EngineSpec, run_dir: str | Path, spec_path: str | Path | None = None) -> EngineInputs:
    """Resolve the ONNX file, read the export manifest, derive the profile, make the FP16 graph (``fp16``).

    Raises:
        RunDirError: the ONNX file is missing. ConfigError: a bad profile. ExportError: FP16 conversion failed.
    """
    run_dir = Path(run_dir)
    source = onnx_path_for(spec, run_dir)
    if not source.is_file():
        raise RunDirError(f"Engine {spec.name}: ONNX file {source} not found.",
                          hint=f"Run `nxm-deploy export {run_dir}` first, or fix run_dir/onnx in the spec.")
    manifest_path = source.parent / MANIFEST
    manifest = {}
    if manifest_path.is_file():
        try:
            manifest = read_json(manifest_path)
        except (OSError, ValueError) as exc:
            raise RunDirError(f"Export manifest {manifest_path} is unreadable: {exc}") from None
    check_recorded_file(source, f"nxm-deploy export {run_dir}")  # build only from the bytes export wrote
    input_names = list(manifest.get("inputs") or _onnx_inputs(source))
    max_seq, max_pos = _recipe_limits(run_dir)
    profile = derive_profile(spec, input_names, max_seq, max_pos)
    source_sha = sha256_file(source)
    sparse_record = manifest.get("sparse_int8") or {}
    from_sparse_export = sparse_record.get("sha256") == source_sha or sparse_record.get("file") == source.name
    layer_map = manifest.get("layer_map") if from_sparse_export else None
    sparse_modules = list(manifest.get("sparse_modules") or []) if from_sparse_export else []
    eligible = _sparse_int8_eligible(spec, source, layer_map, sparse_modules)
    graph, graph_sha, fp16 = source, source_sha, None
    if spec.converts_to_fp16:
        from nxm_deploy.engine.fp16 import convert_to_fp16

        conversion = convert_to_fp16(source, keep_fp32_ops=spec.keep_fp32_ops)
        fp16 = conversion.to_dict()
        graph = source.with_name(conversion.file)
        graph_sha = conversion.sha256
        if conversion.parity.get("ok") is False:
            raise ExportError(f"Engine {spec.name}: the FP16 graph {graph.name} differs from {source.name} in ONNX "
                              f"Runtime beyond FP16 tolerance: {conversion.parity}")
    return EngineInputs(
        spec=spec, spec_path=Path(spec_path) if spec_path else None, run_dir=run_dir, source_onnx=source,
        source_sha256=source_sha, graph_onnx=graph, graph_sha256=graph_sha, input_names=input_names,
        profile=profile, layer_map=layer_map, sparse_modules=sparse_modules,
        pattern=str(manifest.get("pattern") or "2:4"), fp16=fp16, eligible=eligible,
    )


def _sparse_int8_eligible(spec: EngineSpec, source: Path, layer_map: dict | None, sparse_modules: list[str]) -> list[str]:
    """The n:m modules TensorRT may run on sparse INT8 kernels (``inspect qdq``'s ``sparse-int8`` rule).

    Raises:
        ConfigError: a ``require_sparse`` pattern matches an n:m layer that is not eligible (named, with the
            missing Q/DQ): the build would fail its post-build check after minutes of tactic timing.
    """
    if not (spec.sparse_weights and spec.precision == "int8-qdq" and layer_map):
        return []
    from nxm_deploy.export.qdq_lint import lint_qdq

    gemms = [g for g in lint_qdq(source, layer_map=layer_map, expected=sparse_modules).gemms or [] if g.kind == "n:m"]
    eligible = sorted({g.module for g in gemms if g.eligible})
    blocked = [g for g in gemms if not g.eligible and spec.requires_sparse(g.module)]
    if blocked:
        g = blocked[0]
        raise ConfigError(
            f"Engine {spec.name}: require_sparse names {len(blocked)} n:m layer(s) that cannot run TensorRT's sparse "
            f"INT8 kernels, e.g. {g.module} ({g.node}): no {', no '.join(g.missing)}.",
            hint="Re-run QAT and export with train.qat.quantizers.gemm_outputs: true (INT8-out GEMMs), or drop these "
                 "layers from require_sparse; `nxm-deploy inspect qdq` lists every layer.")
    return eligible


# --------------------------------------------------------------------------------------------- build


def build_key(inputs: EngineInputs, tensorrt_version: str, sm: str) -> str:
    """What decides whether an existing engine is up to date."""
    return _sha256_json({
        "spec_sha256": inputs.spec.sha256(), "onnx_sha256": inputs.source_sha256,
        "graph_onnx_sha256": inputs.graph_sha256, "tensorrt": tensorrt_version, "sm": sm,
        "profile": inputs.profile,
    })


def status_record(manifest: dict, action: str) -> dict:
    """The ``engines/status.json`` record of an engine manifest."""
    check = manifest.get("check") or {}
    record = {
        "name": manifest["name"], "status": manifest["status"], "action": action,
        "engine": manifest["engine"], "manifest": Path(manifest["engine"]).with_suffix(".json").name,
        "precision": manifest["precision"], "sparse_weights": manifest["sparse_weights"],
        "onnx_sha256": manifest["onnx_sha256"], "engine_sha256": manifest["engine_sha256"],
        "tensorrt": manifest["tensorrt"], "sm": manifest["gpu"]["sm"], "gpu": manifest["gpu"]["name"],
        "build_s": manifest["build_s"], "check": check.get("summary"),
    }
    if manifest.get("fp16_conversion"):
        record["fp16_onnx"] = manifest["fp16_conversion"]["file"]
    return record


def _check_built(inputs: EngineInputs, layer_json: str, sparsity_log: list[str]):
    """Post-build check of a fresh engine (:func:`nxm_deploy.engine.inspect.check_engine`)."""
    from nxm_deploy.engine.inspect import check_engine, gemm_nodes, parse_layer_json

    spec = inputs.spec
    gemms = gemm_nodes(inputs.graph_onnx, inputs.layer_map, inputs.pattern)
    try:
        info = parse_layer_json(layer_json)
    except ConfigError as exc:
        raise EngineCheckError(f"Engine {spec.name}: cannot read the engine's layer information: {exc.message}") from exc
    return check_engine(
        info, precision=spec.precision, sparse_weights=spec.sparse_weights, gemms=gemms,
        sparse_modules=inputs.sparse_modules,
        require_sparse=(lambda m: spec.requires_sparse(m, inputs.eligible)) if spec.require_sparse else None,
        fp32_nodes=(inputs.fp16 or {}).get("fp32_nodes"), sparsity_log=sparsity_log, pattern=inputs.pattern,
        fp16_remainder=spec.precision == "int8-qdq" and inputs.fp16 is not None,
    )


def engine_paths(spec: EngineSpec, run_dir: Path, tensorrt_version: str, sm: str) -> tuple[Path, Path, Path]:
    """``(plan, manifest, layers)`` paths of ``spec``'s engine in ``<run_dir>/engines/``."""
    plan = RunLayout(run_dir).engine(spec.engine_filename(tensorrt_version, sm))
    return plan, plan.with_suffix(".json"), plan.with_name(plan.stem + ".layers.json")


def up_to_date(manifest_path: Path, plan: Path, key: str) -> dict | None:
    """The stored manifest when the engine is up to date, else None: :func:`nxm_deploy.stages.recorded_up_to_date`
    (the one rule, also the run's) with the engine manifest as the record, its ``build_key`` against ``key``
    (:func:`build_key`) and the plan file against its ``engine_sha256``. A missing or unreadable manifest, a missing
    or changed plan, is not up to date.

    Raises:
        OSError: the plan file exists but cannot be read.
    """
    from nxm_deploy.stages import recorded_up_to_date

    if not manifest_path.is_file():
        return None
    try:
        manifest = read_json(manifest_path)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    intact = recorded_up_to_date(manifest.get("build_key"), key, {plan: manifest.get("engine_sha256")})
    return manifest if intact else None


def make_manifest(inputs: EngineInputs, *, plan: Path, layers_path: Path, key: str, tensorrt_version: str,
                  gpu: dict, flags: dict, build_s: float, sparsity_log: list[str], check: dict,
                  timing_cache: Path) -> dict:
    """The JSON written next to an engine (``<plan>.json``); ``status`` is ``built`` or ``check failed: ...``."""
    import polygraphy

    from nxm_deploy import __version__

    spec = inputs.spec
    spec_path = inputs.spec_path
    return {
        "name": spec.name,
        "status": "built" if check.get("ok") else f"check failed: {(check.get('errors') or ['?'])[0]}",
        "engine": plan.name, "engine_sha256": sha256_file(plan), "engine_bytes": plan.stat().st_size,
        "layers_file": layers_path.name, "build_key": key,
        "tensorrt": tensorrt_version, "gpu": gpu,
        "onnx": {"file": inputs.source_onnx.name, "path": str(inputs.source_onnx), "sha256": inputs.source_sha256},
        "onnx_sha256": inputs.source_sha256,
        "graph_onnx": {"file": inputs.graph_onnx.name, "sha256": inputs.graph_sha256},
        "fp16_conversion": inputs.fp16,
        "spec": {"path": str(spec_path) if spec_path else None,
                 "file_sha256": sha256_file(spec_path) if spec_path and spec_path.is_file() else None,
                 "content": spec.model_dump(mode="json")},
        "spec_sha256": spec.sha256(), "precision": spec.precision, "sparse_weights": spec.sparse_weights,
        "flags": flags, "profiles": [inputs.profile], "timing_cache": str(timing_cache), "build_s": build_s,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "nxm_deploy": __version__, "polygraphy": polygraphy.__version__,
        "sparsity_log": sparsity_log, "check": check,
    }


def build_prepared(inputs: EngineInputs, env, *, force: bool = False) -> dict:
    """Build (or find up to date) the engine of ``inputs`` with this machine's TensorRT and GPU (``env`` from
    :func:`nxm_deploy.engine.trt.probe_environment`); returns its status record.

    Raises:
        EngineBuildError: the build failed. EngineCheckError: the post-build check failed (the engine and
        its manifest are written, with status ``check failed: ...``; the record is ``exc.record``).
    """
    from nxm_deploy.engine import trt as trt_builder
    spec, run_dir = inputs.spec, inputs.run_dir
    version, gpu = env.tensorrt_version, env.gpu
    plan, manifest_path, layers_path = engine_paths(spec, run_dir, version, gpu.sm)
    key = build_key(inputs, version, gpu.sm)
    with file_lock(plan.with_name(f".{plan.name}.lock")):
        old = None if force else up_to_date(manifest_path, plan, key)
        if old is not None:
            record = status_record(old, "up to date")
            log.info("engine %s: up to date (%s)", spec.name, plan.name)
            if old.get("status") != "built":
                raise EngineCheckError(f"Engine {spec.name} ({plan.name}) is up to date but failed its check: "
                                       f"{old.get('status')}", record=record)
            return record
        if spec.sparse_weights and not gpu.sparse_tensor_cores:
            log.warning("engine %s: SM %s has no sparse tensor cores; SPARSE_WEIGHTS will not pick sparse tactics",
                        spec.name, gpu.sm)
        timing_cache = spec.timing_cache_path(run_dir, version, gpu.sm)
        log.info("engine %s: building %s from %s", spec.name, plan.name, inputs.graph_onnx.name)
        result = trt_builder.build_serialized_engine(
            inputs.graph_onnx, profile=inputs.profile, sparse_weights=spec.sparse_weights,
            workspace_bytes=spec.workspace_bytes, builder_optimization_level=spec.builder_optimization_level,
            timing_cache=timing_cache, tf32=spec.tf32,
        )
        atomic_write_text(layers_path, result.layer_json)
        check = _check_built(inputs, result.layer_json, result.sparsity_log)
        atomic_write_bytes(plan, result.engine)
        manifest = make_manifest(
            inputs, plan=plan, layers_path=layers_path, key=key, tensorrt_version=version,
            gpu=env.to_dict()["gpu"], flags=result.flags, build_s=result.build_s,
            sparsity_log=result.sparsity_log, check=check.to_dict(), timing_cache=timing_cache,
        )
        atomic_write_json(manifest_path, manifest)  # last: the manifest marks a complete engine
    record = status_record(manifest, "built")
    if not check.ok:
        raise EngineCheckError(f"Engine {spec.name} ({plan.name}) failed its post-build check: "
                               + "; ".join(check.errors[:5]), check=check, record=record)
    for warning in check.warnings:
        log.warning("engine %s: %s", spec.name, warning)
    return record


def build_engine(spec: EngineSpec, run_dir: str | Path, *, spec_path: str | Path | None = None, env=None,
                 force: bool = False) -> dict:
    """Prepare and build one engine; where TensorRT or a GPU is missing return ``status: skipped: <reason>``
    (after the CPU-side preparation, e.g. the FP16 graph).

    Raises:
        RunDirError / ConfigError: bad input. ExportError: FP16 conversion failed.
        EngineBuildError: the build failed. EngineCheckError: the post-build check failed.
    """
    from nxm_deploy.engine.trt import probe_environment

    inputs = prepare_inputs(spec, run_dir, spec_path)
    env = env if env is not None else probe_environment()
    if env.reason is not None:
        log.warning("engine %s skipped: %s", spec.name, env.reason)
        record = {"name": spec.name, "status": f"skipped: {env.reason}", "precision": spec.precision,
                  "sparse_weights": spec.sparse_weights, "onnx_sha256": inputs.source_sha256}
        if inputs.fp16:
            record["fp16_onnx"] = inputs.fp16["file"]
            record["fp16_parity"] = inputs.fp16["parity"]
        return record
    return build_prepared(inputs, env, force=force)


def engine_stage(run_dir: str | Path, spec_paths: list[str | Path]) -> dict:
    """Pipeline stage: build (or skip, with the reason) every engine spec; merges ``engines/status.json``.

    A failed build or check is recorded (``failed: ...`` / ``check failed: ...``) and the run goes on.
    """
    from nxm_deploy.engine.trt import probe_environment

    run_dir = Path(run_dir)
    env = probe_environment()
    records = []
    for path in spec_paths:
        spec = load_engine_spec(path)
        try:
            records.append(build_engine(spec, run_dir, spec_path=path, env=env))
        except EngineCheckError as exc:
            log.error("engine %s: %s", spec.name, exc.message)
            records.append(exc.record or {"name": spec.name, "status": f"check failed: {exc.message}"})
        except (EngineBuildError, ExportError) as exc:
            log.error("engine %s: %s", spec.name, exc.message)
            records.append({"name": spec.name, "status": f"failed: {exc.message}"})
    return update_status(run_dir, records)


def run_engines(ctx) -> dict:
    """Stage ``engines`` of the chain (:data:`nxm_deploy.stages.STAGES`): :func:`engine_stage` on the run's specs."""
    return engine_stage(ctx.run_dir, ctx.engine_specs)


# --------------------------------------------------------------------------------------------- command


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _table(rows: list[tuple]) -> str:
    header = ("engine", "precision", "kind", "result", "file", "build_s", "check")
    rows = [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


@dataclass
class BuildReport:
    """What :func:`build_engines` did: one table row per spec, notes (post-build checks), and the specs that failed
    with their error (the CLI turns the first of them into the exit code, :data:`nxm_deploy.errors.EXIT_CODES`)."""

    rows: list[tuple] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[tuple[str, NxmError]] = field(default_factory=list)

    def table(self) -> str:
        return _table(self.rows)

    def exit_code(self) -> int:
        """0 when every spec built or was up to date, else the lowest exit code of the failures (2 bad input, 3 no
        TensorRT/GPU, 4 build failed, 5 post-build check failed)."""
        return min((exit_code(exc) for _, exc in self.failures), default=0)


def build_engines(spec_paths: list[str | Path], run_dir: str | Path | None = None, *, force: bool = False,
                  show_layers: bool = False) -> BuildReport:
    """Build every spec (a CI build: ``nxm-deploy build-engine``, ``tools/build_engines.sh``).

    Specs are validated first, then the machine; then each spec is prepared and built in turn, all of them even
    after a failure, and ``engines/status.json`` of each run records the results.

    Raises:
        ConfigError: no spec, a bad spec, engine names that repeat. MissingDependencyError: no TensorRT or GPU here
            (nothing is built).
    """
    from nxm_deploy.engine.trt import probe_environment

    if not spec_paths:
        raise ConfigError("No engine spec given.", hint="e.g. --spec engines/minilm_mrpc_sparse_int8.yaml")
    specs = [(load_engine_spec(path), Path(path)) for path in spec_paths]
    names = [s.name for s, _ in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"Engine names repeat across the specs: {sorted(n for n in set(names) if names.count(n) > 1)}.",
                          hint="Give every spec its own name.")
    env = probe_environment()
    if env.reason is not None:
        raise MissingDependencyError(env.reason)

    report, per_run = BuildReport(), {}
    for spec, path in specs:
        error, record, check, target = None, None, None, None
        try:
            target = resolve_run_dir(spec, path, run_dir)
            if not target.is_dir():
                raise RunDirError(f"Engine {spec.name}: run directory {target} not found.",
                                  hint="Run the pipeline first, or pass the run directory.")
            inputs = prepare_inputs(spec, target, path)
            record = build_prepared(inputs, env, force=force)
        except EngineCheckError as exc:
            error, record, check = exc, exc.record, exc.check
        except ExportError as exc:  # the FP16 graph of the build
            error = EngineBuildError(f"Engine {spec.name}: {exc.message}", hint=exc.hint)
        except NxmError as exc:
            error = exc
        if error is not None:
            report.failures.append((spec.name, error))
        if record is None:
            code = exit_code(error)
            label = {2: "BAD INPUT", 3: "NO TENSORRT"}.get(code, "FAILED")
            report.rows.append((spec.name, spec.precision, spec.kind, label, "-", "-", "-"))
            if label == "FAILED" and target is not None:
                per_run.setdefault(target, []).append({"name": spec.name,
                                                       "status": f"failed: {_one_line(error.message)}"})
            continue
        per_run.setdefault(target, []).append(record)
        result = record["action"] if error is None else "CHECK FAILED"
        report.rows.append((spec.name, spec.precision, spec.kind, result, record["engine"], record["build_s"],
                            record.get("check") or "-"))
        if check is not None:
            report.notes.append(f"{spec.name}: {check.summary()}\n{check.table()}\n" + "\n".join(
                [f"  error: {e}" for e in check.errors] + [f"  warning: {w}" for w in check.warnings]))
        else:
            manifest_path = RunLayout(target).engine(record["manifest"])
            stored = read_json(manifest_path).get("check") or {} if manifest_path.is_file() else {}
            if stored and (show_layers or stored.get("errors") or stored.get("warnings")):
                report.notes.append(f"{spec.name}: {stored.get('summary')}\n" + "\n".join(
                    [f"  error: {e}" for e in stored.get("errors", [])] + [f"  warning: {w}" for w in stored.get("warnings", [])]))
    for target_dir, records in per_run.items():
        update_status(target_dir, records)
    return report
