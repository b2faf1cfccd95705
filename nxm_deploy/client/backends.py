"""Inference backends of the client: one ONNX Runtime session, or a pool of TensorRT execution contexts.

A backend takes int64 feeds ``[B, L]`` keyed by input name and returns float32 logits ``[B, C]``; ``run`` is
safe to call from many threads at once:

* :class:`OrtBackend` shares one ``onnxruntime.InferenceSession``: ``InferenceSession.run`` is thread-safe
  (documented by ONNX Runtime); concurrent calls share the session's intra-op thread pool. No lock.
* :class:`TrtBackend` holds ``contexts`` TensorRT execution contexts, each with its own CUDA stream and
  buffers; a call checks one out (see :class:`nxm_deploy.engine.trt_runtime.TrtEngineRunner`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nxm_deploy.errors import RunDirError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class OrtBackend:
    """ONNX Runtime backend.

    Args:
        model: the ONNX model as bytes (already hash-checked) or a path (models with external data).
        intra_op_threads: ORT intra-op threads; default: the number of CPU cores.
        providers: ORT execution providers; default ``["CPUExecutionProvider"]``.
        label: name used in messages.

    Raises:
        RunDirError: the model's inputs/outputs are not those of an exported classifier.
    """

    name = "onnxruntime"
    max_batch_size: int | None = None
    max_sequence_length: int | None = None
    min_sequence_length = 1

    def __init__(self, model: bytes | str | Path, *, intra_op_threads: int | None = None,
                 providers: list[str] | None = None, label: str = "model"):
        import onnxruntime as ort

        from nxm_deploy.ort import make_session

        self.session = make_session(model, providers, intra_op_threads)
        self.intra_op_threads = self.session.get_session_options().intra_op_num_threads
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        unknown = [n for n in self.input_names if n not in MODEL_INPUTS]
        outputs = [o.name for o in self.session.get_outputs()]
        if unknown or "logits" not in outputs:
            raise RunDirError(
                f"ONNX model {label} has inputs {list(self.input_names)} and outputs {outputs}; "
                f"expected inputs among {list(MODEL_INPUTS)} and an output 'logits'.",
                hint="Use a model exported by `nxm-deploy export`.",
            )
        self.description = (f"onnxruntime {ort.__version__} {self.session.get_providers()[0]}, "
                            f"{self.intra_op_threads} intra-op threads")

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Logits float32 ``[B, C]`` for int64 feeds ``[B, L]``. Thread-safe."""
        session = self.session
        if session is None:
            raise RuntimeError("backend is closed")
        (logits,) = session.run(["logits"], {n: feeds[n] for n in self.input_names})
        return logits

    def close(self) -> None:
        self.session = None


class TrtBackend:
    """TensorRT backend over :class:`nxm_deploy.engine.trt_runtime.TrtEngineRunner`.

    Args:
        engine: serialized engine bytes (already hash-checked) or a ``.plan`` path.
        contexts: execution contexts, i.e. how many calls run at once (others wait for a free one).
        label: name used in messages.

    Attributes:
        max_batch_size, max_sequence_length, min_sequence_length: the engine's optimization profile 0.

    Raises:
        MissingDependencyError: TensorRT or cuda-python missing. RunDirError: the engine cannot be loaded.
    """

    name = "tensorrt"

    def __init__(self, engine: bytes | str | Path, *, contexts: int = 1, label: str = "engine"):
        from nxm_deploy.engine.trt_runtime import TrtEngineRunner

        self.runner = TrtEngineRunner(engine, contexts=contexts, name=label).activate()
        self.input_names = tuple(self.runner.input_names)
        self.max_batch_size = self.runner.max_batch_size
        self.max_sequence_length = self.runner.max_sequence_length
        self.min_sequence_length = self.runner.min_sequence_length or 1
        self.description = f"tensorrt, {contexts} execution context(s)"

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Logits float32 ``[B, C]`` for int64 feeds ``[B, L]`` inside the profile. Thread-safe."""
        return self.runner.infer({n: feeds[n] for n in self.input_names})["logits"]

    def close(self) -> None:
        self.runner.deactivate()
