"""ONNX Runtime: the run's ONNX models on the CPU (``onnxruntime-cpu``) and, with ``onnxruntime-gpu`` and a GPU, on
its CUDA and TensorRT execution providers (``onnxruntime-cuda``, ``onnxruntime-tensorrt``).

:class:`OnnxRuntimeRunner` is Polygraphy's own ``OnnxrtRunner`` on a session built with our thread settings and
execution providers (:func:`nxm_deploy.ort.make_session`). ORT copies outputs to the host inside ``run``, so the
measured time includes the device synchronization. ``InferenceSession.run`` is thread-safe (documented by ONNX
Runtime): the client shares one session between threads, no lock.

The functions below are this runtime's roles in :data:`nxm_deploy.runtimes.RUNTIMES` (the template of a runtime
module): ``validation_runners``, ``client_artifact``, ``open_client``.
"""

from __future__ import annotations

import functools
from pathlib import Path

from polygraphy.backend.onnxrt import OnnxrtRunner

from nxm_deploy.errors import ConfigError, RunDirError, ValidationError
from nxm_deploy.ort import make_session
from nxm_deploy.runtimes.base import LabelledRunner, RuntimeInputs

#: ONNX Runtime execution providers per runtime name (the CPU provider is appended as fallback on the GPU ones)
ORT_BACKENDS = {
    "onnxruntime-cpu": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider"],
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
}
#: runner-name suffix of a model on a GPU execution provider (``sparse_int8_cuda``)
GPU_SUFFIX = {"onnxruntime-cuda": "cuda", "onnxruntime-tensorrt": "trtep"}
#: inputs an exported classifier may take (the client refuses other models)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_label(name: str, pattern: str) -> str:
    """The report's name of a run's ONNX model (:func:`nxm_deploy.run.reader.export_models` names)."""
    from nxm_deploy.export.ort_peer import DENSE_FP32_OPT, DENSE_INT8_DYNAMIC

    return {"dense_fp32": "dense FP32 ONNX", "sparse_int8": f"sparse {pattern} INT8 Q/DQ ONNX",
            "cpu_int8": f"sparse {pattern} INT8 CPU ONNX (U8S8 MatMulInteger)",
            DENSE_FP32_OPT: "peer: dense FP32 ONNX, ORT transformer optimizer",
            DENSE_INT8_DYNAMIC: "peer: dense INT8 ONNX, ORT optimizer + quantize_dynamic"}.get(name, name)


class OnnxRuntimeRunner(LabelledRunner, OnnxrtRunner):
    """Polygraphy's ``OnnxrtRunner`` on a session made with our thread settings and providers.

    Args:
        path: ``.onnx`` file, or the model's bytes (already hash-checked by the caller: the client).
        name: runner name (a key of ``validation.json``).
        backend: a key of :data:`ORT_BACKENDS`.
        intra_op_threads: ORT intra-op threads (default: :func:`nxm_deploy.ort.make_session`'s, the cores this
            process may use); the session's count once active.
        precision / sparse / label: labels. source: the file the bytes came from (label only).
        providers: explicit ONNX Runtime execution providers (the client's ``providers=``); the backend label
            follows the first one.

    Raises:
        ConfigError: the file is missing or the backend unknown.
        ValidationError (on activate): a GPU backend whose provider ONNX Runtime did not load.
    """

    def __init__(self, path: str | Path | bytes, name: str, *, backend: str = "onnxruntime-cpu",
                 intra_op_threads: int | None = None, precision: str = "fp32", sparse: bool = False,
                 source: str | Path | None = None, providers: list[str] | None = None, peer: bool = False,
                 label: str | None = None):
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
        self.intra_op_threads = intra_op_threads  # None: make_session's default; the session's own once active
        OnnxrtRunner.__init__(self, functools.partial(make_session, path, self.providers, intra_op_threads), name=name)
        self._set_labels(backend, precision, sparse, source if source is not None else self.path, label)
        self.peer = bool(peer)

    def activate_impl(self):
        self.sess = self._sess()  # what OnnxrtRunner.activate_impl does, plus the provider check
        self.intra_op_threads = self.sess.get_session_options().intra_op_num_threads
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


