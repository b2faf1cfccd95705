"""ONNX Runtime runner with Polygraphy's runner shape: context manager, ``activate``/``infer``/``deactivate``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from nxm_deploy.errors import ConfigError


class OrtRunner:
    """Run an ONNX model with ONNX Runtime.

    Args:
        path: ``.onnx`` file.
        providers: ORT execution providers. Defaults to ``["CPUExecutionProvider"]``.
        intra_op_threads: ORT intra-op threads; defaults to the number of CPU cores.
        name: label used in reports.

    ``infer(feed_dict)`` takes int64 arrays ``[B, L]`` keyed by input name and returns ``{"logits": [B, C]}``
    float32; ``last_inference_s`` holds the wall time of the last call in seconds.
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, intra_op_threads: int | None = None, name: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"ONNX model {self.path} not found.")
        self.providers = providers or ["CPUExecutionProvider"]
        self.intra_op_threads = intra_op_threads or os.cpu_count() or 1
        self.name = name or self.path.stem
        self.session = None
        self.input_names: list[str] = []
        self.last_inference_s = 0.0

    def activate(self) -> "OrtRunner":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        return self

    def deactivate(self) -> None:
        self.session = None

    def __enter__(self) -> "OrtRunner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def infer(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Raises ConfigError for a missing input or a non-integer dtype."""
        if self.session is None:
            raise ConfigError(f"Runner {self.name} is not active: use it as a context manager.")
        feeds = {}
        for name in self.input_names:
            if name not in feed_dict:
                raise ConfigError(f"Runner {self.name}: input '{name}' missing from feed_dict (got {sorted(feed_dict)}).")
            array = np.asarray(feed_dict[name])
            if array.dtype.kind not in "iu":
                raise ConfigError(f"Runner {self.name}: input '{name}' must be integer token ids, got {array.dtype}.")
            feeds[name] = array.astype(np.int64, copy=False)
        start = time.perf_counter()
        (logits,) = self.session.run(["logits"], feeds)
        self.last_inference_s = time.perf_counter() - start
        return {"logits": logits}
