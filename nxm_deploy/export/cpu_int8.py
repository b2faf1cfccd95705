"""Turn the TensorRT-style S8S8 Q/DQ ONNX into a graph that runs fast on ONNX Runtime's CPU provider.

Why: environment-notes section 4 measured ORT CPU running symmetric signed-INT8 Q/DQ graphs (the layout
TensorRT wants) at 0.44-0.78x FP32, while ``quantize_dynamic`` (``MatMulInteger``, UINT8 activations x INT8
weights) ran at about 1.9x. This module keeps the *learned* QAT scales and rewrites every quantized
``MatMul`` into the U8S8 integer kernel ``quantize_dynamic`` uses, minus the dynamic range computation, so
the CPU artifact does not depend on which Q/DQ patterns a given ORT version fuses. (Measured with ORT
1.31.1 on this project's MiniLM export: ORT's own QDQ transformer already turns that graph's quantized
MatMuls into ``QuantizeLinear`` + ``MatMulIntegerToFloat`` at session creation, with logits identical to
this module's output; the rewrite then adds the folded bias: see ``benchmarks/ort_cpu.md``.)

Rewrite of one quantized layer, ``y = DQ(Q(x)) @ T(DQ(Q(W)))`` (``T``: the ``Transpose`` the TorchScript
exporter puts after the weight DequantizeLinear of an ``nn.Linear`` on a 3-D input)::

    x (float [..., K]) -> QuantizeLinear(s_x, zero point uint8 128) -> x_u8 (uint8 [..., K])
    W_codes = clip(round_half_even(W / s_w), -128, 127) as int8, laid out [K, N] (B of MatMulInteger)
    form "fused"    : MatMulIntegerToFloat(x_u8, W_codes, s_x, s_w[N], 128, 0[, bias]) (com.microsoft)
    form "standard" : MatMulInteger(x_u8, W_codes, 128, 0) -> Cast(float) -> Mul(s_x * s_w[N]) (plain ONNX)

Equivalence: with signed codes ``q = clip(round(x / s_x), -128, 127)``, the UINT8 codes with zero point 128
are exactly ``q + 128`` (same rounding op, same clamp range), so ``MatMulInteger`` computes
``sum_k q[k] * W_codes[k, n]`` exactly in int32 and one float multiply by ``s_x * s_w[n]`` gives the
dequantized product. The only differences from the Q/DQ graph are float32 summation order and rounding
(~1e-6 relative). Pruned weights have code 0, so the n:m pattern survives in ``W_codes`` along axis 0 (the
reduction axis of ``MatMulInteger`` B).

Sources: ONNX operator specs (QuantizeLinear, MatMulInteger); ONNX Runtime contrib op
``com.microsoft.MatMulIntegerToFloat`` and its optimizer ``MatMulIntegerToFloatFusion``
(onnxruntime/core/optimizer/matmul_integer_to_float.cc), which builds the same node from the standard form
when the scale product is a runtime ``Mul``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nxm_deploy.fileio import write_onnx
from nxm_deploy.errors import ExportError
from nxm_deploy.export.int8_weights import broadcast_scale, int8_codes
from nxm_deploy.export.graph import Graph, attr, load_model_proto, node_name, reshape_target

log = logging.getLogger("nxm_deploy.export")

__all__ = ["CPU_INT8_ONNX", "compare_logits", "make_cpu_int8"]

from nxm_deploy.run.layout import CPU_INT8_ONNX  # noqa: E402  the CPU INT8 model's file name in ``<run>/onnx/``
A_ZERO_POINT = 128
FORMS = ("fused", "standard")
_PREFIX = "cpu_int8/"
_WALK_OPS = {"Identity", "Transpose", "Reshape"}


@dataclass
class _Weight:
    codes: np.ndarray  # int8 [K, N]
    col_scale: np.ndarray  # float32 [N]
    source: str  # initializer the codes were computed from


@dataclass
class _Plan:
    node: onnx.NodeProto
    x: str  # float activation (input of the activation QuantizeLinear)
    x_scale: np.float32
    weight: _Weight
    weight_key: tuple
    alpha: float = 1.0
    gemm_bias: np.ndarray | None = None  # beta * C, float32 [N]


class _Converter:
    def __init__(self, proto: onnx.ModelProto, base_dir: str):
        self.proto = proto
        self.graph = Graph(proto, base_dir)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in proto.graph.node:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in proto.graph.output}

    def const(self, name: str) -> np.ndarray | None:
        """Value of an initializer / ``Constant`` output, also behind ``Identity`` (exporter de-duplication)."""
        for _ in range(16):
            if not name:
                return None
            if self.graph.is_const(name):
                return self.graph.array(name)
            node = self.graph.producer.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return None

    def producer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.graph.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    @staticmethod
    def _apply(node: onnx.NodeProto, array: np.ndarray, graph: Graph) -> np.ndarray | None:
        if node.op_type == "Identity":
            return array
        if node.op_type == "Transpose":
            perm = attr(node, "perm") or list(reversed(range(array.ndim)))
            return np.transpose(array, perm)
        target = reshape_target(graph, node, array.shape)
        return None if target is None else array.reshape(target)

    def qparams(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | str:
        """Constant (scale float32, zero point) of a Q/DQ node, or why they are unusable."""
        scale = self.const(node.input[1])
        zero = self.const(node.input[2]) if len(node.input) > 2 else None
        if scale is None:
            return f"{node.op_type} scale is not constant"
        if zero is None:
            return f"{node.op_type} has no constant zero point (UINT8 default)"
        if zero.dtype != np.int8 or np.any(zero != 0):
            return f"{node.op_type} is not signed INT8 with zero point 0"
        scale = scale.astype(np.float32)
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            return f"{node.op_type} scale is not positive finite"
        return scale, zero

    # ------------------------------------------------------------------------------------------ weight
    def weight(self, tensor: str, transpose_b: bool) -> tuple[_Weight, tuple] | str:
        """INT8 codes ``[K, N]`` and per-column scales of a weight input ``T(DQ(Q(W))`` or ``T(DQ(codes))``."""
        post: list[onnx.NodeProto] = []
        name = tensor
        while True:
            node = self.graph.producer.get(name)
            if node is None:
                return "weight is not quantized (no DequantizeLinear in front of it)"
            if node.op_type == "DequantizeLinear":
                dq = node
                break
            if node.op_type not in _WALK_OPS:
                return f"weight input comes from {node.op_type}, not a DequantizeLinear"
            post.append(node)
            name = node.input[0]
        post.reverse()
        params = self.qparams(dq)
        if isinstance(params, str):
            return f"weight {params}"
        scale, _ = params
        q = self.producer(dq.input[0], "QuantizeLinear")
        if q is not None:
            q_params = self.qparams(q)
            if isinstance(q_params, str):
                return f"weight {q_params}"
            if q_params[0].shape != scale.shape or not np.array_equal(q_params[0], scale):
                return "weight QuantizeLinear and DequantizeLinear scales differ"
            if scale.size > 1 and int(attr(q, "axis", 1)) != int(attr(dq, "axis", 1)):
                return "weight QuantizeLinear and DequantizeLinear axes differ"
            pre: list[onnx.NodeProto] = []
            name = q.input[0]
            while not self.graph.is_const(name):
                node = self.graph.producer.get(name)
                if node is None or node.op_type not in _WALK_OPS:
                    return "float weight is not a constant (or computed by an unsupported op)"
                pre.append(node)
                name = node.input[0]
            source = name
            array = self.graph.array(name)
            if not np.issubdtype(array.dtype, np.floating):
                return f"float weight '{name}' is {array.dtype}"
            array = array.astype(np.float32)
            for node in reversed(pre):
                array = self._apply(node, array, self.graph)
                if array is None:
                    return "weight Reshape with a non-constant shape"
            q_scale = broadcast_scale(scale, int(attr(q, "axis", 1)), array.shape)
            if isinstance(q_scale, str):
                return q_scale
            codes = int8_codes(array, q_scale)
        else:
            source = dq.input[0]
            codes = self.const(source)
            if codes is None or codes.dtype != np.int8:
                return "weight DequantizeLinear reads neither a QuantizeLinear nor constant int8 codes"
        full_scale = broadcast_scale(scale, int(attr(dq, "axis", 1)), codes.shape)
        if isinstance(full_scale, str):
            return full_scale
        full_scale = np.broadcast_to(full_scale, codes.shape)
        for node in post:
            codes = self._apply(node, codes, self.graph)
            full_scale = self._apply(node, full_scale, self.graph)
            if codes is None or full_scale is None:
                return "weight Reshape with a non-constant shape"
        if codes.ndim != 2:
            return f"weight of rank {codes.ndim} (MatMulInteger B must be 2-D here)"
        if transpose_b:
            codes, full_scale = codes.T, full_scale.T
        if not np.all(full_scale == full_scale[:1]):
            return "weight scale varies along the reduction axis (not per output channel)"
        key = (source, tuple(n.name or n.output[0] for n in post), transpose_b)
        weight = _Weight(np.ascontiguousarray(codes, dtype=np.int8), np.ascontiguousarray(full_scale[0], dtype=np.float32), source)
        return weight, key

    # -------------------------------------------------------------------------------------- activation
    def activation(self, tensor: str) -> tuple[str, np.float32] | str:
        """``(x, s_x)`` when ``tensor = DQ(Q(x))`` with a signed-INT8 zero-point-0 per-tensor quantizer."""
        dq = self.producer(tensor, "DequantizeLinear")
        if dq is None:
            return "input is not quantized (no DequantizeLinear)"
        q = self.producer(dq.input[0], "QuantizeLinear")
        if q is None:
            return "input DequantizeLinear does not read a QuantizeLinear"
        params, dq_params = self.qparams(q), self.qparams(dq)
        for p in (params, dq_params):
            if isinstance(p, str):
                return f"input {p}"
        if params[0].size != 1:
            return "input is quantized per channel (MatMulInteger needs one activation scale)"
        if not np.array_equal(params[0].reshape(-1), dq_params[0].reshape(-1)):
            return "input QuantizeLinear and DequantizeLinear scales differ"
        if self.graph.trace(q.input[0]) is not None:
            return "input is a constant"
        return q.input[0], np.float32(params[0].reshape(()))

    # -------------------------------------------------------------------------------------------- plan
    def plan(self, node: onnx.NodeProto) -> _Plan | str:
        if len(node.input) < 2:
            return "fewer than 2 inputs"
        if self.graph.trace(node.input[1]) is None:
            return "activation x activation product (no constant weight), not quantized to codes"
        transpose_b = False
        alpha, gemm_bias = 1.0, None
        if node.op_type == "Gemm":
            if attr(node, "transA", 0):
                return "Gemm with transA=1"
            transpose_b = bool(attr(node, "transB", 0))
            alpha = float(attr(node, "alpha", 1.0))
        weight = self.weight(node.input[1], transpose_b)
        if isinstance(weight, str):
            return weight
        act = self.activation(node.input[0])
        if isinstance(act, str):
            return act
        weight, key = weight
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            c = self.const(node.input[2])
            n = weight.codes.shape[1]
            if c is None or c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
                return "Gemm C is not a constant vector"
            gemm_bias = np.broadcast_to(float(attr(node, "beta", 1.0)) * c.astype(np.float32).reshape(-1), (n,)).astype(np.float32)
        return _Plan(node, act[0], act[1], weight, key, alpha, gemm_bias)

    def bias_add(self, output: str, n: int) -> tuple[onnx.NodeProto, np.ndarray] | None:
        """The single ``Add(output, bias[N])`` consuming ``output``, for fusing the bias."""
        users = self.consumers.get(output, [])
        if len(users) != 1 or output in self.graph_outputs or users[0].op_type != "Add":
            return None
        add = users[0]
        other = add.input[1] if add.input[0] == output else add.input[0]
        bias = self.const(other)
        if bias is None or other == output or not np.issubdtype(bias.dtype, np.floating):
            return None
        if bias.size != n or bias.shape[-1:] != (n,) or any(d != 1 for d in bias.shape[:-1]):
            return None
        return add, bias.astype(np.float32).reshape(n)


def _key(node: onnx.NodeProto) -> tuple:
    return (node.op_type, node.name, tuple(node.input), tuple(node.output))


def _dead_code_elimination(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads, then unused initializers, stale value_info and initializer inputs."""
    initializer_names = {t.name for t in graph.initializer}
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in live for o in node.output if o):
            kept.append(node)
            live.update(i for i in node.input if i)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    inits = [t for t in graph.initializer if t.name in live]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name not in initializer_names or i.name in live]
    del graph.input[:]
    graph.input.extend(inputs)
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    infos = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _fuse_erf_gelu(graph: onnx.GraphProto, fresh) -> int:
    """Replace the exported erf GELU ``x/√2 -> Erf -> +1 -> ·x -> ·0.5`` by ``com.microsoft.Gelu(x)``.

    ONNX Runtime fuses this pattern itself, but not when ``x`` is the dequantized output of an INT8-out GEMM
    (``train.qat.quantizers.gemm_outputs``): its QDQ transformers give each of the pattern's two readers of ``x``
    its own copy of the DequantizeLinear, so the tensor is dequantized twice and the GELU runs as five ops
    (measured on MiniLM at batch 32 x 128: about 60 ms of 280). The fused kernel computes the same
    ``0.5 x (1 + erf(x / √2))`` (logits bit-identical on MiniLM), and ``x`` then has one reader.
    Returns the number of patterns replaced.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})

    def const_is(name: str, value: float) -> bool:
        array = consts.get(name)
        return array is not None and array.size == 1 and abs(float(array.reshape(-1)[0]) - value) < 1e-3

    def only(tensor: str, op_type: str):
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    ids = {id(n): i for i, n in enumerate(graph.node)}
    for div in graph.node:
        if div.op_type != "Div" or not const_is(div.input[1], 2 ** 0.5):
            continue
        x = div.input[0]
        erf = only(div.output[0], "Erf")
        add = erf and only(erf.output[0], "Add")
        mul = add and only(add.output[0], "Mul")
        half = mul and only(mul.output[0], "Mul")
        if not (add and mul and half) or not (const_is(add.input[1], 1.0) or const_is(add.input[0], 1.0)):
            continue
        if x not in mul.input or not (const_is(half.input[1], 0.5) or const_is(half.input[0], 0.5)):
            continue
        gelu = helper.make_node("Gelu", [x], [half.output[0]], name=fresh(f"{div.name}/gelu"), domain="com.microsoft")
        replace[ids[id(half)]] = gelu
        drop.update(ids[id(n)] for n in (div, erf, add, mul))
    kept = [replace.get(i, n) for i, n in enumerate(graph.node) if i not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    return len(replace)


def make_cpu_int8(
    qdq_model_path: str | os.PathLike | onnx.ModelProto,
    out_path: str | os.PathLike,
    *,
    form: str = "fused",
    check: bool = True,
) -> dict[str, Any]:
    """Write an ONNX Runtime CPU INT8 model from a TensorRT-style S8S8 Q/DQ model, same learned scales.

    Every ``MatMul`` (and ``Gemm`` with ``transA=0``) whose data input is ``DQ(Q(x))`` with a per-tensor
    signed-INT8 zero-point-0 quantizer and whose weight is ``DQ(Q(W))`` or ``DQ(int8 codes)`` (optionally
    behind ``Transpose``/``Reshape``/``Identity``) per output channel or per tensor is rewritten to the
    U8S8 integer kernel (see the module docstring). Activations shared by several layers (Q, K, V) are
    quantized once. The exported erf GELU becomes one ``com.microsoft.Gelu`` (fused form). Everything else (attention products, LayerNorm, un-quantized Gemm heads) stays in
    float; orphaned Q/DQ nodes and the float weights are removed.

    Args:
        qdq_model_path: the Q/DQ ``.onnx`` (e.g. ``<run>/onnx/sparse_int8_qdq.onnx``) or a loaded ``ModelProto``.
        out_path: where to write the CPU model (atomically; external data when over 2 GB).
        form: ``"fused"`` (default): ``com.microsoft.MatMulIntegerToFloat`` with the bias folded in, the node
            ORT's own optimizer builds for ``quantize_dynamic`` models (ONNX Runtime only);
            ``"standard"``: plain ONNX ``QuantizeLinear(uint8)`` -> ``MatMulInteger`` -> ``Cast`` -> ``Mul``,
            the bias ``Add`` kept (runs on any ONNX runtime with MatMulInteger).
        check: run ``onnx.checker`` (standard form) and open the model in an ORT CPU session before returning.

    Returns:
        dict: ``path``, ``source``, ``form``, ``converted`` (number of layers rewritten), ``converted_nodes``
        (per layer: ``node``, ``op_type``, ``weight`` (source initializer), ``codes`` (int8 initializer),
        ``shape`` ``[K, N]``, ``activation``, ``activation_scale``, ``bias_fused``), ``activation_quantizers``
        (UINT8 QuantizeLinear nodes), ``weight_codes`` (int8 initializer -> source weight initializer, to
        compose with the export layer map), ``left_float`` (every ``MatMul``/``Gemm`` not rewritten, with
        ``reason``), ``remaining_qdq`` (Q/DQ nodes still in the graph, by op type), ``gelu_fused`` (erf GELUs made one ``Gelu``),
        ``ops`` (op-type counts),
        ``bytes``.

    Raises:
        ConfigError: ``form`` is unknown.
        ExportError: the input cannot be read, no layer could be converted, or the written model does not
            load in ONNX Runtime.
    """
    from nxm_deploy.errors import ConfigError

    if form not in FORMS:
        raise ConfigError(f"form={form!r} is not one of {FORMS}.")
    proto, source_text, base_dir = load_model_proto(qdq_model_path)
    conv = _Converter(proto, base_dir)
    graph = proto.graph

    new_inits: list[onnx.TensorProto] = []
    taken = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    taken |= {o for n in graph.node for o in n.output} | {n.name for n in graph.node if n.name}

    def fresh(name: str) -> str:
        """A tensor or node name not used in the graph yet, prefixed ``cpu_int8/``."""
        base, i = _PREFIX + name, 0
        unique = base
        while unique in taken:
            i += 1
            unique = f"{base}_{i}"
        taken.add(unique)
        return unique

    def add_init(name: str, array: np.ndarray) -> str:
        unique = fresh(name)
        new_inits.append(numpy_helper.from_array(np.asarray(array), unique))
        return unique

    a_zero = add_init("a_zero_point_u8", np.array(A_ZERO_POINT, dtype=np.uint8))
    b_zero = add_init("b_zero_point_s8", np.array(0, dtype=np.int8))
    act_cache: dict[tuple[str, bytes], tuple[str, str]] = {}  # (x, scale bytes) -> (x_u8 name, scale init)
    weight_cache: dict[tuple, tuple[str, str]] = {}  # key -> (codes init, column-scale init)
    replacements: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    converted: list[dict[str, Any]] = []
    left: list[dict[str, str]] = []
    weight_codes: dict[str, str] = {}
    node_index = {_key(n): i for i, n in enumerate(graph.node)}

    for index, node in enumerate(graph.node):
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        name = node_name(node, index)
        plan = conv.plan(node)
        if isinstance(plan, str):
            left.append({"node": name, "op_type": node.op_type, "reason": plan})
            continue
        new_nodes: list[onnx.NodeProto] = []
        act_key = (plan.x, plan.x_scale.tobytes())
        if act_key not in act_cache:
            scale_init = add_init(f"{plan.x}.scale", np.array(plan.x_scale, dtype=np.float32))
            x_u8 = fresh(f"{plan.x}.u8")
            new_nodes.append(helper.make_node("QuantizeLinear", [plan.x, scale_init, a_zero], [x_u8],
                                              name=fresh(f"quantize/{plan.x}")))
            act_cache[act_key] = (x_u8, scale_init)
        x_u8, x_scale_init = act_cache[act_key]
        w = plan.weight
        if plan.weight_key not in weight_cache:
            codes_init = add_init(f"{w.source}.int8_KxN", w.codes)
            col_init = add_init(f"{w.source}.scale_N", (w.col_scale * np.float32(plan.alpha)).astype(np.float32))
            weight_cache[plan.weight_key] = (codes_init, col_init)
            weight_codes[codes_init] = w.source
        codes_init, col_init = weight_cache[plan.weight_key]
        n = w.codes.shape[1]
        out = node.output[0]
        bias = plan.gemm_bias
        bias_fused = False
        if form == "fused":
            extra: list[str] = []
            fused_out = out
            if bias is None and node.op_type == "MatMul":
                found = conv.bias_add(out, n)
                if found is not None:
                    add_node, bias = found
                    dropped.add(node_index[_key(add_node)])
                    fused_out = add_node.output[0]
            if bias is not None:
                extra = [add_init(f"{name}.bias", bias)]
                bias_fused = True
            new_nodes.append(helper.make_node(
                "MatMulIntegerToFloat", [x_u8, codes_init, x_scale_init, col_init, a_zero, b_zero, *extra],
                [fused_out], name=fresh(name), domain="com.microsoft",
            ))
        else:
            multiplier = add_init(f"{name}.multiplier", (np.float32(plan.x_scale) * w.col_scale * np.float32(plan.alpha)).astype(np.float32))
            acc, acc_f = fresh(f"{name}.int32"), fresh(f"{name}.float")
            mul_out = out if bias is None else fresh(f"{name}.scaled")
            new_nodes += [
                helper.make_node("MatMulInteger", [x_u8, codes_init, a_zero, b_zero], [acc], name=fresh(name)),
                helper.make_node("Cast", [acc], [acc_f], name=fresh(f"{name}/cast"), to=TensorProto.FLOAT),
                helper.make_node("Mul", [acc_f, multiplier], [mul_out], name=fresh(f"{name}/scale")),
            ]
            if bias is not None:  # Gemm C
                new_nodes.append(helper.make_node("Add", [mul_out, add_init(f"{name}.bias", bias)], [out],
                                                  name=fresh(f"{name}/bias")))
        replacements[index] = new_nodes
        converted.append({
            "node": name, "op_type": node.op_type, "weight": w.source, "codes": codes_init, "shape": list(w.codes.shape),
            "activation": plan.x, "activation_scale": float(plan.x_scale), "bias_fused": bias_fused,
        })

    if not converted:
        raise ExportError(
            f"No quantized MatMul/Gemm in {source_text} could be converted to INT8 for the CPU: "
            + "; ".join(f"{r['node']}: {r['reason']}" for r in left[:5]),
            hint="Pass the Q/DQ export (sparse_int8_qdq.onnx), whose quantized layers read DQ(Q(x)) and DQ(Q(W)).",
        )

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    out_graph = model.graph
    del out_graph.node[:]
    for index, node in enumerate(graph.node):
        if index in dropped:
            continue
        out_graph.node.extend(replacements.get(index, [node]))
    out_graph.initializer.extend(new_inits)
    _dead_code_elimination(out_graph)
    gelus = _fuse_erf_gelu(out_graph, fresh) if form == "fused" else 0
    _dead_code_elimination(out_graph)
    if form == "fused" and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model.producer_name = "nxm_deploy.export.cpu_int8"

    out_path = Path(out_path)

    def checked(tmp: Path) -> None:
        if form == "standard":
            onnx.checker.check_model(str(tmp))
        from nxm_deploy.ort import make_session

        make_session(tmp)

    try:
        write_onnx(model, out_path, check=checked if check else None)
    except Exception as exc:
        raise ExportError(f"CPU INT8 model {out_path} failed its check: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc

    ops = Counter(n.op_type for n in out_graph.node)
    info = {
        "path": str(out_path),
        "source": source_text,
        "form": form,
        "converted": len(converted),
        "converted_nodes": converted,
        "activation_quantizers": len(act_cache),
        "weight_codes": weight_codes,
        "left_float": left,
        "remaining_qdq": {k: ops.get(k, 0) for k in ("QuantizeLinear", "DequantizeLinear")},
        "gelu_fused": gelus,
        "ops": dict(sorted(ops.items())),
        "bytes": out_path.stat().st_size,
    }
    log.info(
        "CPU INT8 (%s): %d layer(s) rewritten to U8S8 integer MatMul, %d activation quantizer(s), %d MatMul/Gemm "
        "left in float -> %s", form, len(converted), len(act_cache), len(left), out_path,
    )
    return info


def compare_logits(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    feeds: dict[str, np.ndarray],
    *,
    intra_op_threads: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Run two ONNX models on the same inputs with ORT CPU and compare their ``logits``.

    Args:
        reference: e.g. the Q/DQ model.
        candidate: e.g. the CPU INT8 model.
        feeds: int64 arrays ``[B, L]`` keyed by input name (extra keys are ignored).
        intra_op_threads: ORT intra-op threads (None: ORT default).
        batch_size: rows per ``session.run``.

    Returns:
        dict: ``examples`` and :func:`nxm_deploy.export.parity.logit_stats` (``max_abs_diff``, ``mean_abs_diff``,
        ``argmax_agreement``: None for a regression score).
    """
    from nxm_deploy.ort import make_session

    sessions = [make_session(p, intra_op_threads=intra_op_threads) for p in (reference, candidate)]
    outs: list[list[np.ndarray]] = [[], []]
    rows = int(next(iter(feeds.values())).shape[0])
    for start in range(0, rows, batch_size):
        for i, session in enumerate(sessions):
            names = [x.name for x in session.get_inputs()]
            batch = {k: np.asarray(feeds[k][start:start + batch_size], dtype=np.int64) for k in names}
            outs[i].append(session.run(["logits"], batch)[0])
    from nxm_deploy.export.parity import logit_stats

    return {"examples": rows, **logit_stats(np.concatenate(outs[0]), np.concatenate(outs[1]))}
