"""ONNX export of a run: dense FP32 and sparse INT8 with QuantizeLinear/DequantizeLinear, guarded and checked.

Uses the TorchScript exporter (``dynamo=False``), which keeps torch fake-quant ops as single
QuantizeLinear/DequantizeLinear pairs (environment-notes 5: the dynamo exporter fails on fake-quant with grad
enabled). Inputs ``input_ids``, ``attention_mask`` (+ ``token_type_ids`` when the model has them), output
``logits``; dynamic axes ``batch_size`` and ``sequence_length``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nxm_deploy.fileio import sha256_file, write_onnx
from nxm_deploy.export.parity import logit_stats
from nxm_deploy.errors import ExportError

log = logging.getLogger("nxm_deploy.export")



class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *args):
        return self.model(**dict(zip(self.input_names, args))).logits


def model_input_names(tokenizer, model: nn.Module | None = None) -> list[str]:
    """``input_ids``, ``attention_mask`` and, when the tokenizer makes them and ``model`` uses them, ``token_type_ids``
    (DistilBERT's forward does not take them; DeBERTa-v2 with ``type_vocab_size`` 0 ignores them, so the exported
    graph has no such input; a causal LM reads one token stream: never)."""
    import inspect

    from nxm_deploy.models import is_causal_lm_class

    names = ["input_ids", "attention_mask"]
    takes = model is None or ("token_type_ids" in inspect.signature(model.forward).parameters
                              and getattr(model.config, "type_vocab_size", 1) != 0
                              and not is_causal_lm_class(type(model).__name__))
    if "token_type_ids" in getattr(tokenizer, "model_input_names", []) and takes:
        names.append("token_type_ids")
    return names


def _weight_digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def layer_map_for(onnx_model, model: nn.Module, module_names: list[str]) -> dict[str, str]:
    """Map ONNX initializer name -> torch module fqn, by matching weight contents (as stored or transposed).

    Content matching works whatever names the exporter gives (``onnx::MatMul_123`` for a folded transpose,
    the parameter name in front of a QuantizeLinear).
    """
    from onnx import numpy_helper

    wanted = {}
    for name in module_names:
        w = model.get_submodule(name).weight.detach().float().numpy()
        wanted[_weight_digest(w)] = name
        wanted[_weight_digest(w.T)] = name
    mapping = {}
    for init in onnx_model.graph.initializer:
        if init.data_type != 1 or len(init.dims) != 2:  # float32 matrices only
            continue
        name = wanted.get(_weight_digest(numpy_helper.to_array(init)))
        if name is not None:
            mapping[init.name] = name
    return mapping


def export_model(
    model: nn.Module, sample: dict[str, torch.Tensor], path: str | Path, *, opset: int = 17
) -> Path:
    """Export ``model`` (HF sequence classifier or causal LM, eval mode) to ``path`` atomically.

    Args:
        model: returns ``.logits`` ``[B, C]`` float32 (a causal LM: ``[B, L, vocab]``, all positions, no KV cache).
        sample: example inputs, int64 ``[B, L]`` each, in :func:`model_input_names` order.
        path: target ``.onnx`` file (weights external when over 2 GB).
        opset: ONNX opset, >= 13 for per-channel QuantizeLinear.

    Raises:
        ExportError: when the exporter fails.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(sample)
    wrapper = _LogitsOnly(model, names).eval()
    dynamic_axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    traced = path.with_name(f".{path.name}.{os.getpid()}.traced")
    try:
        with torch.no_grad():  # a causal LM's logits [B, L, vocab] have a sequence axis too
            rank = wrapper(*(sample[n] for n in names)).ndim
        dynamic_axes["logits"] = {0: "batch_size", 1: "sequence_length"} if rank == 3 else {0: "batch_size"}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, tuple(sample[n] for n in names), str(traced), input_names=names, output_names=["logits"],
                dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        write_onnx(onnx.load(str(traced)), path, check=lambda tmp: onnx.checker.check_model(str(tmp)))
    except Exception as exc:
        raise ExportError(f"ONNX export to {path} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    finally:
        traced.unlink(missing_ok=True)
    return path


def save_model(proto, path: str | Path) -> Path:
    """Write an ONNX ``proto`` to ``path`` atomically (:func:`nxm_deploy.fileio.write_onnx`, without a check)."""
    return write_onnx(proto, path)


def guard_qdq(onnx_model, expected_quantized: int) -> dict:
    """Check a Q/DQ export: fake quant not decomposed, zero points int8 0, scales positive finite.

    Args:
        expected_quantized: number of quantized Linear layers; each must have one per-channel weight
            QuantizeLinear. Activation Q/DQ may be fewer than one per layer: the exporter merges identical
            input quantizers of layers that read the same tensor (e.g. Q, K, V).

    Returns:
        dict: counts of QuantizeLinear / DequantizeLinear and per-channel weight quantizers.

    Raises:
        ExportError: naming every node that breaks a rule.
    """
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in onnx_model.graph.initializer}
    for node in onnx_model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    problems = []
    ops = [n.op_type for n in onnx_model.graph.node]
    quant = [n for n in onnx_model.graph.node if n.op_type == "QuantizeLinear"]
    dequant = [n for n in onnx_model.graph.node if n.op_type == "DequantizeLinear"]
    if "Round" in ops:
        problems.append("graph contains Round: fake quantization was decomposed instead of exported as Q/DQ")
    per_channel, per_channel_q = 0, 0
    for node in quant + dequant:
        scale = consts.get(node.input[1])
        zero = consts.get(node.input[2]) if len(node.input) > 2 else None
        if scale is None:
            problems.append(f"{node.name}: scale is not a constant")
        elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            problems.append(f"{node.name}: scale not positive finite")
        if zero is None or zero.dtype != np.int8 or np.any(zero != 0):
            problems.append(f"{node.name}: zero point must be int8 0, got {None if zero is None else (zero.dtype, zero.ravel()[:3])}")
        per_channel_scale = scale is not None and scale.ndim == 1 and scale.size > 1
        if per_channel_scale and node.op_type == "QuantizeLinear":
            per_channel += 1  # a float weight quantized in the graph
            per_channel_q += 1
        elif per_channel_scale and node.input[0] in consts and consts[node.input[0]].dtype == np.int8:
            per_channel += 1  # INT8 weight codes read by a DequantizeLinear (store_int8_weights)
    if per_channel != expected_quantized:
        problems.append(f"{per_channel} per-channel weight quantizers, expected {expected_quantized} (one per quantized Linear)")
    if len(quant) <= per_channel_q:
        problems.append("no activation QuantizeLinear: inputs of the quantized Linear layers are not quantized")
    if problems:
        raise ExportError("Q/DQ guard failed: " + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))
    return {"quantize_linear": len(quant), "dequantize_linear": len(dequant), "per_channel_weight_quantizers": per_channel,
            "int8_weight_initializers": per_channel - per_channel_q}


