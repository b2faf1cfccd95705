"""``TextClassifier``: text in, labels out, from the artifacts of a run directory.

Imports neither torch nor transformers: tokenization uses the ``tokenizers`` library, inference ONNX Runtime
or a TensorRT engine (:mod:`nxm_deploy.engine.trt_runtime`, imported only when that backend is chosen).

Thread safety: one client may be shared by any number of threads. The tokenizer is configured once and only
read afterwards; the ONNX Runtime backend shares one session (``InferenceSession.run`` is thread-safe); the
TensorRT backend checks out one of ``trt_contexts`` execution contexts per call. A client gives the same
results whether called sequentially or concurrently. Only :meth:`TextClassifier.close` must not race with
calls in flight.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nxm_deploy.client.artifacts import RunArtifacts, load_artifacts
from nxm_deploy.client.tokenization import Item, TextEncoder, normalize_inputs
from nxm_deploy.errors import ConfigError, MissingDependencyError, RunDirError
from nxm_deploy.runtimes import Runtime, client_runtime, client_runtimes

log = logging.getLogger("nxm_deploy.client")

DEFAULT_BATCH_SIZE = 32


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1.", hint=f"Pass a positive {name}.")
    return int(value)


def choose_backend(requested: str, artifacts: RunArtifacts) -> tuple[Runtime, str]:
    """Pick the runtime for ``requested`` (``"auto"`` or a runtime's client name: ``"tensorrt"``, ``"onnxruntime"``).

    ``"auto"`` takes the first runtime, in ``client_priority`` order (TensorRT, then ONNX Runtime), whose artifact
    the run has for this model (a built engine made from the chosen ONNX file) and that can run here.

    Returns:
        (runtime, reason): the runtime and a one-line reason.

    Raises:
        ConfigError: unknown ``requested``.
        MissingDependencyError: the requested runtime cannot run here (its reason and install hint).
        RunDirError: the requested runtime's artifact is missing (e.g. no built engine for this model).
    """
    if requested != "auto":
        runtime = client_runtime(requested)
        reason = runtime.unavailable_reason()
        if reason is not None:
            raise MissingDependencyError(f"backend={requested!r} needs {runtime.label}: {reason}",
                                         hint=getattr(runtime.implementation(), "CLIENT_HINT", None))
        runtime.function("client_artifact")(artifacts, required=True)
        return runtime, "requested"
    passed = []
    for runtime in client_runtimes():
        artifact = runtime.function("client_artifact")(artifacts)
        if artifact is None:
            passed.append(f"no {getattr(runtime.implementation(), 'CLIENT_ARTIFACT', runtime.label)} for this model")
            continue
        reason = runtime.unavailable_reason()
        if reason is not None:
            passed.append(f"{Path(artifact).name} present but {reason}")
            continue
        return runtime, "auto: " + "; ".join([*passed, Path(artifact).name])
    raise MissingDependencyError("No runtime of the client can run this model here: " + "; ".join(passed))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class TextClassifier:
    """Classify texts or text pairs with a run's deployed model. Build it with :meth:`from_artifacts`.

    Use as a context manager (or call :meth:`close`). Safe to share between threads (see the module doc).

    Attributes:
        artifacts (RunArtifacts): what was read from the run directory.
        backend (str): the runtime's client name, ``"onnxruntime"`` or ``"tensorrt"``.
        file (str): the file it runs (the ONNX model or the engine plan).
        backend_reason (str): why that backend was chosen.
        labels (tuple[str, ...] | None): class names by class id; None for regression.
        max_length (int): longest input in tokens (model limit, capped by the engine profile).
        truncation (bool): default of ``predict(truncation=...)``.
        batch_size (int): default of ``predict(batch_size=...)``.
    """

    def __init__(self, artifacts: RunArtifacts, backend_impl, encoder: TextEncoder, *, backend_reason: str = "",
                 truncation: bool = True, batch_size: int = DEFAULT_BATCH_SIZE):
        self.artifacts = artifacts
        self._backend = backend_impl
        self._encoder = encoder
        self.backend = backend_impl.name
        self.file = backend_impl.runner.source  # the artifact it runs (its file name)
        self.backend_reason = backend_reason
        self.labels = artifacts.labels
        self.max_length = encoder.max_length
        self.truncation = bool(truncation)
        self.batch_size = _positive_int("batch_size", batch_size)
        self._pair_task = artifacts.is_pair_task
        self._close_lock = threading.Lock()

    @classmethod
    def from_artifacts(
        cls,
        path: str | Path,
        backend: str = "auto",
        model: str = "sparse_int8",
        *,
        truncation: bool = True,
        batch_size: int = DEFAULT_BATCH_SIZE,
        verify_hashes: bool = True,
        intra_op_threads: int | None = None,
        providers: list[str] | None = None,
        trt_contexts: int = 1,
    ) -> "TextClassifier":
        """Load the client for ``model`` of the run directory ``path``.

        Reads ``recipe.yaml`` (task, max sequence length), ``onnx/manifest.json`` (inputs, files, sha256),
        the tokenizer and ``engines/status.json``; checks the sha256 of the model file (and of the engine)
        against the manifest before loading the very bytes it checked.

        Args:
            path: run directory, e.g. ``runs/minilm_mrpc_2of4_int8``.
            backend: ``"auto"`` (TensorRT when an engine for ``model`` is built and TensorRT imports, else
                ONNX Runtime), ``"tensorrt"`` or ``"onnxruntime"``.
            model: ``"sparse_int8"`` (2:4 sparse INT8 Q/DQ model) or ``"dense"`` (FP32 baseline).
            truncation: default for calls: True truncates over-long inputs (flagged ``truncated`` in results),
                False raises.
            batch_size: default rows per model call (capped by the engine profile's max batch).
            verify_hashes: check sha256 against the manifest (default True).
            intra_op_threads: ONNX Runtime intra-op threads (default: CPU cores).
            providers: ONNX Runtime providers (default CPU).
            trt_contexts: TensorRT execution contexts, i.e. concurrent engine calls.

        Raises:
            ConfigError: unknown ``backend`` / ``model`` or a bad number.
            RunDirError: missing artifacts, or a file whose sha256 differs from the manifest (message names
                the file and both hashes), or a model whose outputs do not match the task's labels.
            MissingDependencyError: ``backend="tensorrt"`` without TensorRT / cuda-python.
        """
        from nxm_deploy.client.backends import RunnerBackend

        batch_size = _positive_int("batch_size", batch_size)
        trt_contexts = _positive_int("trt_contexts", trt_contexts)
        if intra_op_threads is not None:
            intra_op_threads = _positive_int("intra_op_threads", intra_op_threads)
        artifacts = load_artifacts(path, model)
        runtime, reason = choose_backend(backend, artifacts)
        options = {"verify_hashes": verify_hashes, "intra_op_threads": intra_op_threads, "providers": providers,
                   "trt_contexts": trt_contexts}
        impl = None
        while impl is None:
            try:
                impl = RunnerBackend(runtime, *runtime.function("open_client")(artifacts, options))
            except (MissingDependencyError, RunDirError, RuntimeError) as exc:
                fallback = next((r for r in client_runtimes() if r.client_priority > runtime.client_priority), None)
                if backend != "auto" or fallback is None:
                    raise
                reason = f"auto: {runtime.label} failed to load ({type(exc).__name__}: {exc}); using {fallback.client}"
                log.warning("%s", reason)
                runtime = fallback
        try:
            max_length = artifacts.max_length
            if impl.max_sequence_length is not None:
                max_length = min(max_length, impl.max_sequence_length)
            encoder = TextEncoder(artifacts.tokenizer_json, max_length, artifacts.tokenizer_config,
                                  impl.input_names, min_length=impl.min_sequence_length)
            client = cls(artifacts, impl, encoder, backend_reason=reason, truncation=truncation, batch_size=batch_size)
            client._check_outputs()
        except BaseException:
            impl.close()
            raise
        log.debug("client %s: %s (%s)", artifacts.run_dir, impl.name, reason)
        return client

    # ------------------------------------------------------------------------------------------ properties
    @property
    def is_regression(self) -> bool:
        """True when the model returns one score per input (:attr:`RunArtifacts.is_regression`)."""
        return self.artifacts.is_regression

    @property
    def closed(self) -> bool:
        return self._backend is None

    @property
    def info(self) -> dict:
        """JSON-ready description: run dir, task, model, backend (+ reason), file, sha256, limits, labels."""
        a = self.artifacts
        return {
            "run_dir": str(a.run_dir), "task": a.task, "model": a.model, "backend": self.backend,
            "backend_reason": self.backend_reason,
            "runtime": None if self._backend is None else self._backend.description,
            "onnx": a.onnx_path.name, "onnx_sha256": a.onnx_sha256,
            "engine": self.file if a.engine_path is not None and self.file == a.engine_path.name else None,
            "max_length": self.max_length, "labels": None if self.labels is None else list(self.labels),
        }

    @property
    def ort_session(self):
        """The underlying ``onnxruntime.InferenceSession`` (ONNX Runtime backend, open client), else None."""
        return getattr(self._backend, "session", None)

    def encode(self, inputs):
        """Tokenize ``inputs`` (checked as in :meth:`predict`) into one padded batch.

        Returns:
            Encoded: int64 ``feeds`` ``[N, L]`` by input name and bool ``truncated`` ``[N]``.
        """
        return self._encoder.encode(self.normalize(inputs))

    def _check_outputs(self) -> None:
        want = 1 if self.labels is None else len(self.labels)
        probe = self._encoder.encode(["probe"] if not self._pair_task else [("probe", "probe")])
        got = self._backend.run(probe.feeds)
        from nxm_deploy.models import logits_shape_problem  # the check validation makes too

        problem = logits_shape_problem(got.shape, want, next(iter(probe.feeds.values())).shape)
        if problem:
            raise RunDirError(
                f"Model {self.artifacts.onnx_path.name} of task {self.artifacts.task!r} returns {problem}.",
                hint="The run directory mixes artifacts of different runs; re-run export.",
            )

    # ------------------------------------------------------------------------------------------ inference
    def _require_open(self):
        backend = self._backend
        if backend is None:
            raise ConfigError("This TextClassifier is closed.", hint="Create a new one with TextClassifier.from_artifacts().")
        return backend

    def normalize(self, inputs) -> list[Item]:
        """Check ``inputs`` as ``predict`` does and return the list of items (``str`` or ``(str, str)``).

        Raises:
            ConfigError (a ValueError): see :func:`nxm_deploy.client.tokenization.normalize_inputs`.
        """
        return normalize_inputs(inputs, self._pair_task)

    def infer_items(self, items: Sequence[Item], batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Run already normalized items, truncating; the building block of ``predict`` and the micro-batcher.

        Returns:
            (logits, truncated): float32 ``[N, C]`` and bool ``[N]``.
        """
        backend = self._require_open()
        size = self.batch_size if batch_size is None else _positive_int("batch_size", batch_size)
        if backend.max_batch_size is not None:
            size = min(size, backend.max_batch_size)
        logits, truncated = [], []
        for start in range(0, len(items), size):
            encoded = self._encoder.encode(items[start:start + size])
            logits.append(np.asarray(backend.run(encoded.feeds), dtype=np.float32))
            truncated.append(encoded.truncated)
        return np.concatenate(logits), np.concatenate(truncated)

    def check_truncation(self, truncated: np.ndarray, truncation: bool | None) -> None:
        """Raise for truncated rows when truncation is off (``truncation`` None: the client's default).

        Args:
            truncated: bool ``[N]`` flags from :meth:`infer_items`.

        Raises:
            ConfigError: some row was truncated and truncation is False (the message lists the rows).
        """
        if (self.truncation if truncation is None else truncation) or not truncated.any():
            return
        rows = np.flatnonzero(truncated)
        raise ConfigError(
            f"input(s) {rows[:10].tolist()}{' ...' if len(rows) > 10 else ''} exceed the model limit of "
            f"{self.max_length} tokens and truncation=False.",
            hint="Shorten the text or pass truncation=True (the result then says truncated: true).",
        )

    def predict_logits(self, inputs, batch_size: int | None = None, truncation: bool | None = None) -> np.ndarray:
        """Raw model outputs.

        Args:
            inputs: a text, a ``(text, text_pair)`` tuple, or a list of them (see :meth:`predict`).
            batch_size: rows per model call (default: the client's).
            truncation: override the client's default (True: truncate, False: raise).

        Returns:
            np.ndarray: float32 ``[N, C]`` logits (``C`` = number of labels; 1 for regression), input order.

        Raises:
            ConfigError (a ValueError): bad inputs, or an over-long input with ``truncation=False``.
        """
        items = self.normalize(inputs)
        logits, truncated = self.infer_items(items, batch_size)
        self.check_truncation(truncated, truncation)
        return logits

    def predict(self, inputs, batch_size: int | None = None, truncation: bool | None = None) -> list[dict]:
        """Classify texts or text pairs.

        Args:
            inputs: one text ``"..."``; one pair ``("premise", "hypothesis")`` (a tuple of two strings); or a
                list of texts / pairs. Pair tasks (e.g. RTE) need pairs, single-sentence tasks plain texts.
            batch_size: rows per model call (default: the client's, capped by the engine profile).
            truncation: override the client's default. True: inputs over :attr:`max_length` tokens are cut
                (``longest_first`` for pairs) and reported ``truncated: True``; False: they raise.

        Returns:
            list[dict]: one per input, in order: ``{"label": str, "score": float, "scores": {label: prob},
            "truncated": bool}`` (``score`` = softmax probability of ``label``); for regression tasks
            ``{"label": None, "score": float (the predicted value), "scores": None, "truncated": bool}``.

        Raises:
            ConfigError (a ValueError): empty input, non-string input, a pair that is not two strings,
                singles for a pair task (or the reverse), a bad ``batch_size``, an over-long input with
                ``truncation=False``, or a closed client.
        """
        items = self.normalize(inputs)
        logits, truncated = self.infer_items(items, batch_size)
        self.check_truncation(truncated, truncation)
        return self.format_results(logits, truncated)

    def format_results(self, logits: np.ndarray, truncated: np.ndarray) -> list[dict]:
        """Turn logits ``[N, C]`` and truncation flags ``[N]`` into ``predict``'s result dicts."""
        if self.labels is None:
            return [{"label": None, "score": float(row[0]), "scores": None, "truncated": bool(t)}
                    for row, t in zip(logits, truncated)]
        probs = _softmax(logits)
        results = []
        for row, t in zip(probs, truncated):
            best = int(row.argmax())
            results.append({
                "label": self.labels[best], "score": float(row[best]),
                "scores": {label: float(p) for label, p in zip(self.labels, row)}, "truncated": bool(t),
            })
        return results

    # ------------------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Release the session / engine. Idempotent; later calls raise ConfigError."""
        with self._close_lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()

    def __enter__(self) -> "TextClassifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        a = self.artifacts
        state = "closed" if self.closed else self.backend
        return f"TextClassifier({str(a.run_dir)!r}, model={a.model!r}, backend={state!r}, task={a.task!r})"
