"""Run a serialized TensorRT engine (inference only) with ``cuda-python`` device buffers.

The builder lives in :mod:`nxm_deploy.engine.trt`; this module only deserializes and executes plans for the
inference client (:mod:`nxm_deploy.client`). ``tensorrt`` and ``cuda`` are imported lazily, inside functions,
through :func:`nxm_deploy._lazy.require`, so importing this module needs neither.

Thread safety: a TensorRT ``IExecutionContext`` must not run two inferences at once. A
:class:`TrtEngineRunner` owns a pool of ``contexts`` execution contexts, each with its own CUDA stream and
device buffers; :meth:`TrtEngineRunner.infer` checks one out for the duration of a call (blocking while all
are busy), so any number of threads may call it.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from types import ModuleType

import numpy as np

from nxm_deploy._lazy import require
from nxm_deploy.errors import ConfigError, MissingDependencyError, RunDirError

log = logging.getLogger("nxm_deploy.engine")

_HINT = ("pip install 'nxm-deploy[trt]' (CUDA 12 drivers; 'nxm-deploy[trt-cu13]' for CUDA 13) on a machine with an "
         "NVIDIA GPU.")


def _tensorrt() -> ModuleType:
    return require("tensorrt", "trt")


def _cudart() -> ModuleType:
    """``cuda.bindings.runtime`` (cuda-python >= 12.6) or the older ``cuda.cudart``."""
    try:
        return require("cuda.bindings.runtime", "trt")
    except MissingDependencyError:
        return require("cuda.cudart", "trt")


def _check(cudart: ModuleType, result):
    """Unpack a cuda-python ``(err, *values)`` tuple; raise RuntimeError on a CUDA error."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if int(err) != 0:
        _, text = cudart.cudaGetErrorString(err)
        raise RuntimeError(f"CUDA error {int(err)}: {text.decode() if isinstance(text, bytes) else text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


class _Slot:
    """One execution context with its stream and grow-only device buffers (name -> (pointer, bytes))."""

    def __init__(self, engine, cudart: ModuleType):
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?).")
        self.stream = _check(cudart, cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}

    def buffer(self, cudart: ModuleType, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(cudart, cudart.cudaFree(ptr))
            ptr = int(_check(cudart, cudart.cudaMalloc(max(nbytes, 1))))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def free(self, cudart: ModuleType) -> None:
        for ptr, _ in self.buffers.values():
            cudart.cudaFree(ptr)
        self.buffers.clear()
        cudart.cudaStreamDestroy(self.stream)
        self.context = None


class TrtEngineRunner:
    """Deserialize a TensorRT plan and run it; same shape as :class:`nxm_deploy.runtimes.onnxruntime.OnnxRuntimeRunner`.

    Args:
        engine: ``.plan`` file, or the serialized engine bytes (e.g. already read and hash-checked).
        contexts: execution contexts in the pool (>= 1): how many ``infer`` calls may run concurrently.
        name: label used in messages.

    ``infer(feed_dict)`` takes integer arrays ``[B, L]`` keyed by input name (cast to the engine's input
    dtype) and returns ``{"logits": float32 [B, C]}``. ``B`` and ``L`` must lie inside optimization profile 0
    (:attr:`min_shape` / :attr:`max_shape`).

    Raises:
        MissingDependencyError: ``tensorrt`` or ``cuda-python`` is not importable (on :meth:`activate`).
        RunDirError: the plan file is missing or TensorRT cannot deserialize it (other TensorRT version, GPU).
        ConfigError: ``contexts`` < 1; at ``infer``: a missing input or a shape outside the profile.
    """

    def __init__(self, engine: str | Path | bytes, contexts: int = 1, name: str | None = None):
        if isinstance(contexts, bool) or not isinstance(contexts, int) or contexts < 1:
            raise ConfigError(f"contexts={contexts!r} must be an integer >= 1.")
        self.engine_source = engine
        self.contexts = contexts
        self.name = name or (Path(engine).name if not isinstance(engine, (bytes, bytearray)) else "engine")
        self.input_names: list[str] = []
        self.output_name = "logits"
        self.min_shape: tuple[int, int] | None = None
        self.max_shape: tuple[int, int] | None = None
        self._engine = None
        self._runtime = None
        self._slots: queue.Queue[_Slot] | None = None
        self._all_slots: list[_Slot] = []
        self._lock = threading.Lock()

    @property
    def max_batch_size(self) -> int | None:
        """Largest batch of profile 0 (None before :meth:`activate`)."""
        return None if self.max_shape is None else self.max_shape[0]

    @property
    def max_sequence_length(self) -> int | None:
        """Longest sequence of profile 0 (None before :meth:`activate`)."""
        return None if self.max_shape is None else self.max_shape[1]

    @property
    def min_sequence_length(self) -> int | None:
        """Shortest sequence of profile 0 (None before :meth:`activate`)."""
        return None if self.min_shape is None else self.min_shape[1]

    def activate(self) -> "TrtEngineRunner":
        trt = _tensorrt()
        cudart = _cudart()
        if isinstance(self.engine_source, (bytes, bytearray)):
            data = bytes(self.engine_source)
        else:
            path = Path(self.engine_source)
            if not path.is_file():
                raise RunDirError(f"TensorRT engine {path} not found.", hint="Run `nxm-deploy build-engine RUN_DIR`.")
            data = path.read_bytes()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise RunDirError(
                f"TensorRT {trt.__version__} cannot deserialize engine {self.name}.",
                hint="Engines only run with the TensorRT version and GPU they were built for; rebuild with "
                     "`nxm-deploy build-engine RUN_DIR`.",
            )
        self._engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in self.input_names]
        self.output_name = "logits" if "logits" in outputs else outputs[0]
        mins, maxs = [], []
        for n in self.input_names:
            lo, _opt, hi = engine.get_tensor_profile_shape(n, 0)
            mins.append(tuple(lo))
            maxs.append(tuple(hi))
        self.min_shape = (max(s[0] for s in mins), max(s[1] for s in mins))
        self.max_shape = (min(s[0] for s in maxs), min(s[1] for s in maxs))
        self._all_slots = [_Slot(engine, cudart) for _ in range(self.contexts)]
        self._slots = queue.Queue()
        for slot in self._all_slots:
            self._slots.put(slot)
        return self

    def deactivate(self) -> None:
        """Free every context, stream and device buffer. Call only when no ``infer`` is running."""
        with self._lock:
            if self._engine is None:
                return
            cudart = _cudart()
            for slot in self._all_slots:
                slot.free(cudart)
            self._all_slots, self._slots = [], None
            self._engine = None
            self._runtime = None

    def __enter__(self) -> "TrtEngineRunner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def infer(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch on a free execution context (blocks while all are busy). Thread-safe."""
        slots = self._slots
        if self._engine is None or slots is None:
            raise ConfigError(f"Runner {self.name} is not active: use it as a context manager.")
        trt = _tensorrt()
        cudart = _cudart()
        engine = self._engine
        hosts = {}
        for name in self.input_names:
            if name not in feed_dict:
                raise ConfigError(f"Runner {self.name}: input '{name}' missing from feed_dict (got {sorted(feed_dict)}).")
            array = np.asarray(feed_dict[name])
            if array.dtype.kind not in "iu" or array.ndim != 2:
                raise ConfigError(f"Runner {self.name}: input '{name}' must be integer [B, L], got {array.dtype} {array.shape}.")
            lo, hi = self.min_shape, self.max_shape
            if not (lo[0] <= array.shape[0] <= hi[0] and lo[1] <= array.shape[1] <= hi[1]):
                raise ConfigError(
                    f"Runner {self.name}: input shape {array.shape} outside the engine profile {lo}..{hi}.",
                    hint="Split batches and truncate/pad sequences to the profile (the TextClassifier does this).",
                )
            hosts[name] = np.ascontiguousarray(array, dtype=trt.nptype(engine.get_tensor_dtype(name)))
        slot = slots.get()
        try:
            h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            for name, host in hosts.items():
                ptr = slot.buffer(cudart, name, host.nbytes)
                slot.context.set_input_shape(name, host.shape)
                slot.context.set_tensor_address(name, ptr)
                _check(cudart, cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d, slot.stream))
            out_shape = tuple(slot.context.get_tensor_shape(self.output_name))
            out = np.empty(out_shape, dtype=trt.nptype(engine.get_tensor_dtype(self.output_name)))
            out_ptr = slot.buffer(cudart, self.output_name, out.nbytes)
            slot.context.set_tensor_address(self.output_name, out_ptr)
            if not slot.context.execute_async_v3(int(slot.stream)):
                raise RuntimeError(f"TensorRT execution of {self.name} failed.")
            _check(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, out_ptr, out.nbytes, d2h, slot.stream))
            _check(cudart, cudart.cudaStreamSynchronize(slot.stream))
        finally:
            slots.put(slot)
        return {"logits": out.astype(np.float32, copy=False)}
