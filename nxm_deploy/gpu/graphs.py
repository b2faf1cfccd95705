"""One CUDA graph per input shape: capture once, then replay (no per-kernel launch or cuSPARSELt setup cost).

A 6-layer encoder at batch 1 launches a few hundred small kernels; launched one by one from Python, their launch
cost is the latency. A CUDA graph records the launches of one forward at one input shape and replays them with
one call. Inputs are copied into the graph's static input tensors; the output is the graph's static output,
cloned before it is returned (the next replay overwrites it).

Shapes beyond ``max_graphs`` (e.g. a dev set padded to many lengths) run eagerly; ``eager_calls`` counts them.
A forward that cannot be captured (a host synchronization inside), or whose first replay differs from the
eager result, falls back to eager for good, and ``capture_error`` says why. Hugging Face models synchronize while
turning a 2-D padding mask into the 4-D one; :func:`hf_forward` passes the 4-D mask instead.

Measured on an H200 (torch 2.11, cuSPARSELt 0.8, ``benchmarks/gpu_h200.md``): one eager ``torch._cslt_sparse_mm``
call costs about 200-300 ms of host time in FP16 and about 1 ms in INT8 (the plan is built and destroyed in every
call), so a sparse model is only usable replayed from a graph; a graph capture pays that set-up once per layer.

Capture runs in CUDA's ``relaxed`` error mode: cuSPARSELt sets up its matmul plan (host calls, possibly an
allocation) inside every ``torch._cslt_sparse_mm`` call, which the default ``global`` mode refuses; the kernels
it then launches are what the graph records. The replay check guards the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("nxm_deploy.gpu")


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 2-D padding mask ``[B, L]`` (1 keep, 0 pad) as the 4-D additive float mask ``[B, 1, L, L]`` (0 keep,
    ``finfo(dtype).min`` pad) that transformers' eager and SDPA attention add to the scores.

    Hugging Face models take a 4-D mask as given; from a 2-D one they build it with a data-dependent shortcut
    (``attention_mask.all()``, a device-to-host copy), which a CUDA graph cannot record. Pure tensor ops here.
    """
    batch, length = attention_mask.shape
    pad = (1 - attention_mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min
    return pad.expand(batch, 1, length, length)


def hf_forward(model: torch.nn.Module, output: str = "logits", dtype: torch.dtype = torch.float16) -> Callable[..., torch.Tensor]:
    """``fn(**inputs) -> model(**inputs).<output>`` with the 2-D ``attention_mask`` turned into the 4-D additive mask
    first (:func:`additive_mask`), so the whole forward can be captured in a CUDA graph."""

    def forward(**inputs: torch.Tensor) -> torch.Tensor:
        if "attention_mask" in inputs and inputs["attention_mask"].ndim == 2:
            inputs = {**inputs, "attention_mask": additive_mask(inputs["attention_mask"], dtype)}
        return getattr(model(**inputs), output)

    return forward


CAPTURE_ERROR_MODE = "relaxed"  # see the module docstring


def capture(fn: Callable[[], torch.Tensor | None], warmup: int = 1,
            capture_error_mode: str = CAPTURE_ERROR_MODE) -> tuple[torch.cuda.CUDAGraph, object, object]:
    """Record ``fn()`` in a CUDA graph: ``warmup`` eager calls on a side stream first (lazy library init off the
    capture), then one captured call. Returns ``(graph, captured output, last warm-up output or None)``.

    Raises:
        RuntimeError: the call cannot be captured (e.g. a host synchronization inside).
    """
    ref = None
    if warmup:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                ref = fn()
        torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=capture_error_mode):
        out = fn()
    return graph, out, ref


class GraphedForward:
    """``fn(**inputs) -> Tensor`` replayed from a CUDA graph per input shape.

    Args:
        fn: a pure function of CUDA tensors returning one tensor, with no host synchronization inside (for a
            Hugging Face model: :func:`hf_forward`).
        max_graphs: graphs kept (one per distinct set of input shapes); further shapes run eagerly.
        warmup: eager calls on a side stream before the first capture (cuBLAS / cuSPARSELt lazy init); later
            captures need none. 0 skips them (and the replay check) when ``fn``'s libraries are initialized and
            an eager call is costly (cuSPARSELt sets up its plan on the host at every eager call).
        capture_error_mode: CUDA's stream-capture error mode (see the module docstring).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], max_graphs: int = 32, warmup: int = 1,
                 capture_error_mode: str = CAPTURE_ERROR_MODE):
        self.fn, self.max_graphs, self.warmup, self.capture_error_mode = fn, max_graphs, warmup, capture_error_mode
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}
        self.capture_error: str | None = None
        self.eager_calls = 0
        self.replay_checked = False

    @property
    def graphs(self) -> int:
        """Graphs captured so far."""
        return len(self._graphs)

    def _capture(self, inputs: dict[str, torch.Tensor]):
        static = {k: v.clone() for k, v in inputs.items()}
        warmup = self.warmup if not self._graphs else 0  # the first capture: lazy init off the capture, a reference
        graph, out, ref = capture(lambda: self.fn(**static), warmup, self.capture_error_mode)
        graph.replay()
        torch.cuda.synchronize()
        if ref is not None:
            scale = float(ref.detach().float().abs().max()) + 1e-6
            err = float((out.detach().float() - ref.detach().float()).abs().max())
            if not err <= 1e-2 * scale:
                raise RuntimeError(f"graph replay differs from the eager result (max |diff| {err:.3g}, max |ref| {scale:.3g})")
            self.replay_checked = True
        return graph, static, out

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()))
        entry = self._graphs.get(key)
        if entry is None:
            if self.capture_error is not None or len(self._graphs) >= self.max_graphs:
                self.eager_calls += 1
                return self.fn(**inputs)
            try:
                entry = self._graphs[key] = self._capture(inputs)
            except RuntimeError as exc:  # e.g. "operation not permitted when stream is capturing"
                self.capture_error = str(exc).splitlines()[0][:300]
                log.warning("CUDA graph capture failed, running eagerly: %s", self.capture_error)
                torch.cuda.synchronize()
                self.eager_calls += 1
                return self.fn(**inputs)
        graph, static, out = entry
        for k, v in inputs.items():
            static[k].copy_(v)
        graph.replay()
        return out.clone()


def bucket_feed(feed: dict, seq_multiple: int = 32) -> tuple[dict, int]:
    """Pad a feed of integer ``[B, L]`` arrays to few distinct shapes, so few graphs serve a dev set of many lengths.

    ``L`` goes up to a multiple of ``seq_multiple`` (new positions: token 0, ``attention_mask`` 0; only when the
    feed has an ``attention_mask``, else ``L`` is kept), ``B`` up to a power of two (new rows repeat the last row).
    Padded positions are masked and padded rows are dropped by the caller, so the kept logits are those of the
    unpadded feed. Returns ``(padded feed, B)``.
    """
    import numpy as np

    arrays = {k: np.asarray(v) for k, v in feed.items()}
    batch, length = next(iter(arrays.values())).shape
    target_len = -(-length // seq_multiple) * seq_multiple if "attention_mask" in arrays else length
    target_batch = 1 << max(0, (batch - 1).bit_length())
    out = {}
    for k, v in arrays.items():
        if target_len > length:
            v = np.pad(v, ((0, 0), (0, target_len - length)))
        if target_batch > batch:
            v = np.concatenate([v, np.repeat(v[-1:], target_batch - batch, axis=0)])
        out[k] = v
    return out, batch
