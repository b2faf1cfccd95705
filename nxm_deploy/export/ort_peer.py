"""ONNX Runtime's own best CPU path for the dense model: the peer a CPU deployment compares our INT8 artifact with.

A CPU user who does not use nxm-deploy takes the dense FP32 export and

1. runs ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer.optimize_model``: fused
   ``Attention``, ``SkipLayerNormalization``, ``BiasGelu``, ``EmbedLayerNormalization`` where the graph matches),
   giving ``dense_fp32_opt.onnx``;
2. quantizes that graph with ``onnxruntime.quantization.quantize_dynamic`` (INT8 weights per output channel, UINT8
   activations quantized at run time; fused ``Attention`` becomes ``QAttention``), giving
   ``dense_int8_dynamic.onnx``.

The export stage writes both next to our models (hash-recorded in ``onnx/manifest.json``, key ``ort_peers``), and
every validation with the CPU provider scores and times them in the same interleaved A/B as our models, so the
report states our CPU INT8 artifact's speed against the optimized FP32 graph and against ``quantize_dynamic``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("nxm_deploy.export")

#: file names of the two peer models in ``<run>/onnx/``
from nxm_deploy.run.layout import DENSE_FP32_OPT_ONNX, DENSE_INT8_DYNAMIC_ONNX  # noqa: E402
#: runner names of the peers in validation (and keys of the export manifest's ``ort_peers``)
DENSE_FP32_OPT, DENSE_INT8_DYNAMIC = "dense_fp32_opt", "dense_int8_dynamic"
PEERS = (DENSE_FP32_OPT, DENSE_INT8_DYNAMIC)
#: Hugging Face ``config.model_type`` -> the optimizer's ``model_type`` (its fusion patterns); encoders use ``bert``
_OPTIMIZER_TYPES = {"gpt2": "gpt2", "gpt_neox": "gpt_neox", "bart": "bart", "t5": "t5", "phi": "phi"}


def optimizer_settings(config) -> dict:
    """``model_type``, ``num_heads`` and ``hidden_size`` of ``optimize_model`` for a Hugging Face config (its
    ``attribute_map`` gives every architecture these two names; 0 lets the optimizer detect them)."""
    return {"model_type": _OPTIMIZER_TYPES.get(getattr(config, "model_type", ""), "bert"),
            "num_heads": int(getattr(config, "num_attention_heads", 0) or 0),
            "hidden_size": int(getattr(config, "hidden_size", 0) or 0)}


def make_ort_peers(dense_path: str | Path, out_dir: str | Path, config) -> dict:
    """Write ``dense_fp32_opt.onnx`` and ``dense_int8_dynamic.onnx`` from the dense FP32 export (module docstring).

    Args:
        dense_path: the dense FP32 ONNX model (``onnx/dense_fp32.onnx``).
        out_dir: where the two files go (written under a temporary name, renamed when complete).
        config: the dense model's Hugging Face config (attention heads and hidden size for the fusions).

    Returns:
        dict: ``{"dense_fp32_opt": {"file", "bytes", "sha256", "optimizer", "fused"}, "dense_int8_dynamic":
        {"file", "bytes", "sha256", "quantize_dynamic"}}``; a peer the ORT tools could not build is
        ``{"error": "<one line>"}`` instead (validation then skips it, naming the reason), since the peer is a
        reference, not a deliverable.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    import onnx

    from nxm_deploy.export.onnx import file_record, save_model

    out_dir = Path(out_dir)
    opt_path, dyn_path = out_dir / DENSE_FP32_OPT_ONNX, out_dir / DENSE_INT8_DYNAMIC_ONNX
    settings = optimizer_settings(config)
    peers: dict[str, dict] = {}
    try:
        optimized = optimize_model(str(dense_path), **settings)
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        save_model(optimized.model, opt_path)
        peers[DENSE_FP32_OPT] = {**file_record(opt_path), "optimizer": settings, "fused": fused}
    except Exception as exc:  # noqa: BLE001 - a peer ORT cannot build is reported, not fatal
        log.warning("ONNX Runtime's transformer optimizer failed on %s: %s", dense_path, exc)
        return {name: {"error": f"optimize_model failed: {str(exc).splitlines()[0][:300]}"} for name in PEERS}
    options = {"per_channel": True, "weight_type": "QInt8", "activations": "UINT8, dynamic per tensor",
               "extra_options": {"DefaultTensorType": "FLOAT"}}
    tmp = dyn_path.with_name(f".{dyn_path.name}.tmp")
    root, advice = logging.getLogger(), _DropPreprocessAdvice()
    root.addFilter(advice)  # quantize_dynamic's root-logger advice to run quant_pre_process: noise for our users
    try:
        quantize_dynamic(str(opt_path), str(tmp), per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        os.replace(tmp, dyn_path)
        peers[DENSE_INT8_DYNAMIC] = {**file_record(dyn_path), "quantize_dynamic": options}
    except Exception as exc:  # noqa: BLE001
        log.warning("quantize_dynamic failed on %s: %s", opt_path, exc)
        peers[DENSE_INT8_DYNAMIC] = {"error": f"quantize_dynamic failed: {str(exc).splitlines()[0][:300]}"}
    finally:
        root.removeFilter(advice)
        tmp.unlink(missing_ok=True)
    return peers


class _DropPreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")
