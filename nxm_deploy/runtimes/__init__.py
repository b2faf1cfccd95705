"""The runtimes that run a run's artifacts: one module per runtime, one registration here.

A runtime is a :class:`Runtime`: its name (the ``backend`` every runner carries and ``validation.json`` records),
its report label, its device, and the module that implements it. Validation, the report and the inference client
read this registry and nothing else about runtimes:

* validation (:func:`nxm_deploy.validate.stage.make_runners`) asks every runtime, in registration order, for its
  runners on the run (the module's ``validation_runners(inputs, runtime)``: inactive Polygraphy runners and the
  ones skipped here, with the reason); a runner of an ``optional`` runtime that fails to start is reported as
  skipped instead of failing the stage;
* the report (:mod:`nxm_deploy.validate.report`) labels a runtime with :func:`runtime_label` and a runner with
  the ``label`` its runtime gave it (``validation.json``'s ``runners``), never by decoding its name;
* the client (:class:`nxm_deploy.client.TextClassifier`) offers every runtime with a ``client`` name as a
  ``backend=``; ``auto`` takes the first, in ``client_priority`` order, whose artifact the run has
  (``client_artifact(artifacts)``) and that is available here (``unavailable_reason()``), and opens it
  (``open_client(artifacts, data, options)``);
* the output diff re-runs a comparison by hand with ``polygraphy run <model> <polygraphy flags>``.

Adding a runtime: write ``nxm_deploy/runtimes/<name>.py`` with the functions its roles need (see
:mod:`nxm_deploy.runtimes.onnxruntime` for all of them) and add one :class:`Runtime` to :data:`RUNTIMES`.

This module imports no runtime (neither torch, onnxruntime, polygraphy nor TensorRT): the report reads it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from nxm_deploy.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    """One runtime.

    Attributes:
        name: the ``backend`` label of its runners (``validation.json``, latency baselines, gates).
        label: its name for people (the report's runtime column).
        device: ``"cpu"`` or ``"cuda"``.
        module: the module that implements it (imported only when one of its functions is called).
        validation: validation asks it for runners (``module.validation_runners``).
        optional: a runner that fails to start (a GPU provider or kernel this machine refuses) is skipped with
            the reason; otherwise the failure stops the validation.
        client: the client's ``backend=`` name (None: not offered by the client).
        client_priority: ``backend="auto"`` tries lower numbers first.
        polygraphy: the ``polygraphy run`` flags that run a model file on this runtime (None: Polygraphy's CLI
            cannot run it alone, e.g. a PyTorch model).
        int8_gated: its INT8 runners' output diff against the Q/DQ reference is gated. False for a runtime that
            computes the non-GEMM remainder in FP16 and runs the sparse stage's own model in FP16 (PyTorch CUDA):
            its INT8 and sparse float runners are then reported against the references, not gated.
    """

    name: str
    label: str
    device: str
    module: str
    validation: bool = False
    optional: bool = False
    client: str | None = None
    client_priority: int = 100
    polygraphy: tuple[str, ...] | None = None
    int8_gated: bool = True

    def implementation(self) -> ModuleType:
        """The runtime's module (imported now)."""
        return importlib.import_module(self.module)

    def function(self, name: str) -> Callable:
        """``name`` of the runtime's module.

        Raises:
            ConfigError: the module does not define it (a registration that claims a role it does not implement).
        """
        impl = self.implementation()
        if not hasattr(impl, name):
            raise ConfigError(f"Runtime {self.name}: {self.module} defines no {name}().")
        return getattr(impl, name)

    def unavailable_reason(self) -> str | None:
        """Why this runtime cannot run here, in one line, or None (the module's ``unavailable_reason``; a
        runtime whose module has none is always available)."""
        impl = self.implementation()
        check = getattr(impl, "unavailable_reason", None)
        return None if check is None else check()


_ORT = "nxm_deploy.runtimes.onnxruntime"
_TRT = "nxm_deploy.runtimes.tensorrt"
_TORCH = "nxm_deploy.runtimes.pytorch"

#: every runtime, in the order validation runs them (and validation.json lists their runners)
RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("onnxruntime-cpu", "ONNX Runtime CPU", "cpu", _ORT, validation=True, client="onnxruntime",
            client_priority=90, polygraphy=("--onnxrt",)),
    Runtime("onnxruntime-cuda", "ONNX Runtime CUDA EP", "cuda", _ORT, validation=True, optional=True,
            polygraphy=("--onnxrt", "--providers", "cuda")),
    Runtime("onnxruntime-tensorrt", "ONNX Runtime TensorRT EP", "cuda", _ORT, validation=True, optional=True,
            polygraphy=("--onnxrt", "--providers", "tensorrt", "cuda")),
    Runtime("tensorrt", "TensorRT", "cuda", _TRT, validation=True, client="tensorrt", client_priority=10,
            polygraphy=("--trt", "--model-type", "engine")),
    Runtime("pytorch-cuda", "PyTorch CUDA", "cuda", _TORCH, validation=True, optional=True, int8_gated=False),
    Runtime("pytorch-cpu", "PyTorch CPU", "cpu", _TORCH),  # the output diff's references (validate/stage.py)
)}


def get_runtime(name: str) -> Runtime:
    """The registered runtime ``name``.

    Raises:
        ConfigError: unknown name (the known ones are listed).
    """
    if name not in RUNTIMES:
        raise ConfigError(f"Unknown runtime {name!r}; known: {sorted(RUNTIMES)}.")
    return RUNTIMES[name]


def runtime_label(name: str | None) -> str:
    """The report label of runtime ``name`` (the name itself when it is not registered, ``?`` when None)."""
    if name is None:
        return "?"
    runtime = RUNTIMES.get(name)
    return runtime.label if runtime is not None else name


def client_runtimes() -> list[Runtime]:
    """The runtimes the client offers, in ``backend="auto"`` order."""
    return sorted((r for r in RUNTIMES.values() if r.client), key=lambda r: r.client_priority)


def client_runtime(backend: str) -> Runtime:
    """The runtime behind the client's ``backend=`` name.

    Raises:
        ConfigError: no runtime has that client name.
    """
    for runtime in client_runtimes():
        if runtime.client == backend:
            return runtime
    raise ConfigError(f"backend={backend!r} is not one of {['auto', *(r.client for r in client_runtimes())]}.",
                      hint="Use 'auto' (default).")
