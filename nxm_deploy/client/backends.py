"""The client's backend: one activated runner of a runtime (:mod:`nxm_deploy.runtimes`, the runner interface that
validation and the benchmarks use), seen as ``run(feeds) -> logits`` plus the engine profile's limits.

A backend takes int64 feeds ``[B, L]`` keyed by input name and returns float32 logits ``[B, C]``; ``run`` is safe
to call from many threads at once: each runtime's runner is (ONNX Runtime shares one thread-safe
``InferenceSession``; TensorRT checks out one of its execution contexts per call).
"""

from __future__ import annotations

import numpy as np


class RunnerBackend:
    """One activated runner as the client uses it.

    Args:
        runtime: the :class:`~nxm_deploy.runtimes.Runtime` it belongs to.
        runner: the activated runner (the runtime's ``open_client``).
        description: one line (version, provider, threads / contexts).

    Attributes: ``name`` (the runtime's client name: ``onnxruntime`` / ``tensorrt``), ``runner``, ``input_names``,
    ``description``, ``max_batch_size``, ``max_sequence_length``, ``min_sequence_length`` (an engine's optimization
    profile 0; None / 1 where the runtime has no profile).
    """

    def __init__(self, runtime, runner, description: str):
        self.runtime, self.runner, self.description = runtime, runner, description
        self.name = runtime.client
        self.input_names = tuple(runner.input_names)
        lo, hi = getattr(runner, "min_shape", None), getattr(runner, "max_shape", None)
        self.max_batch_size = None if hi is None else hi[0]
        self.max_sequence_length = None if hi is None else hi[1]
        self.min_sequence_length = 1 if lo is None else max(1, lo[1])

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
