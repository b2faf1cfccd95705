"""Runners behind one interface: Polygraphy's :class:`~polygraphy.backend.base.BaseRunner`.

Every runner is a context manager (``activate``/``deactivate``), takes ``infer(feed_dict)`` with integer token
arrays ``[B, L]`` keyed by input name and returns ``{"logits": float32 [B, C]}``; ``last_inference_s`` is the
time of the last call in seconds. Because they are Polygraphy runners, :class:`polygraphy.comparator.Comparator`
runs and compares them directly.

* :class:`OnnxRuntimeRunner` - Polygraphy's own ``OnnxrtRunner`` (session built here with the thread settings
  and execution providers: CPU, or CUDA / TensorRT when ``onnxruntime-gpu`` is installed). ORT copies outputs
  to the host inside ``run``, so the measured time includes the device synchronization.
* :class:`TensorRTRunner` - wraps :class:`nxm_deploy.engine.trt_runtime.TrtEngineRunner` (whose ``infer``
  ends with ``cudaStreamSynchronize``: the wall time covers H2D copy, execution and D2H copy).
* :class:`TorchRunner` - a Hugging Face sequence classifier (Polygraphy's ``PytRunner`` hard-codes ``.cuda()``
  and returns a tuple from ``infer_impl``, so it cannot run on CPU); on CUDA it times with CUDA events.

Every runner carries what the report needs to label it: ``backend`` (``onnxruntime-cpu``,
``onnxruntime-cuda``, ``onnxruntime-tensorrt``, ``tensorrt``, ``pytorch-cpu``/``pytorch-cuda``), ``precision``
(``fp32``, ``fp16``, ``int8``), ``sparse`` and ``source`` (the file it runs).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata

from nxm_deploy.ort import make_session
from nxm_deploy.errors import ConfigError
from nxm_deploy.errors import ValidationError

log = logging.getLogger("nxm_deploy.validate")

#: ONNX Runtime execution providers per backend label (the CPU provider is always appended as fallback).
ORT_BACKENDS = {
    "onnxruntime-cpu": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider"],
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
}


class _Labelled:
    """What every runner of this module adds to Polygraphy's ``BaseRunner``: labels and a checked ``infer``."""

    backend: str = "?"
    precision: str = "fp32"
    sparse: bool = False
    source: str | None = None
    #: a reference model of another tool (ONNX Runtime's optimizer / quantize_dynamic), not one of ours: reported,
    #: never gated
    peer: bool = False

    def _set_labels(self, backend: str, precision: str, sparse: bool, source) -> None:
        self.backend, self.precision, self.sparse = backend, precision, bool(sparse)
        self.source = None if source is None else str(source)

    @property
    def device(self) -> str:
        return "cpu" if self.backend in ("onnxruntime-cpu", "pytorch-cpu") else "cuda"

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
        return {"name": self.name, "backend": self.backend, "precision": self.precision, "sparse": self.sparse,
                "source": self.source, **({"peer": True} if self.peer else {})}

    def infer(self, feed_dict, check_inputs: bool = True, *args, **kwargs):
        """Run one batch; extra entries of ``feed_dict`` are ignored.

        Raises:
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


# --------------------------------------------------------------------------------------------- ONNX Runtime


class OnnxRuntimeRunner(_Labelled, OnnxrtRunner):
    """Polygraphy's ``OnnxrtRunner`` on a session made with our thread settings and providers.

    Args:
        path: ``.onnx`` file, or the model's bytes (already hash-checked by the caller: the client).
        name: label used in reports (a key of ``validation.json``).
        backend: a key of :data:`ORT_BACKENDS`.
        intra_op_threads: ORT intra-op threads (default: all cores).
        precision / sparse: labels. source: the file the bytes came from (label only).
        providers: explicit ONNX Runtime execution providers (the client's ``providers=``); the backend label
            follows the first one.

    Raises:
        ConfigError: the file is missing or the backend unknown.
        ValidationError (on activate): a GPU backend whose provider ONNX Runtime did not load.
    """

    def __init__(self, path: str | Path | bytes, name: str, *, backend: str = "onnxruntime-cpu",
                 intra_op_threads: int | None = None, precision: str = "fp32", sparse: bool = False,
                 source: str | Path | None = None, providers: list[str] | None = None, peer: bool = False):
        if providers:
            backend = next((b for b, p in ORT_BACKENDS.items() if p[0] == providers[0]), backend)
        if not isinstance(path, bytes):
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"ONNX model {path} not found.")
        if backend not in ORT_BACKENDS:
            raise ConfigError(f"Unknown ONNX Runtime backend {backend!r}; known: {sorted(ORT_BACKENDS)}.")
        self.path = None if isinstance(path, bytes) else path
        if providers:
            self.providers = list(providers)
        elif backend == "onnxruntime-cpu":
            self.providers = list(ORT_BACKENDS[backend])
        else:
            self.providers = [*ORT_BACKENDS[backend], "CPUExecutionProvider"]
        self.intra_op_threads = intra_op_threads or os.cpu_count() or 1
        OnnxrtRunner.__init__(self, functools.partial(make_session, path, self.providers, self.intra_op_threads),
                              name=name)
        self._set_labels(backend, precision, sparse, source if source is not None else self.path)
        self.peer = bool(peer)

    def activate_impl(self):
        self.sess = self._sess()  # what OnnxrtRunner.activate_impl does, plus the provider check
        wanted = self.providers[0]
        if wanted not in self.sess.get_providers():
            used = self.sess.get_providers()
            del self.sess
            raise ValidationError(f"Runner {self.name}: ONNX Runtime did not load {wanted} (session uses {used}).",
                                  hint="Install onnxruntime-gpu matching this machine's CUDA, or drop the backend.")

    def output_names(self) -> list[str]:
        return [o.name for o in self.sess.get_outputs()]

    def static_num_labels(self) -> int | None:
        """The logits' class dimension when the graph fixes it, else None."""
        for out in self.sess.get_outputs():
            if out.name == "logits" and len(out.shape) == 2 and isinstance(out.shape[1], int):
                return int(out.shape[1])
        return None


def ort_gpu_backends() -> list[str]:
    """The GPU backends of :data:`ORT_BACKENDS` whose provider this ONNX Runtime build offers (``onnxruntime-gpu``)."""
    try:
        import onnxruntime as ort

        available = set(ort.get_available_providers())
    except Exception:  # noqa: BLE001 - no ORT: no GPU backend
        return []
    return [b for b, providers in ORT_BACKENDS.items() if b != "onnxruntime-cpu" and providers[0] in available]


# --------------------------------------------------------------------------------------------- TensorRT


class TensorRTRunner(_Labelled, BaseRunner):
    """A TensorRT plan run by :class:`nxm_deploy.engine.trt_runtime.TrtEngineRunner`.

    Args:
        plan: ``.plan`` file, or the engine's bytes (already hash-checked by the caller: the client).
        name: label. precision / sparse: labels. source: the file the bytes came from (label only).
        contexts: execution contexts, i.e. how many ``infer`` calls run at once from different threads.

    ``min_shape`` / ``max_shape`` (``(B, L)`` of profile 0) are known after activation; feeding a shape outside
    them raises ConfigError in the inner runner (check the latency grid first: :func:`check_grid_in_profile`).
    """

    def __init__(self, plan: str | Path | bytes, name: str, *, precision: str = "int8", sparse: bool = True,
                 contexts: int = 1, source: str | Path | None = None):
        BaseRunner.__init__(self, name=name, prefix="tensorrt-runner")
        self.plan = plan if isinstance(plan, bytes) else Path(plan)
        self.contexts = contexts
        self._inner = None
        self.min_shape: tuple[int, int] | None = None
        self.max_shape: tuple[int, int] | None = None
        self._set_labels("tensorrt", precision, sparse,
                         source if source is not None else None if isinstance(plan, bytes) else self.plan)

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


# --------------------------------------------------------------------------------------------- PyTorch


class TorchRunner(_Labelled, BaseRunner):
    """A Hugging Face sequence classifier (``model(**inputs).logits``) as a Polygraphy runner.

    Args:
        model: the ``nn.Module``, or a callable returning it (loaded on activation).
        name: label.
        input_names: the inputs to pass (the export manifest's ``inputs``).
        device: ``"cpu"`` or ``"cuda"``; CUDA timings use CUDA events.
        context: optional callable ``model -> context manager`` entered around each forward (e.g.
            :func:`quantizers_disabled`), so two runners may share one model in different modes.
    """

    def __init__(self, model, name: str, input_names: list[str], *, device: str = "cpu",
                 context: Callable | None = None, precision: str = "fp32", sparse: bool = False, source=None):
        BaseRunner.__init__(self, name=name, prefix="pytorch-runner")
        self._model = model
        self._input_names = list(input_names)
        self._device = device
        self._context = context
        self.model = None
        self._set_labels(f"pytorch-{'cuda' if device.startswith('cuda') else 'cpu'}", precision, sparse, source)

    def activate_impl(self):
        model = self._model() if callable(self._model) and not hasattr(self._model, "parameters") else self._model
        from nxm_deploy.quantization.placement import use_eager_attention

        use_eager_attention(model)
        model.eval().to(self._device)
        self.model = model

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name in self._input_names:
            meta.add(name, dtype=np.int64, shape=(None, None))
        return meta

    def _feed(self, feed_dict) -> tuple[dict, int | None]:
        """The arrays to run and how many leading rows of the logits to keep (None: all)."""
        return feed_dict, None

    def _logits(self, inputs):
        return self.model(**inputs).logits

    def infer_impl(self, feed_dict):
        import torch

        feed, rows = self._feed(feed_dict)
        context = self._context(self.model) if self._context is not None else contextlib.nullcontext()
        with torch.no_grad(), context:
            inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self._device) for k, v in feed.items()}
            if self._device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                logits = self._logits(inputs)
                end.record()
                end.synchronize()
                self.inference_time = start.elapsed_time(end) / 1e3
            else:
                begin = time.perf_counter()
                logits = self._logits(inputs)
                self.inference_time = time.perf_counter() - begin
        return OrderedDict(logits=logits[:rows].detach().float().cpu().numpy())

    def deactivate_impl(self):
        self.model = None


