"""Micro-batching: group single requests from many threads into one model call.

A :class:`MicroBatcher` owns one worker thread. :meth:`MicroBatcher.submit` checks the input at once (a bad
request fails alone, in the caller) and queues it; the worker takes the first waiting request, then waits at
most ``max_wait_ms`` for more, up to ``max_batch_size``, and runs them as one batch through
:meth:`TextClassifier.infer_items`. Each caller gets a ``concurrent.futures.Future``.

Batching trades a little latency (at most ``max_wait_ms``) for throughput when many callers send one input
each. Results equal those of ``client.predict`` up to float rounding: a row's logits can differ in the last
bits when it is padded to a different length inside a different batch.

On a small CPU with ONNX Runtime, padding mixed-length inputs to the longest of the batch usually costs more
than batching saves (``tools/bench_client.py`` shows it); prefer calling the shared client from each thread
there, and use the batcher for GPUs (TensorRT) or inputs of similar length.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from nxm_deploy.client.classifier import TextClassifier
from nxm_deploy.client.tokenization import Item
from nxm_deploy.errors import ConfigError

log = logging.getLogger("nxm_deploy.client")

_STOP = object()


@dataclass
class _Request:
    item: Item
    truncation: bool
    future: Future


class MicroBatcher:
    """Group concurrent single requests into batches of up to ``max_batch_size``, waiting up to ``max_wait_ms``.

    Args:
        client: the :class:`TextClassifier` to run (not closed by the batcher).
        max_batch_size: most requests per model call (>= 1).
        max_wait_ms: how long the first request of a batch waits for company (>= 0; 0 = take what is queued).

    Attributes:
        stats (dict): ``requests``, ``batches`` and ``max_batch`` seen so far.

    Example::

        with TextClassifier.from_artifacts(run) as client, MicroBatcher(client, 16, 2.0) as batcher:
            result = batcher.predict(("premise", "hypothesis"))   # from any number of threads

    Raises:
        ConfigError: bad ``max_batch_size`` / ``max_wait_ms``.
    """

    def __init__(self, client: TextClassifier, max_batch_size: int = 32, max_wait_ms: float = 2.0):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError(f"max_batch_size={max_batch_size!r} must be an integer >= 1.")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not max_wait_ms >= 0:
            raise ConfigError(f"max_wait_ms={max_wait_ms!r} must be a number >= 0.")
        self.client = client
        self.max_batch_size = max_batch_size
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.stats = {"requests": 0, "batches": 0, "max_batch": 0}
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="nxm-microbatcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------ callers
    def submit(self, item, truncation: bool | None = None) -> Future:
        """Queue one input: a text, or a ``(text, text_pair)`` tuple.

        Args:
            item: exactly one input.
            truncation: override the client's default for this request (False: the future raises
                ConfigError when the input is too long).

        Returns:
            Future: resolves to the ``predict`` result dict of this input.

        Raises:
            ConfigError (a ValueError): a bad input (checked now), or the batcher is closed.
        """
        items = self.client.normalize(item if isinstance(item, str) else [item])
        request = _Request(items[0], self.client.truncation if truncation is None else bool(truncation), Future())
        with self._lock:
            if self._closed:
                raise ConfigError("This MicroBatcher is closed.")
            self._queue.put(request)
        return request.future

    def predict(self, item, truncation: bool | None = None, timeout: float | None = None) -> dict:
        """Blocking :meth:`submit`: the result dict of one input (exceptions re-raised here)."""
        return self.submit(item, truncation).result(timeout)

    # ------------------------------------------------------------------------------------------ worker
    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                request = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if request is _STOP:
                stop = True
                break
            batch.append(request)
        return batch, stop

    def _run(self, batch: list[_Request]) -> None:
        batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not batch:
            return
        self.stats["requests"] += len(batch)
        self.stats["batches"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
        try:
            logits, truncated = self.client.infer_items([r.item for r in batch], batch_size=len(batch))
            results = self.client.format_results(logits, truncated)
        except BaseException as exc:  # the model call failed: every request of the batch gets the error
            for request in batch:
                request.future.set_exception(exc)
            return
        for request, result in zip(batch, results):
            if result["truncated"] and not request.truncation:
                request.future.set_exception(ConfigError(
                    f"Input exceeds the model limit of {self.client.max_length} tokens and truncation=False.",
                    hint="Shorten the text or submit with truncation=True.",
                ))
            else:
                request.future.set_result(result)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            self._run(batch)
            if stop:
                return

    # ------------------------------------------------------------------------------------------ lifecycle
    def close(self, timeout: float | None = None) -> None:
        """Finish the queued requests, then stop the worker. Idempotent; later ``submit`` calls raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._worker.join(timeout)

    def __enter__(self) -> "MicroBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
