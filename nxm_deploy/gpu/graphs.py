"""One CUDA graph per input shape: capture once, then replay (no per-kernel launch or cuSPARSELt setup cost).

A 6-layer encoder at batch 1 launches a few hundred small kernels; launched one by one from Python, their launch
cost is the latency. A CUDA graph records the launches of one forward at one input shape and replays them with
one call. Inputs are copied into the graph's static input tensors; the output is the graph's static output,
cloned before it is returned (the next replay overwrites it).

Shapes beyond ``max_graphs`` (e.g. a dev set padded to many lengths) run eagerly; ``eager_calls`` counts them.
A forward that cannot be captured (a host synchronization inside), or whose first replay differs from the
eager result, falls back to eager for good, and ``capture_error`` says why.

Capture runs in CUDA's ``relaxed`` error mode: cuSPARSELt sets up its matmul plan (host calls, possibly an
allocation) inside every ``torch._cslt_sparse_mm`` call, which the default ``global`` mode refuses; the kernels
it then launches are what the graph records. The replay check guards the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("nxm_deploy.gpu")


class GraphedForward:
    """``fn(**inputs) -> Tensor`` replayed from a CUDA graph per input shape.

    Args:
        fn: a pure function of CUDA tensors returning one tensor (e.g. ``lambda **kw: model(**kw).logits``).
        max_graphs: graphs kept (one per distinct set of input shapes); further shapes run eagerly.
        warmup: eager calls on a side stream before capture (cuBLAS / cuSPARSELt workspaces, lazy init).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], max_graphs: int = 32, warmup: int = 2,
                 capture_error_mode: str = "relaxed"):
        self.fn, self.max_graphs, self.warmup, self.capture_error_mode = fn, max_graphs, max(1, warmup), capture_error_mode
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}
        self.capture_error: str | None = None
        self.eager_calls = 0

    @property
    def graphs(self) -> int:
        """Graphs captured so far."""
        return len(self._graphs)

    def _capture(self, inputs: dict[str, torch.Tensor]):
        static = {k: v.clone() for k, v in inputs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                ref = self.fn(**static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode=self.capture_error_mode):
            out = self.fn(**static)
        graph.replay()
        torch.cuda.synchronize()
        scale = float(ref.detach().float().abs().max()) + 1e-6
        err = float((out.detach().float() - ref.detach().float()).abs().max())
        if not err <= 1e-2 * scale:
            raise RuntimeError(f"graph replay differs from the eager result (max |diff| {err:.3g}, max |ref| {scale:.3g})")
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
