"""What every runner of every runtime shares: Polygraphy's :class:`~polygraphy.backend.base.BaseRunner` shape plus
the labels the report needs, and what validation hands a runtime.

Every runner is a context manager (``activate``/``deactivate``), takes ``infer(feed_dict)`` with integer token
arrays ``[B, L]`` keyed by input name and returns ``{"logits": float32 [B, C]}``; ``last_inference_s`` is the
time of the last call in seconds. Because they are Polygraphy runners, :class:`polygraphy.comparator.Comparator`
runs and compares them directly.

Every runner carries: ``backend`` (its runtime's name in :data:`nxm_deploy.runtimes.RUNTIMES`), ``label`` (what
the report calls it, given by the runtime that made it), ``precision`` (``fp32``, ``fp16``, ``int8``), ``sparse``
and ``source`` (the file it runs).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nxm_deploy.errors import ConfigError, ValidationError


class LabelledRunner:
    """Mixed in before a Polygraphy ``BaseRunner``: labels and a checked ``infer``."""

    backend: str = "?"
    label: str | None = None
    precision: str = "fp32"
    sparse: bool = False
    source: str | None = None
    #: a reference model of another tool (ONNX Runtime's optimizer / quantize_dynamic), not one of ours: reported,
    #: never gated
    peer: bool = False

    def _set_labels(self, backend: str, precision: str, sparse: bool, source, label: str | None = None) -> None:
        self.backend, self.precision, self.sparse = backend, precision, bool(sparse)
        self.source = None if source is None else str(source)
        self.label = label

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda"``: its runtime's device."""
        from nxm_deploy.runtimes import get_runtime

        return get_runtime(self.backend).device

    _input_names: list[str] | None = None

    def activate(self):
        super().activate()
        # read once: infer() checks its feed against them on every call (the client's hot path)
        self._input_names = list(self.get_input_metadata(use_numpy_dtypes=False).keys())

    def deactivate(self):
        self.__dict__.pop("_input_names", None)  # back to the state before activate (Polygraphy may compare)
        super().deactivate()

    @property
    def input_names(self) -> list[str]:
        """Input names of the active model."""
        if self._input_names is None:
            return list(self.get_input_metadata(use_numpy_dtypes=False).keys())
        return self._input_names

    @property
    def last_inference_s(self) -> float:
        """Seconds taken by the last ``infer`` call."""
        return float(self.last_inference_time())

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label or self.name, "backend": self.backend,
                "precision": self.precision, "sparse": self.sparse, "source": self.source,
                **({"peer": True} if self.peer else {})}

    def infer(self, feed_dict, check_inputs: bool = True, *args, **kwargs):
        """Run one batch; extra entries of ``feed_dict`` are ignored.

        Raises:
            ConfigError: the runner is not active.
            ValidationError: an input of the model is missing, or not an integer ``[B, L]`` array.
        """
        if not self.is_active:
            raise ConfigError(f"Runner {self.name} is not active: use it as a context manager.")
        feeds = OrderedDict()
        for name in self.input_names:
            if name not in feed_dict:
                raise ValidationError(
                    f"Runner {self.name}: model input '{name}' missing from the feed (got {sorted(feed_dict)}).",
                    hint="All models of a run must take the same inputs (the export manifest's `inputs`).",
                )
            array = np.asarray(feed_dict[name])
            if array.dtype.kind not in "iu" or array.ndim != 2:
                raise ValidationError(f"Runner {self.name}: input '{name}' must be integer [B, L] token ids, "
                                      f"got {array.dtype} {array.shape}.")
            feeds[name] = array.astype(np.int64, copy=False)
        return super().infer(feeds, False, *args, **kwargs)


@dataclass
class RuntimeInputs:
    """What validation hands every runtime's ``validation_runners``.

    Attributes:
        run_dir (Path): the run directory.
        export_manifest (dict): ``onnx/manifest.json``.
        onnx_models (dict): name -> ``{"path", "precision", "sparse", "label"[, "peer"]}``, the run's ONNX models
            checked against the export manifest's sha256 (:func:`nxm_deploy.validate.stage.onnx_models`).
        grid (list[tuple[int, int]]): the latency grid, ``(batch, sequence length)``.
        intra_op_threads (int | None): ONNX Runtime intra-op threads (None: all cores).
        input_names (list[str]): the models' inputs.
        pattern (str): the n:m pattern, for labels (``"2:4"``).
    """

    run_dir: Path
    export_manifest: dict
    onnx_models: dict
    grid: list
    intra_op_threads: int | None
    input_names: list
    pattern: str
