"""INT8 weights stored as INT8: the ONNX ``QuantizeLinear`` arithmetic, and the ``dq_only`` weight form.

``float initializer -> QuantizeLinear -> DequantizeLinear`` and ``int8 initializer -> DequantizeLinear`` compute the
same weight; the second stores it in a quarter of the bytes (ModelOpt's ``dq_only`` export, which TensorRT reads as
the same INT8 weight). No torch here: the CPU INT8 rewrite and the verifier use these too.

Source: ONNX operator spec of QuantizeLinear (``saturate(round_half_to_even(x / y_scale) + y_zero_point)``).
"""

from __future__ import annotations

import numpy as np


def broadcast_scale(scale: np.ndarray, axis: int, shape: tuple[int, ...]) -> np.ndarray | str:
    """A Q/DQ ``scale`` (one value, or one per index of ``axis``) shaped to broadcast against ``shape``.

    Returns the float32 array, or why it does not fit (blocked scales, a size that is not ``shape[axis]``).
    """
    if scale.size == 1:
        return scale.reshape(()).astype(np.float32)
    if scale.ndim != 1:
        return "blocked weight quantization is not supported"
    axis %= len(shape)
    if shape[axis] != scale.size:
        return f"{scale.size} scales do not fit axis {axis} of weight {list(shape)}"
    view = [1] * len(shape)
    view[axis] = scale.size
    return scale.reshape(view).astype(np.float32)


def int8_codes(weight: np.ndarray, scale: np.ndarray, arithmetic: str = "onnx") -> np.ndarray:
    """INT8 codes with zero point 0: ``saturate(round_half_even(w / scale))``, in float32.

    Args:
        weight: float array; scale: float32, broadcastable to it (:func:`broadcast_scale`).
        arithmetic: ``"onnx"``: ``w / scale``, as ONNX ``QuantizeLinear`` specifies it (what ONNX Runtime computes
            for a float weight behind a QuantizeLinear); ``"torch"``: ``w * (1 / scale)``, as PyTorch's
            ``fake_quantize_per_channel_affine`` computes it (the QAT model's exported twin). The two differ on
            weights that land exactly between two codes (a few in ten million on MiniLM).

    Returns:
        int8 array of ``weight``'s shape.

    Raises:
        ValueError: an unknown ``arithmetic``.
    """
    weight = weight.astype(np.float32)
    if arithmetic == "onnx":
        scaled = weight / scale
    elif arithmetic == "torch":
        scaled = weight * (np.float32(1.0) / np.asarray(scale, dtype=np.float32))
    else:
        raise ValueError(f"arithmetic={arithmetic!r} is not 'onnx' or 'torch'")
    return np.clip(np.rint(scaled), -128, 127).astype(np.int8)


def store_int8_weights(onnx_model, arithmetic: str = "onnx") -> dict:
    """Rewrite every weight ``float initializer -> QuantizeLinear -> DequantizeLinear`` as ``int8 initializer ->
    DequantizeLinear`` in place (ModelOpt's ``dq_only`` form; TensorRT reads it as the same INT8 weight).

    The INT8 codes keep the weight's initializer name (so layer maps by initializer name stay valid), computed by
    :func:`int8_codes` with ``arithmetic`` (``"torch"`` when the graph was exported from a PyTorch fake-quant model
    whose outputs it must reproduce; zero points must be INT8 0, per-channel axis kept on the DequantizeLinear). A float weight that something else also reads, or a QuantizeLinear whose scale is not
    constant, is left as it is.

    Returns:
        dict: ``converted`` (weights now stored as INT8), ``int8_weight_bytes``, ``float_weight_bytes_removed``.
    """
    from onnx import numpy_helper

    graph = onnx_model.graph
    inits = {init.name: init for init in graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}

    def value(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return consts.get(name)

    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    converted, int8_bytes, float_bytes, drop = 0, 0, 0, []
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        weight_name = q.input[0]
        dqs = readers.get(q.output[0], [])
        if weight_name not in inits or len(readers.get(weight_name, [])) != 1 or q.output[0] in graph_outputs:
            continue
        if not dqs or any(d.op_type != "DequantizeLinear" or d.input[0] != q.output[0] for d in dqs):
            continue
        weight = value(weight_name)
        scale = value(q.input[1])
        zero = value(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        if weight is None or not np.issubdtype(weight.dtype, np.floating) or scale is None:
            continue
        if zero is None or zero.dtype != np.int8 or np.any(zero != 0):
            continue
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
        full = broadcast_scale(scale, axis, weight.shape)
        if isinstance(full, str):
            continue
        codes = int8_codes(weight, full, arithmetic)
        inits[weight_name].CopyFrom(numpy_helper.from_array(codes, weight_name))
        for dq in dqs:
            dq.input[0] = weight_name
        drop.append(q)
        converted += 1
        int8_bytes += codes.nbytes
        float_bytes += weight.astype(np.float32).nbytes
    for node in drop:
        graph.node.remove(node)
    return {"converted": converted, "int8_weight_bytes": int8_bytes, "float_weight_bytes_removed": float_bytes}