def onnx_parity(path: str | Path, model: nn.Module, loader, input_names: list[str], task,
                tie_margin: float = 0.0, noise_floor: bool = False) -> dict:
    """ONNX Runtime vs PyTorch on every batch of ``loader`` (real dev examples).

    Args:
        path: exported ``.onnx``; model: its PyTorch twin (fake-quant in :func:`export_mode` for INT8).
        loader: yields dicts of int64 ``[B, L]`` tensors plus ``labels``.
        input_names: model inputs to feed. task: registry task (for the metric).
        tie_margin: examples whose PyTorch top-2 logit margin is at or below it are left out of
            ``argmax_agreement_decisive`` (a class flip on a numerical tie is not a disagreement).
        noise_floor: also run an FP64 copy of the twin and raise ``tie_margin`` to its measured noise
            (:func:`nxm_deploy.export.parity.noise_tie_margin`; INT8 models). Holds a second copy of the model.

    Returns:
        dict: ``max_abs_diff`` (logits), ``argmax_agreement`` (fraction, classification; None for regression;
        a causal LM's: per next-token position), ``argmax_agreement_decisive`` (the same over the examples that are
        not ties), ``near_ties`` (examples left out), ``tie_margin`` (the one used), ``metric_torch`` and
        ``metric_ort`` (task metrics both ways), ``examples``; with ``noise_floor`` also ``noise_floor`` (the FP32
        twin vs its FP64 copy: ``max_abs_diff``, ``mean_abs_diff``, ``argmax_agreement``, ``tie_margin``).
    """
    from nxm_deploy.data.metrics import compute_metrics
    from nxm_deploy.export.parity import noise_tie_margin
    from nxm_deploy.ort import make_session
    from nxm_deploy.quantization.fake_quant import float64_copy

    session = make_session(path)
    twin64 = float64_copy(model) if noise_floor else None
    ort_logits, torch_logits, fp64_logits, labels = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            feeds = {k: batch[k].numpy() for k in input_names}
            ort_logits.append(session.run(["logits"], feeds)[0])
            torch_logits.append(model(**{k: batch[k] for k in input_names}).logits.numpy())
            if twin64 is not None:
                fp64_logits.append(twin64(**{k: batch[k] for k in input_names}).logits.numpy())
            labels.append(batch["labels"].numpy())
    a, b, y = np.concatenate(ort_logits), np.concatenate(torch_logits), np.concatenate(labels)
    noise = None
    if twin64 is not None:
        noise = noise_tie_margin(b, np.concatenate(fp64_logits), floor=tie_margin)
        tie_margin = noise["tie_margin"]
    out = {"examples": int(len(y)), **logit_stats(b, a, tie_margin),
           "metric_torch": compute_metrics(task, b, y), "metric_ort": compute_metrics(task, a, y)}
    if noise is not None:
        out["noise_floor"] = noise
    return out


def file_record(path: Path) -> dict:
    """Name, size and sha256 of an artifact."""
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
