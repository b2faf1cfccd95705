"""TensorRT: the run's engines (``engines/status.json``), run by :class:`nxm_deploy.engine.trt_runtime.TrtEngineRunner`
with ``cuda-python`` device buffers (``tensorrt``).

An engine only runs with the TensorRT version and GPU (SM) it was built with; deserializing a foreign plan fails late
and obscurely, so its manifest is compared with this machine first (:func:`check_engine_manifest`), and the latency
grid with its profile (:func:`check_grid_in_profile`). Where TensorRT or a GPU is missing the engines are skipped
with the reason (:func:`unavailable_reason`, the one answer to "can TensorRT run here", which validation and the
client both ask).

Thread safety (the client): a runner holds ``contexts`` execution contexts, each with its own CUDA stream and
buffers; a call checks one out.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from nxm_deploy.errors import ValidationError
from nxm_deploy.runtimes.base import LabelledRunner, RuntimeInputs

log = logging.getLogger("nxm_deploy.validate")


def unavailable_reason(env=None) -> str | None:
    """Why TensorRT engines cannot run here, in one line with the fix, or None: ``tensorrt`` imports, a CUDA GPU is
    visible, the CUDA versions fit and ``cuda-python`` (the runtime's device buffers) is installed. ``env``: a
    :func:`~nxm_deploy.engine.trt.probe_environment` result (probed now when None; creates no CUDA context)."""
    from nxm_deploy.engine.trt import INSTALL_HINT, probe_environment

    env = probe_environment() if env is None else env
    problem = env.problem
    if problem is None and not (env.cuda or {}).get("cuda_python"):
        problem = f"cuda-python is not installed. Install: {INSTALL_HINT}."
    return None if problem is None else f"cannot run TensorRT engines here: {problem}"


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


class TensorRTRunner(LabelledRunner, BaseRunner):
    """A TensorRT plan run by :class:`nxm_deploy.engine.trt_runtime.TrtEngineRunner` (whose ``infer`` ends with
    ``cudaStreamSynchronize``: the wall time covers H2D copy, execution and D2H copy).

    Args:
        plan: ``.plan`` file, or the engine's bytes (already hash-checked by the caller: the client).
        name: runner name. precision / sparse / label: labels. source: the file the bytes came from (label only).
        contexts: execution contexts, i.e. how many ``infer`` calls run at once from different threads.

    ``min_shape`` / ``max_shape`` (``(B, L)`` of profile 0) are known after activation; feeding a shape outside
    them raises ConfigError in the inner runner (check the latency grid first: :func:`check_grid_in_profile`).
    """

    def __init__(self, plan: str | Path | bytes, name: str, *, precision: str = "int8", sparse: bool = True,
                 contexts: int = 1, source: str | Path | None = None, label: str | None = None):
        BaseRunner.__init__(self, name=name, prefix="tensorrt-runner")
        self.plan = plan if isinstance(plan, bytes) else Path(plan)
        self.contexts = contexts
        self._inner = None
        self.min_shape: tuple[int, int] | None = None
        self.max_shape: tuple[int, int] | None = None
        self._set_labels("tensorrt", precision, sparse,
                         source if source is not None else None if isinstance(plan, bytes) else self.plan, label)

    def activate_impl(self):
        from nxm_deploy.engine.trt_runtime import TrtEngineRunner

        inner = TrtEngineRunner(self.plan, contexts=self.contexts, name=self.name)
        inner.activate()
        self._inner = inner
        self.min_shape, self.max_shape = inner.min_shape, inner.max_shape

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name in self._inner.input_names:
            meta.add(name, dtype=np.int64, shape=(None, None))
        return meta

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        out = self._inner.infer(feed_dict)  # ends with cudaStreamSynchronize
        self.inference_time = time.perf_counter() - start
        return OrderedDict(logits=out["logits"])

    def deactivate_impl(self):
        inner, self._inner = self._inner, None
        self.min_shape = self.max_shape = None
        if inner is not None:
            inner.deactivate()


# --------------------------------------------------------------------------------------------- roles


def engine_runners(run_dir: str | Path, grid: list[tuple[int, int]], env=None) -> tuple[dict, list[dict]]:
    """``(name -> TensorRTRunner (inactive), skipped)`` for the built engines of a run (``trt_<engine name>``).

    ``skipped`` lists ``{"name", "reason"}`` for engines not run because TensorRT or a GPU is missing here.

    Raises:
        ValidationError: a built engine's manifest names another TensorRT version / GPU, a latency grid point
            lies outside its profile, or its files are missing / altered.
    """
    from nxm_deploy.run.reader import built_engines

    engines = built_engines(run_dir)
    if not engines:
        return {}, []
    if env is None:
        from nxm_deploy.engine.trt import probe_environment

        env = probe_environment()
    reason = unavailable_reason(env)
    if reason is not None:
        return {}, [{"name": e.get("name"), "reason": reason} for e in engines]
    runners = {}
    for manifest in engines:
        check_engine_manifest(manifest, env.tensorrt_version, env.gpu.sm if env.gpu else None,
                              env.gpu.name if env.gpu else None)
        profiles = manifest.get("profiles") or []
        if profiles:
            lo, hi = profile_range(profiles[0])
            check_grid_in_profile(grid, lo, hi, manifest.get("name", "?"))
        engine = manifest.get("name", Path(manifest["plan_path"]).stem)
        precision = str(manifest.get("precision") or "int8-qdq")
        precision = "int8" if precision.startswith("int8") else precision
        runners[f"trt_{engine}"] = TensorRTRunner(manifest["plan_path"], f"trt_{engine}", precision=precision,
                                                  sparse=precision == "int8" or bool(manifest.get("sparse_weights")),
                                                  label=f"TensorRT engine {engine}")
    return runners, []


def validation_runners(inputs: RuntimeInputs, runtime) -> tuple[dict, list[dict]]:
    """The run's built engines (:func:`engine_runners`) on this machine."""
    return engine_runners(inputs.run_dir, inputs.grid)


#: what the client calls this runtime's artifact
CLIENT_ARTIFACT = "built TensorRT engine"
#: what the client's ``backend="tensorrt"`` needs, when it is missing
CLIENT_HINT = "pip install 'nxm-deploy[trt]' on a machine with an NVIDIA GPU, or use backend='onnxruntime'."


def client_artifact(artifacts, required: bool = False) -> Path | None:
    """The built plan made from the client's ONNX model (same ONNX sha256), or None.

    Raises:
        RunDirError: ``required`` and the run has no such engine.
    """
    if artifacts.engine_path is None and required:
        from nxm_deploy.errors import RunDirError
        from nxm_deploy.run.layout import RunLayout

        raise RunDirError(
            f"No built TensorRT engine for model '{artifacts.model}' ({artifacts.onnx_path.name}, sha256 "
            f"{artifacts.onnx_sha256[:12]}...) in {RunLayout(artifacts.run_dir).engine_status}.",
            hint=f"Run `nxm-deploy build-engine {artifacts.run_dir}` on a GPU machine, or use backend='onnxruntime'.")
    return artifacts.engine_path


def open_client(artifacts, options: dict):
    """An active runner of ``artifacts``' engine for the client, and a one-line description.

    ``options``: ``verify_hashes``, ``trt_contexts``.

    Raises:
        RunDirError: the plan differs from its recorded sha256 or cannot be loaded.
        MissingDependencyError: TensorRT or cuda-python missing.
    """
    from nxm_deploy.run.reader import read_verified

    record = artifacts.engine_record or {}
    data = read_verified(artifacts.engine_path, record.get("engine_sha256") if options.get("verify_hashes", True)
                         else None)
    contexts = int(options.get("trt_contexts") or 1)
    runner = TensorRTRunner(data, artifacts.engine_path.name, contexts=contexts, source=artifacts.engine_path.name)
    runner.activate()
    return runner, f"tensorrt, {contexts} execution context(s)"
