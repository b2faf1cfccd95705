"""The client's backends: one activated runner of :mod:`nxm_deploy.validate.runners` (the runner interface that
validation and the benchmarks use), seen as ``run(feeds) -> logits`` plus the engine profile's limits.

A backend takes int64 feeds ``[B, L]`` keyed by input name and returns float32 logits ``[B, C]``; ``run`` is
safe to call from many threads at once:

* ONNX Runtime (:class:`~nxm_deploy.validate.runners.OnnxRuntimeRunner`) shares one ``InferenceSession``:
  ``InferenceSession.run`` is thread-safe (documented by ONNX Runtime); concurrent calls share the session's
  intra-op thread pool. No lock.
* TensorRT (:class:`~nxm_deploy.validate.runners.TensorRTRunner`) holds ``contexts`` execution contexts, each with
  its own CUDA stream and buffers; a call checks one out (:class:`nxm_deploy.engine.trt_runtime.TrtEngineRunner`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nxm_deploy.errors import RunDirError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class RunnerBackend:
    """One activated runner as the client uses it.

    Build it with :meth:`onnxruntime` or :meth:`tensorrt`. Attributes: ``name`` (``onnxruntime`` / ``tensorrt``),
    ``runner`` (the activated runner), ``input_names``, ``description``, ``max_batch_size``,
    ``max_sequence_length``, ``min_sequence_length`` (an engine's optimization profile 0; None / 1 for ONNX Runtime).
    """

    def __init__(self, runner, name: str, description: str):
        self.runner, self.name, self.description = runner, name, description
        self.input_names = tuple(runner.input_names)
        lo, hi = getattr(runner, "min_shape", None), getattr(runner, "max_shape", None)
        self.max_batch_size = None if hi is None else hi[0]
        self.max_sequence_length = None if hi is None else hi[1]
        self.min_sequence_length = 1 if lo is None else max(1, lo[1])

    @classmethod
    def onnxruntime(cls, model: bytes | str | Path, *, intra_op_threads: int | None = None,
                    providers: list[str] | None = None, label: str = "model") -> RunnerBackend:
        """An ONNX Runtime backend of ``model`` (bytes already hash-checked, or a path for external data).

        Raises:
            RunDirError: the model's inputs/outputs are not those of an exported classifier.
        """
        import onnxruntime as ort

        from nxm_deploy.validate.runners import OnnxRuntimeRunner

        runner = OnnxRuntimeRunner(model, label, intra_op_threads=intra_op_threads, providers=providers,
                                   source=label)
        runner.activate()
        inputs = list(runner.input_names)
        outputs = runner.output_names()
        if [n for n in inputs if n not in MODEL_INPUTS] or "logits" not in outputs:
            runner.deactivate()
            raise RunDirError(
                f"ONNX model {label} has inputs {inputs} and outputs {outputs}; "
                f"expected inputs among {list(MODEL_INPUTS)} and an output 'logits'.",
                hint="Use a model exported by `nxm-deploy export`.",
            )
        threads = runner.sess.get_session_options().intra_op_num_threads
        return cls(runner, "onnxruntime", f"onnxruntime {ort.__version__} {runner.sess.get_providers()[0]}, "
                                          f"{threads} intra-op threads")

    @classmethod
    def tensorrt(cls, engine: bytes | str | Path, *, contexts: int = 1, label: str = "engine") -> RunnerBackend:
        """A TensorRT backend of ``engine`` (bytes already hash-checked, or a ``.plan`` path).

        Raises:
            MissingDependencyError: TensorRT or cuda-python missing. RunDirError: the engine cannot be loaded.
        """
        from nxm_deploy.validate.runners import TensorRTRunner

        runner = TensorRTRunner(engine, label, contexts=contexts, source=label)
        runner.activate()
        return cls(runner, "tensorrt", f"tensorrt, {contexts} execution context(s)")

    @property
    def session(self):
        """The ``onnxruntime.InferenceSession`` of an ONNX Runtime backend, else None."""
        return getattr(self.runner, "sess", None)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Logits float32 ``[B, C]`` for int64 feeds ``[B, L]`` (inside an engine's profile). Thread-safe."""
        if not self.runner.is_active:
            raise RuntimeError("backend is closed")
        return self.runner.infer({n: feeds[n] for n in self.input_names})["logits"]

    def close(self) -> None:
        if self.runner.is_active:
            self.runner.deactivate()
