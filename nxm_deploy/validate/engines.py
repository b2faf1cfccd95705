"""TensorRT engines of a run for validation: found from ``engines/status.json``, checked from their manifests
*before* loading (TensorRT version, GPU, plan hash, profile vs the latency grid).

An engine only runs with the TensorRT version and GPU (SM) it was built with; deserializing a foreign plan
fails late and obscurely, so the manifest is compared with this machine first. Where TensorRT or a GPU is
missing the engines are skipped with the reason (the CPU validation still runs).
"""

from __future__ import annotations

import logging
from pathlib import Path

from nxm_deploy.fileio import read_json, sha256_file
from nxm_deploy.run.layout import RunLayout
from nxm_deploy.errors import ValidationError

log = logging.getLogger("nxm_deploy.validate")


def profile_range(profile: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((min_B, min_L), (max_B, max_L))`` accepted by every input of an engine profile
    (``{input: {"min": [B, L], "opt": [B, L], "max": [B, L]}}``)."""
    if not profile:
        raise ValidationError("Engine profile is empty.")
    mins = [tuple(p["min"]) for p in profile.values()]
    maxs = [tuple(p["max"]) for p in profile.values()]
    return (max(m[0] for m in mins), max(m[1] for m in mins)), (min(m[0] for m in maxs), min(m[1] for m in maxs))


def check_grid_in_profile(grid: list[tuple[int, int]], lo: tuple[int, int], hi: tuple[int, int], engine: str) -> None:
    """Every ``(batch, seq)`` of the latency grid must lie inside ``lo..hi``.

    Raises:
        ValidationError: naming every grid point outside the profile.
    """
    outside = [(int(b), int(s)) for b, s in grid if not (lo[0] <= b <= hi[0] and lo[1] <= s <= hi[1])]
    if outside:
        raise ValidationError(
            f"Latency grid point(s) {outside} (batch, seq) lie outside engine {engine}'s profile "
            f"batch {lo[0]}..{hi[0]}, sequence {lo[1]}..{hi[1]}.",
            hint="Shrink validate.latency_shapes in the recipe, or widen the engine spec's profile and rebuild.",
        )


def check_engine_manifest(manifest: dict, tensorrt_version: str | None, gpu_sm: str | None,
                          gpu_name: str | None = None) -> None:
    """Compare an engine manifest with this machine.

    Raises:
        ValidationError: built with another TensorRT version, or for another GPU architecture (SM).
    """
    name = manifest.get("name", "?")
    built_trt = str(manifest.get("tensorrt") or "?")
    gpu = manifest.get("gpu") or {}
    built_sm = str(gpu.get("sm") or str(gpu.get("compute_capability", "?")).replace(".", ""))
    problems = []
    if tensorrt_version is not None and built_trt != str(tensorrt_version):
        problems.append(f"TensorRT {built_trt} (this machine: {tensorrt_version})")
    if gpu_sm is not None and built_sm != str(gpu_sm):
        problems.append(f"SM {built_sm} {gpu.get('name', '')}".rstrip()
                        + f" (this machine: SM {gpu_sm}{' ' + gpu_name if gpu_name else ''})")
    if problems:
        raise ValidationError(
            f"Engine {name} ({manifest.get('engine')}) was built for {' and '.join(problems)}; TensorRT engines "
            "only run with the TensorRT version and GPU they were built for.",
            hint="Rebuild it here with `nxm-deploy build-engine RUN_DIR`, or validate on the machine it was built for.",
        )


def built_engines(run_dir: str | Path) -> list[dict]:
    """Manifests of the engines ``engines/status.json`` records as built (each with ``plan_path``).

    Raises:
        ValidationError: a recorded engine's plan or manifest is missing, or the plan's hash differs.
    """
    layout = RunLayout(run_dir)
    status = layout.engine_status
    if not status.is_file():
        return []
    out = []
    for record in read_json(status).get("engines", []):
        if record.get("status") != "built" or not record.get("engine"):
            continue
        plan = layout.engine(record["engine"])
        manifest_path = layout.engine(record.get("manifest") or Path(record["engine"]).with_suffix(".json").name)
        if not plan.is_file() or not manifest_path.is_file():
            raise ValidationError(f"Engine {record.get('name')}: {plan if not plan.is_file() else manifest_path} is missing.",
                                  hint="Rebuild with `nxm-deploy build-engine RUN_DIR`.")
        manifest = read_json(manifest_path)
        if manifest.get("engine_sha256") and manifest["engine_sha256"] != sha256_file(plan):
            raise ValidationError(f"Engine {record.get('name')}: {plan.name} does not match the sha256 in its manifest.",
                                  hint="The plan was replaced or corrupted; rebuild with `nxm-deploy build-engine RUN_DIR`.")
        out.append({**manifest, "plan_path": str(plan)})
    return out


def engine_runners(run_dir: str | Path, grid: list[tuple[int, int]], env=None) -> tuple[dict, list[dict]]:
    """``(name -> TensorRTRunner (inactive), skipped)`` for the built engines of a run.

    ``skipped`` lists ``{"name", "reason"}`` for engines not run because TensorRT or a GPU is missing here.

    Raises:
        ValidationError: a built engine's manifest names another TensorRT version / GPU, a latency grid point
            lies outside its profile, or its files are missing / altered.
    """
    from nxm_deploy.validate.runners import TensorRTRunner

    engines = built_engines(run_dir)
    if not engines:
        return {}, []
    if env is None:
        from nxm_deploy.engine.trt import probe_environment

        env = probe_environment()
    if env.reason is not None:
        return {}, [{"name": e.get("name"), "reason": env.reason} for e in engines]
    runners = {}
    for manifest in engines:
        check_engine_manifest(manifest, env.tensorrt_version, env.gpu.sm if env.gpu else None,
                              env.gpu.name if env.gpu else None)
        profiles = manifest.get("profiles") or []
        if profiles:
            lo, hi = profile_range(profiles[0])
            check_grid_in_profile(grid, lo, hi, manifest.get("name", "?"))
        name = f"trt_{manifest.get('name', Path(manifest['plan_path']).stem)}"
        precision = str(manifest.get("precision") or "int8-qdq")
        precision = "int8" if precision.startswith("int8") else precision
        runners[name] = TensorRTRunner(manifest["plan_path"], name, precision=precision,
                                       sparse=precision == "int8" or bool(manifest.get("sparse_weights")))
    return runners, []