class TorchCudaRunner(TorchRunner):
    """A run's model on an NVIDIA GPU through PyTorch: FP16, with its 2:4 Linears on cuSPARSELt (FP16 or INT8 with
    the learned scales) or dense INT8, replayed from CUDA graphs (:mod:`nxm_deploy.gpu`; one graph per bucket
    shape: sequence length padded to a multiple of 32, batch to a power of two).

    Args:
        model: the ``nn.Module`` or a callable returning it (a float model for ``dense-fp16`` / ``sparse-fp16``,
            the QAT model for ``sparse-int8`` / ``dense-int8``).
        variant: one of :data:`nxm_deploy.gpu.kernels.VARIANTS`.
        targets: fqns of the 2:4 Linears (the sparse stage's ``targets``).
        graphs: replay CUDA graphs (one per input shape); False runs eagerly.
        attention: attention implementation of float models (``sdpa``; a QAT model with INT8 attention keeps its
            quantized eager attention, the graph form the Q/DQ ONNX model has).

    After activation ``layers`` lists, per target, the kernel used or why it stayed dense.

    Raises:
        ValidationError (on activate): no CUDA device.
    """

    def __init__(self, model, name: str, input_names: list[str], *, variant: str, targets: list[str],
                 graphs: bool = True, attention: str = "sdpa", source=None):
        precision = "int8" if variant.endswith("int8") else "fp16"
        super().__init__(model, name, input_names, device="cuda", precision=precision,
                         sparse=variant.startswith("sparse"), source=source)
        self.variant, self.targets, self.use_graphs, self.attention = variant, list(targets), graphs, attention
        self.layers: list = []
        self._forward = None

    def activate_impl(self):
        import torch

        from nxm_deploy.gpu.graphs import GraphedForward, hf_forward
        from nxm_deploy.gpu.kernels import convert_model
        from nxm_deploy.quantization.placement import use_eager_attention, uses_int8_attention

        if not torch.cuda.is_available():
            raise ValidationError(f"Runner {self.name} needs a CUDA device: torch.cuda.is_available() is False.")
        model = self._model() if callable(self._model) and not hasattr(self._model, "parameters") else self._model
        if uses_int8_attention(model):
            use_eager_attention(model)
        elif hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(self.attention)
        model.eval().to("cuda")
        self.layers = convert_model(model, self.variant, self.targets)
        self.model = model
        forward = hf_forward(model, "logits")
        self._forward = GraphedForward(forward) if self.use_graphs else forward

    def _feed(self, feed_dict) -> tuple[dict, int | None]:
        """With graphs, the feed padded to a bucket shape (:func:`~nxm_deploy.gpu.graphs.bucket_feed`); the CUDA-event
        time then covers the padded forward."""
        from nxm_deploy.gpu.graphs import bucket_feed

        return bucket_feed(feed_dict) if self.use_graphs else (feed_dict, None)

    def _logits(self, inputs):
        return self._forward(**inputs)

    def describe(self) -> dict:
        kernels: dict[str, int] = {}
        for layer in self.layers:
            kernels[layer.kernel] = kernels.get(layer.kernel, 0) + 1
        return {**super().describe(), "variant": self.variant, "kernels": kernels,
                "dense_layers": [{"name": l.name, "shape": list(l.shape), "reason": l.reason}
                                 for l in self.layers if l.reason],
                "execution": "cuda-graphs" if self.use_graphs else "eager", **self._graph_stats()}

    def _graph_stats(self) -> dict:
        forward = self._forward
        if not hasattr(forward, "graphs"):
            return getattr(self, "_last_graph_stats", {})
        return {"graphs": forward.graphs, "eager_calls": forward.eager_calls, "capture_error": forward.capture_error,
                "replay_checked": forward.replay_checked}

    def deactivate_impl(self):
        self._last_graph_stats = self._graph_stats()
        self.model, self._forward = None, None


