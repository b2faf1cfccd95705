"""PyTorch: the run's models as Hugging Face modules, on the CPU (``pytorch-cpu``: the output diff's references) and
on an NVIDIA GPU (``pytorch-cuda``: FP16, 2:4 on cuSPARSELt, INT8, replayed from CUDA graphs; :mod:`nxm_deploy.gpu`).

Polygraphy's ``PytRunner`` hard-codes ``.cuda()`` and returns a tuple from ``infer_impl``, so it cannot run on the
CPU: :class:`TorchRunner` is ours. On CUDA it times with CUDA events.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from nxm_deploy.errors import ValidationError
from nxm_deploy.runtimes.base import LabelledRunner, RuntimeInputs

#: the output diff's PyTorch references (CPU): runner name -> what the report calls it
FAKEQUANT_FP64 = "torch_int8_fakequant_fp64"
#: PyTorch CUDA runners: name -> (training stage whose model it runs, variant); the dense FP16 one is their latency
#: baseline
CUDA_RUNNERS = {"torch_cuda_dense_fp16": ("dense", "dense-fp16"), "torch_cuda_sparse_fp16": ("admm", "sparse-fp16"),
                "torch_cuda_sparse_int8": ("qat", "sparse-int8")}


def runner_label(name: str, pattern: str) -> str:
    """The report's name of a PyTorch runner of this module."""
    return {"torch_dense_fp32": "dense FP32 (PyTorch)", "torch_int8_fakequant": f"sparse {pattern} INT8 fake-quant (PyTorch)",
            FAKEQUANT_FP64: f"sparse {pattern} INT8 fake-quant in FP64 (PyTorch)",
            "torch_qat_fp32": f"sparse {pattern} QAT weights, quantizers off (PyTorch)",
            "torch_cuda_dense_fp16": "dense FP16 (PyTorch CUDA, CUDA graphs)",
            "torch_cuda_sparse_fp16": f"sparse {pattern} FP16 (PyTorch CUDA, cuSPARSELt, CUDA graphs)",
            "torch_cuda_sparse_int8": f"sparse {pattern} INT8 (PyTorch CUDA, cuSPARSELt, CUDA graphs)"}.get(name, name)


class TorchRunner(LabelledRunner, BaseRunner):
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
                 context: Callable | None = None, precision: str = "fp32", sparse: bool = False, source=None,
                 label: str | None = None):
        BaseRunner.__init__(self, name=name, prefix="pytorch-runner")
        self._model = model
        self._model_inputs = list(input_names)  # not _input_names: LabelledRunner caches (and drops) that one
        self._device = device
        self._context = context
        self.model = None
        self._set_labels(f"pytorch-{'cuda' if device.startswith('cuda') else 'cpu'}", precision, sparse, source, label)

    def activate_impl(self):
        model = self._model() if callable(self._model) and not hasattr(self._model, "parameters") else self._model
        from nxm_deploy.quantization.placement import use_eager_attention

        use_eager_attention(model)
        model.eval().to(self._device)
        self.model = model

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name in self._model_inputs:
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
                 graphs: bool = True, attention: str = "sdpa", source=None, label: str | None = None):
        precision = "int8" if variant.endswith("int8") else "fp16"
        super().__init__(model, name, input_names, device="cuda", precision=precision,
                         sparse=variant.startswith("sparse"), source=source, label=label)
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




# --------------------------------------------------------------------------------------------- roles


def diff_runners(run_dir: str | Path, names: list[str], pattern: str) -> dict:
    """The PyTorch references of the output diff (inactive, on the CPU): dense FP32, the QAT model's fake-quant
    twin, the twin with its quantizers off and the twin in FP64 (:data:`FAKEQUANT_FP64`, its own rounding noise for
    the INT8 tolerance; a second, FP64 copy of the QAT model while it runs).

    Raises:
        RunDirError: a training stage has not finished, or its files differ from their manifest.
    """
    from nxm_deploy.quantization.fake_quant import float64_copy
    from nxm_deploy.run.reader import load_qat_model, load_stage_model, stage_dir

    dense, _ = load_stage_model(run_dir, "dense")
    qat, _, _ = load_qat_model(run_dir)
    qat_dir = stage_dir(run_dir, "qat")

    def make(name, model, **kw):
        return TorchRunner(model, name, names, source=kw.pop("source", qat_dir), label=runner_label(name, pattern), **kw)

    return {
        "torch_dense_fp32": make("torch_dense_fp32", dense, source=stage_dir(run_dir, "dense")),
        "torch_int8_fakequant": make("torch_int8_fakequant", qat, precision="int8", sparse=True),
        "torch_qat_fp32": make("torch_qat_fp32", qat, context=quantizers_disabled, sparse=True),
        FAKEQUANT_FP64: make(FAKEQUANT_FP64, lambda: float64_copy(qat), precision="int8", sparse=True),
    }


def validation_runners(inputs: RuntimeInputs, runtime) -> tuple[dict, list[dict]]:
    """``pytorch-cuda``: the run's models on the GPU (:class:`TorchCudaRunner`, inactive) when CUDA is available:
    dense FP16 (the baseline), 2:4 FP16 and 2:4 INT8 (cuSPARSELt, the QAT model's learned scales); else
    ``({}, [skipped entry])``."""
    import torch

    if not torch.cuda.is_available():
        return {}, [{"name": f"{runtime.label} runners", "reason": "no CUDA device (torch.cuda.is_available() is False)"}]
    from nxm_deploy.run.reader import load_qat_model, load_stage_model, read_stage_manifest, stage_dir

    run_dir = inputs.run_dir
    targets = list(read_stage_manifest(run_dir, "admm")["targets"])
    loaders = {"dense": lambda: load_stage_model(run_dir, "dense")[0],
               "admm": lambda: load_stage_model(run_dir, "admm")[0],
               "qat": lambda: load_qat_model(run_dir)[0]}
    return {name: TorchCudaRunner(loaders[stage], name, inputs.input_names, variant=variant, targets=targets,
                                  source=stage_dir(run_dir, stage), label=runner_label(name, inputs.pattern))
            for name, (stage, variant) in CUDA_RUNNERS.items()}, []