def provider_offered(backend: str) -> bool:
    """Whether this ONNX Runtime build offers ``backend``'s execution provider (GPU ones: ``onnxruntime-gpu``)."""
    try:
        import onnxruntime as ort

        return ORT_BACKENDS[backend][0] in ort.get_available_providers()
    except Exception:  # noqa: BLE001 - no ORT: no provider
        return False


def _gpu_visible() -> bool:
    try:
        from nxm_deploy.engine.trt import probe_gpu

        return probe_gpu()[0] is not None
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------------------------- roles


def validation_runners(inputs: RuntimeInputs, runtime) -> tuple[dict, list[dict]]:
    """The run's ONNX models on ``runtime`` (inactive runners) and what was skipped, with the reason.

    CPU: every model (the peers of :mod:`nxm_deploy.export.ort_peer` too, marked ``peer``; a peer the export could
    not build is listed as skipped). GPU providers: every model but the CPU-specific graphs (``cpu_int8``, the
    peers), named ``<model>_cuda`` / ``<model>_trtep``, where the provider is offered and a GPU is visible.
    """
    models = inputs.onnx_models
    if runtime.name == "onnxruntime-cpu":
        runners = {name: OnnxRuntimeRunner(m["path"], name, intra_op_threads=inputs.intra_op_threads,
                                           precision=m["precision"], sparse=m["sparse"], peer=m.get("peer", False),
                                           label=model_label(name, inputs.pattern)) for name, m in models.items()}
        skipped = [{"name": name, "reason": record["error"]}
                   for name, record in (inputs.export_manifest.get("ort_peers") or {}).items() if "error" in record]
        return runners, skipped
    if not provider_offered(runtime.name):
        return {}, []
    if not _gpu_visible():
        return {}, [{"name": f"{runtime.label} runners",
                     "reason": "onnxruntime-gpu is installed but no GPU is visible"}]
    from nxm_deploy.run.reader import CPU_INT8_MODEL

    runners = {}
    for name, m in models.items():
        if name == CPU_INT8_MODEL or m.get("peer"):  # the CPU-specific graphs
            continue
        runner_name = f"{name}_{GPU_SUFFIX[runtime.name]}"
        runners[runner_name] = OnnxRuntimeRunner(m["path"], runner_name, backend=runtime.name,
                                                 precision=m["precision"], sparse=m["sparse"],
                                                 label=model_label(name, inputs.pattern))
    return runners, []


#: what the client calls this runtime's artifact
CLIENT_ARTIFACT = "exported ONNX model"
def client_artifact(artifacts, required: bool = False) -> Path:
    """The ONNX file the client runs (every exported run has one)."""
    return artifacts.onnx_path


def open_client(artifacts, options: dict):
    """An active runner of ``artifacts``' ONNX model for the client, and a one-line description.

    ``options``: ``verify_hashes``, ``intra_op_threads``, ``providers``. A model with external data is loaded
    from its path; else from the hash-checked bytes.

    Raises:
        RunDirError: the model's file differs from its recorded sha256, or its inputs/outputs are not those of an
            exported classifier.
    """
    import onnxruntime as ort

    from nxm_deploy.run.reader import read_verified

    path = artifacts.onnx_path
    data = read_verified(path, artifacts.onnx_sha256 if options.get("verify_hashes", True) else None)
    external = path.with_name(path.name + ".data").is_file()
    runner = OnnxRuntimeRunner(path if external else data, path.name, intra_op_threads=options.get("intra_op_threads"),
                               providers=options.get("providers"), source=path.name)
    runner.activate()
    inputs, outputs = list(runner.input_names), runner.output_names()
    if [n for n in inputs if n not in MODEL_INPUTS] or "logits" not in outputs:
        runner.deactivate()
        raise RunDirError(f"ONNX model {path.name} has inputs {inputs} and outputs {outputs}; expected inputs among "
                          f"{list(MODEL_INPUTS)} and an output 'logits'.", hint="Use a model exported by `nxm-deploy export`.")
    return runner, (f"onnxruntime {ort.__version__} {runner.sess.get_providers()[0]}, {runner.intra_op_threads} "
                    "intra-op threads")