@contextlib.contextmanager
def quantizers_disabled(model):
    """Turn every fake-quant ``TensorQuantizer`` off (the QAT weights in FP32) for the duration of the block."""
    from nxm_deploy.quantization.fake_quant import TensorQuantizer

    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    states = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield model
    finally:
        for q, state in zip(quantizers, states):
            q.enabled = state


# --------------------------------------------------------------------------------------------- checks


def check_io(runner, expected_inputs: list[str], num_labels: int, probe: dict[str, np.ndarray]) -> None:
    """Check an active runner takes ``expected_inputs`` and returns ``[B, num_labels]`` logits on ``probe``
    (``num_labels`` 0: a causal LM's ``[B, L, vocab]``).

    Raises:
        ValidationError: different input names, no ``logits`` output, or another label count.
    """
    names = runner.input_names
    if sorted(names) != sorted(expected_inputs):
        raise ValidationError(
            f"Runner {runner.name} ({runner.source}) takes inputs {names}, but the run's models take {list(expected_inputs)}.",
            hint="Validate models exported from the same run (same tokenizer and export manifest).",
        )
    out = runner.infer(probe)
    if "logits" not in out:
        raise ValidationError(f"Runner {runner.name} ({runner.source}) has outputs {list(out)}, expected 'logits'.")
    from nxm_deploy.models import logits_shape_problem

    problem = logits_shape_problem(np.shape(out["logits"]), num_labels, next(iter(probe.values())).shape)
    if problem:
        raise ValidationError(
            f"Runner {runner.name} ({runner.source}) returns {problem}.",
            hint="The model was exported as a classifier; re-export it from this run." if num_labels == 0 else
            "The model was trained for another task or label count; re-export it from this run.")
