"""The one place an ONNX Runtime session is made: our thread settings and providers, for validation runners, the
client and the benchmarks. Imports neither torch nor transformers."""

from __future__ import annotations

from pathlib import Path

from nxm_deploy.machine import usable_cores


def make_session(model: bytes | str | Path, providers: list[str] | None = None, intra_op_threads: int | None = None,
                 *, quiet: bool = False, optimize: bool = True):
    """An ``onnxruntime.InferenceSession`` of ``model``.

    Args:
        model: the ONNX model as bytes (already hash-checked) or a path (needed for external data).
        providers: execution providers in order of preference (default ``["CPUExecutionProvider"]``).
        intra_op_threads: intra-op threads (default: every core this process may use, :func:`~nxm_deploy.machine.usable_cores`); inter-op parallelism is off (one thread), so a
            latency measurement sees one model on the cores it was given.
        quiet: ONNX Runtime logs errors only (checks that run graphs ONNX Runtime warns about, e.g. FP16 ones).
        optimize: False runs the graph as written (no fusion: every intermediate tensor keeps its value).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or usable_cores()
    options.inter_op_num_threads = 1
    if quiet:
        options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers or ["CPUExecutionProvider"])
