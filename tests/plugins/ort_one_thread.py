"""A runtime added the documented way (README "Adding a runtime"): this module + one registration in
``nxm_deploy.runtimes.RUNTIMES`` (done by ``tests/unit/test_runtimes.py``). ONNX Runtime's CPU provider pinned to one
intra-op thread, running the deployed model only: what a latency-bound single-core service would use."""

from __future__ import annotations

from nxm_deploy.runtimes import onnxruntime as ort_runtime
from nxm_deploy.runtimes.onnxruntime import OnnxRuntimeRunner


def _one_thread(path, name: str, runtime, **labels) -> OnnxRuntimeRunner:
    runner = OnnxRuntimeRunner(path, name, intra_op_threads=1, **labels)
    runner.backend = runtime.name  # its own runtime: latency baselines, gates and the report tell it apart
    return runner


def validation_runners(inputs, runtime):
    model = inputs.onnx_models["sparse_int8"]
    return {"sparse_int8_1t": _one_thread(model["path"], "sparse_int8_1t", runtime, precision="int8", sparse=True,
                                          label=f"sparse {inputs.pattern} INT8 Q/DQ ONNX, one thread")}, []


client_artifact = ort_runtime.client_artifact


def open_client(artifacts, options):
    return ort_runtime.open_client(artifacts, {**options, "intra_op_threads": 1})
