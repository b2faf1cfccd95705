"""Lint the QuantizeLinear/DequantizeLinear (Q/DQ) nodes of an ONNX graph for TensorRT explicit quantization.

TensorRT builds INT8 layers from explicit Q/DQ only when the quantization is *signed INT8, symmetric*: zero
points are INT8 zeros, scales are build-time constants that are positive and finite, activations are
quantized per tensor and weights per output channel (TensorRT developer guide, "Explicit Quantization";
ONNX ``QuantizeLinear``/``DequantizeLinear`` operator specs for ``axis`` and the UINT8 default of a missing
zero point). This module checks those rules on a graph without building an engine and names the node that
breaks each rule.

Rules (``QdqFinding.rule``), severity ``error`` unless noted:

* ``no-qdq``: the graph has no Q/DQ node at all (it is not explicitly quantized).
* ``zero-point-int8``: every zero point is a constant INT8 tensor. A missing QuantizeLinear zero point means
  UINT8 output; a UINT8 zero point is the ORT default, and "TensorRT needs signed INT8".
* ``zero-point-zero``: every zero point is 0 (symmetric).
* ``scale-constant``: every scale is an initializer or a ``Constant`` output.
* ``scale-positive-finite``: every scale is > 0 and finite.
* ``scale-shape``: a per-channel scale has one entry per channel of its axis; the axis is in range.
* ``activation-per-tensor``: an activation (a Q/DQ whose input depends on a graph input) has a single scale.
* ``weight-axis``: a weight (a Q/DQ whose input traces back to an initializer) quantized per channel uses the
  *output-channel* axis as its consumer reads the weight: ``[out, in]`` -> ``Transpose(perm=[1, 0])`` ->
  ``MatMul`` B: axis 0; ``MatMul`` B ``[K, N]`` directly: axis 1 (the last); ``Gemm`` B with ``transB=1``:
  axis 0, ``transB=0``: axis 1; ``Conv`` W ``[K, C, ...]``: axis 0. The consumer's axis is mapped back
  through ``Transpose``/``Reshape``/``Identity``/``Cast`` between the DequantizeLinear and the consumer.
* ``weight-per-tensor`` (warning): a weight with a single scale (legal, but loses accuracy; the QAT model
  quantizes weights per output channel).
* ``qdq-pair``: every QuantizeLinear feeds only DequantizeLinear nodes with the same scale, zero point and
  axis; a DequantizeLinear reads a QuantizeLinear or a constant (INT8 weight codes).
* ``weight-consumer`` (warning): the axis of a per-channel weight could not be checked (consumer is not
  ``MatMul``/``Gemm``/``Conv``, or a ``Reshape`` on the way changes the layout).
* ``unquantized-input`` (warning): a ``MatMul``/``Gemm``/``Conv`` reads a quantized weight but its data input
  has no DequantizeLinear, so TensorRT keeps the layer in higher precision.
* ``opset``: per-channel Q/DQ needs opset >= 13 (Q/DQ itself >= 10).
* ``decomposed-fake-quant`` (warning): a ``Round`` op, the sign of fake quantization exported as arithmetic.
* ``sparse-int8`` (only with the n:m layers known: the graph's ``nxm_deploy.sparsity`` metadata or a layer map):
  TensorRT runs a GEMM on its structured-sparse INT8 kernels only when it is INT8 in, INT8 out and reads a
  constant-foldable INT8 weight (TensorRT developer guide, "Structured Sparsity" and "Q/DQ Layer-Placement";
  ModelOpt adds output quantizers to the GEMMs for this). For every n:m layer: its data input comes from a
  DequantizeLinear, its weight from a DequantizeLinear of a constant, and every use of its output (after the
  bias ``Add``, through ``Reshape``/``Transpose``) is a QuantizeLinear. A layer that is not eligible is an error
  that names the missing Q/DQ.
* ``int8-attention`` (warning, with the n:m layers known): an attention ``MatMul`` (two activation inputs)
  with an input that has no DequantizeLinear, so TensorRT keeps attention in higher precision.

Graph-walk utilities (producer maps, constant values, Reshape targets) come from
:mod:`nxm_deploy.export.verify`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from nxm_deploy.errors import ExportError
from nxm_deploy.export.graph import Graph, attr, load_model_proto, node_name, reshape_target

log = logging.getLogger("nxm_deploy.export")

__all__ = ["GemmEligibility", "QdqFinding", "QdqLintReport", "RULES", "lint_qdq", "sparse_int8_summary", "verify_qdq"]

ERROR, WARNING = "error", "warning"

#: rule id -> the rule in one line (also the legend of :meth:`QdqLintReport.table`).
RULES: dict[str, str] = {
    "no-qdq": "the graph holds QuantizeLinear/DequantizeLinear nodes",
    "zero-point-int8": "every zero point is a constant INT8 tensor (TensorRT needs signed INT8)",
    "zero-point-zero": "every zero point is 0 (symmetric quantization)",
    "scale-constant": "every scale is an initializer or Constant",
    "scale-positive-finite": "every scale is positive and finite",
    "scale-shape": "a per-channel scale has one entry per channel of an in-range axis",
    "activation-per-tensor": "activations are quantized per tensor (one scale)",
    "weight-axis": "per-channel weight scales run along the consumer's output-channel axis",
    "weight-per-tensor": "weights are quantized per output channel (warning)",
    "qdq-pair": "every QuantizeLinear feeds matching DequantizeLinear nodes only",
    "weight-consumer": "the output-channel axis of a weight could be checked (warning)",
    "unquantized-input": "a layer with a quantized weight also has a quantized input (warning)",
    "opset": "Q/DQ needs opset >= 10, per-channel Q/DQ opset >= 13",
    "decomposed-fake-quant": "fake quantization is exported as Q/DQ, not Round arithmetic (warning)",
    "sparse-int8": "every n:m GEMM is INT8-in, INT8-out with a constant INT8 weight (TensorRT's sparse INT8 rule)",
    "int8-attention": "both inputs of each attention matmul are dequantized INT8 (warning)",
}

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_PASS_OPS = {"Identity", "Cast"}  # layout-neutral between a weight DequantizeLinear and its consumer
LAYOUT_OPS = {"Transpose", "Reshape"}
_LAYER_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}


@dataclass
class QdqFinding:
    """One broken rule.

    Attributes:
        node: name of the ONNX node that breaks the rule (``"<op_type>_<index>"`` when unnamed;
            ``"<graph>"`` for graph-wide findings).
        rule: rule id, a key of :data:`RULES`.
        message: what is wrong and what the rule wants, naming tensors and values.
        severity: ``"error"`` (TensorRT will reject or mis-build the graph) or ``"warning"``.
    """

    node: str
    rule: str
    message: str
    severity: str = ERROR


@dataclass
class GemmEligibility:
    """TensorRT's sparse INT8 conditions for one GEMM (or the INT8 conditions for one attention matmul).

    Attributes:
        node: the ``MatMul``/``Gemm`` node name.
        kind: ``"n:m"`` (an n:m layer) or ``"attention"`` (a matmul of two activations).
        module: torch module fqn of an n:m layer (None for attention).
        int8_in: the data input (both inputs for attention) comes from a DequantizeLinear.
        int8_weight: the weight is a DequantizeLinear of a constant (always True for attention).
        int8_out: every use of the output, after the bias ``Add`` and layout ops, is a QuantizeLinear.
        missing: what keeps the node from qualifying, one phrase each (empty when eligible).
    """

    node: str
    kind: str
    module: str | None
    int8_in: bool
    int8_weight: bool
    int8_out: bool
    missing: list[str] = field(default_factory=list)

    @property
    def eligible(self) -> bool:
        """INT8 in and weight, and (n:m layers) INT8 out."""
        return not self.missing


@dataclass
class QdqLintReport:
    """All findings of :func:`lint_qdq` on one model.

    Attributes:
        path: the model's path, or ``"<in-memory>"``.
        findings: in graph order of the node they name.
        counts: ``quantize_linear``, ``dequantize_linear``, ``activation_quantizers``, ``weight_quantizers``,
            ``per_channel_weights``, ``per_tensor_weights``, ``checked_weight_axes``.
    """

    path: str
    findings: list[QdqFinding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    gemms: list[GemmEligibility] | None = None  # None: the n:m layers were not known

    def eligibility_table(self) -> str:
        """Markdown table of :attr:`gemms` (n:m layers first), or a line saying the layers were not known."""
        if self.gemms is None:
            return "sparse INT8 eligibility not checked: the graph carries no n:m layer map"
        yes = {True: "yes", False: "**no**"}
        rows = ["| layer | node | kind | INT8 in | INT8 weight | INT8 out | eligible | missing |", "|---" * 8 + "|"]
        for g in sorted(self.gemms, key=lambda g: g.kind != "n:m"):
            out = yes[g.int8_out] if g.kind == "n:m" else "-"
            rows.append(f"| {g.module or '-'} | {g.node} | {g.kind} | {yes[g.int8_in]} | {yes[g.int8_weight]} | {out} "
                        f"| {yes[g.eligible]} | {'; '.join(g.missing) or '-'} |")
        return "\n".join(rows)

    @property
    def errors(self) -> list[QdqFinding]:
        """Findings of severity ``"error"``."""
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[QdqFinding]:
        """Findings of severity ``"warning"``."""
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def summary(self) -> str:
        """One line: verdict, error and warning counts, Q/DQ counts."""
        c = self.counts
        verdict = "TensorRT-ready" if self.ok else "NOT TensorRT-ready"
        return (
            f"{self.path}: {verdict}: {len(self.errors)} error(s), {len(self.warnings)} warning(s); "
            f"{c.get('quantize_linear', 0)} QuantizeLinear, {c.get('dequantize_linear', 0)} DequantizeLinear, "
            f"{c.get('weight_quantizers', 0)} weight quantizer(s) ({c.get('per_channel_weights', 0)} per channel, "
            f"{c.get('checked_weight_axes', 0)} axis checked), {c.get('activation_quantizers', 0)} activation quantizer(s)"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: ``path``, ``ok``, ``errors``, ``warnings`` (counts), ``counts``, ``findings``."""
        return {
            "path": self.path,
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "counts": dict(self.counts),
            "findings": [asdict(f) for f in self.findings],
            "gemms": None if self.gemms is None else [{**asdict(g), "eligible": g.eligible} for g in self.gemms],
        }

    def table(self) -> str:
        """Fixed-width plain-text table (severity, rule, node, message), or a one-line all-clear."""
        if not self.findings:
            return "no findings"
        header = ("severity", "rule", "node", "message")
        rows = [(f.severity, f.rule, f.node, f.message) for f in self.findings]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]

        def fmt(row: tuple[str, ...]) -> str:
            return "  ".join([*(c.ljust(w) for c, w in zip(row[:3], widths)), row[3]]).rstrip()

        return "\n".join([fmt(header), "  ".join("-" * w for w in [*widths, 7]), *(fmt(r) for r in rows)])


def _key(node: onnx.NodeProto) -> tuple:
    """A stable identity for a node (protobuf wrappers may be recreated, so ``id()`` is not used)."""
    return (node.op_type, node.name, tuple(node.input), tuple(node.output))


class _Linter:
    def __init__(self, proto: onnx.ModelProto, path: str, base_dir: str):
        self.proto = proto
        self.graph = Graph(proto, base_dir)
        self.path = path
        self.names: dict[int, str] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for index, node in enumerate(proto.graph.node):
            self.names[_key(node)] = node_name(node, index)
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, slot))
        self.graph_outputs = {o.name for o in proto.graph.output}
        self.findings: list[tuple[int, QdqFinding]] = []
        self.order = {_key(n): i for i, n in enumerate(proto.graph.node)}
        self.counts = dict.fromkeys(
            ("quantize_linear", "dequantize_linear", "activation_quantizers", "weight_quantizers",
             "per_channel_weights", "per_tensor_weights", "checked_weight_axes"), 0,
        )
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)

    # ------------------------------------------------------------------------------------------ helpers
    def name(self, node: onnx.NodeProto) -> str:
        return self.names[_key(node)]

    def add(self, node: onnx.NodeProto | None, rule: str, message: str, severity: str = ERROR) -> None:
        where = self.name(node) if node is not None else "<graph>"
        order = self.order.get(_key(node), -1) if node is not None else -1
        self.findings.append((order, QdqFinding(where, rule, message, severity)))

    def value(self, tensor: str) -> np.ndarray | None:
        """Value of an initializer / ``Constant`` output, also behind ``Identity`` (exporter de-duplication)."""
        for _ in range(16):
            if not tensor:
                return None
            if self.graph.is_const(tensor):
                try:
                    return self.graph.array(tensor)
                except Exception:  # noqa: BLE001 - unreadable external data: treated as non-constant
                    return None
            node = self.graph.producer.get(tensor)
            if node is None or node.op_type != "Identity":
                return None
            tensor = node.input[0]
        return None

    @staticmethod
    def _axis(node: onnx.NodeProto) -> int:
        return int(attr(node, "axis", 1))

    # ------------------------------------------------------------------------------------- parameters
    def check_params(self, node: onnx.NodeProto, input_dtype: np.dtype | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Scale and zero-point rules of one Q/DQ node; returns (scale, zero point) arrays when constant."""
        scale_name = node.input[1] if len(node.input) > 1 else ""
        zero_name = node.input[2] if len(node.input) > 2 else ""
        scale = self.value(scale_name)
        if scale is None:
            self.add(node, "scale-constant", f"scale '{scale_name}' is not an initializer or Constant; TensorRT "
                     "needs build-time constant scales (fold constants before export)")
        elif not np.issubdtype(scale.dtype, np.floating) or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            bad = scale.reshape(-1)
            bad_idx = int(np.argmax(~(np.isfinite(bad) & (bad > 0)))) if np.issubdtype(bad.dtype, np.floating) else 0
            self.add(node, "scale-positive-finite", f"scale '{scale_name}' must be positive and finite, got "
                     f"{bad[bad_idx]!r} at index {bad_idx} (dtype {scale.dtype})")
        zero = None
        if not zero_name:
            if node.op_type == "QuantizeLinear":
                self.add(node, "zero-point-int8", "no zero point: QuantizeLinear then outputs UINT8; TensorRT needs "
                         "signed INT8 (give it an int8 zero point of 0)")
            elif input_dtype is not None and input_dtype != np.int8:
                self.add(node, "zero-point-int8", f"no zero point and {input_dtype} input; TensorRT needs signed INT8")
        else:
            zero = self.value(zero_name)
            if zero is None:
                self.add(node, "zero-point-int8", f"zero point '{zero_name}' is not an initializer or Constant")
            elif zero.dtype != np.int8:
                why = "TensorRT needs signed INT8" + (" (uint8 is the ONNX Runtime default; quantize symmetric int8)"
                                                     if zero.dtype == np.uint8 else "")
                self.add(node, "zero-point-int8", f"zero point '{zero_name}' is {zero.dtype}: {why}")
            if zero is not None and np.any(zero != 0):
                first = zero.reshape(-1)[int(np.argmax(zero.reshape(-1) != 0))]
                self.add(node, "zero-point-zero", f"zero point '{zero_name}' holds nonzero values (e.g. {int(first)}); "
                         "TensorRT supports symmetric quantization only (zero point 0)")
        return scale, zero

    # ------------------------------------------------------------------------------------- weight walk
    def weight_shape(self, tensor: str) -> tuple[int, ...] | None:
        """Shape of a constant-derived tensor, following the walk of verify's ``Graph.trace``."""
        trace = self.graph.trace(tensor)
        if trace is None or trace.stop is not None:
            return None
        shape = self.graph.shape(trace.initializer)
        for node in trace.chain:
            if node.op_type == "Transpose":
                perm = attr(node, "perm") or list(reversed(range(len(shape))))
                if sorted(perm) != list(range(len(shape))):
                    return None
                shape = tuple(shape[p] for p in perm)
            elif node.op_type == "Reshape":
                shape = reshape_target(self.graph, node, shape)
                if shape is None:
                    return None
        return tuple(shape)

    def forward_uses(self, tensor: str, shape: tuple[int, ...]):
        """Yield ``(consumer, input slot, path, shapes)`` for every real consumer of a weight tensor.

        ``path`` holds the pass-through/layout nodes between the tensor and the consumer, ``shapes[i]`` the
        shape entering ``path[i]`` (``shapes[-1]`` is what the consumer reads; None when unknown).
        """
        stack = [(tensor, [], [shape])]
        while stack:
            name, path, shapes = stack.pop()
            for node, slot in self.consumers.get(name, []):
                if node.op_type in _PASS_OPS or (node.op_type in LAYOUT_OPS and slot == 0):
                    cur = shapes[-1]
                    nxt: tuple[int, ...] | None = cur
                    if cur is not None and node.op_type == "Transpose":
                        perm = attr(node, "perm") or list(reversed(range(len(cur))))
                        nxt = tuple(cur[p] for p in perm) if sorted(perm) == list(range(len(cur))) else None
                    elif cur is not None and node.op_type == "Reshape":
                        nxt = reshape_target(self.graph, node, cur)
                    if len(path) < 16:
                        stack.append((node.output[0], [*path, node], [*shapes, nxt]))
                else:
                    yield node, slot, path, shapes

    @staticmethod
    def consumer_out_axis(node: onnx.NodeProto, slot: int, rank: int) -> int | str:
        """Output-channel axis of a weight read at input ``slot`` of ``node``, or why there is none."""
        if node.op_type == "MatMul":
            if rank < 2:
                return f"{rank}-D MatMul operand has no output-channel axis"
            return rank - 1 if slot == 1 else rank - 2
        if node.op_type == "Gemm" and rank == 2:
            if slot == 1:
                return 0 if attr(node, "transB", 0) else 1
            if slot == 0:
                return 1 if attr(node, "transA", 0) else 0
        if node.op_type == "Conv" and slot == 1 and rank >= 2:
            return 0
        if node.op_type == "ConvTranspose" and slot == 1 and rank >= 2 and int(attr(node, "group", 1)) == 1:
            return 1
        return f"weight read by {node.op_type} (input {slot})"

    @staticmethod
    def map_back(axis: int, path: list[onnx.NodeProto], shapes: list[tuple[int, ...] | None]) -> int | str:
        for i in range(len(path) - 1, -1, -1):
            node = path[i]
            if node.op_type == "Transpose":
                in_shape = shapes[i]
                perm = attr(node, "perm") or list(reversed(range(len(in_shape or ()))))
                axis = int(perm[axis])
            elif node.op_type == "Reshape":
                a, b = shapes[i], shapes[i + 1]
                keeps = (a is not None and b is not None and len(a) == len(b) and a[axis] == b[axis]
                         and int(np.prod(a[axis + 1:])) == int(np.prod(b[axis + 1:])))
                if not keeps:
                    return f"Reshape '{node.name or node.output[0]}' changes the weight layout"
        return axis

    def check_weight(self, lead: onnx.NodeProto, dqs: list[onnx.NodeProto], scale: np.ndarray | None) -> None:
        self.counts["weight_quantizers"] += 1
        shape = self.weight_shape(lead.input[0])
        if scale is None:
            return
        if scale.size <= 1:
            self.counts["per_tensor_weights"] += 1
            self.add(lead, "weight-per-tensor", f"weight '{lead.input[0]}' has one scale for the whole tensor; "
                     "quantize it per output channel for accuracy", WARNING)
            return
        self.counts["per_channel_weights"] += 1
        if scale.ndim != 1:
            self.add(lead, "scale-shape", f"weight scale '{lead.input[1]}' has shape {list(scale.shape)}: blocked "
                     "quantization is not INT8 per-channel")
            return
        if shape is None:
            self.add(lead, "weight-consumer", f"cannot derive the shape of weight '{lead.input[0]}'; axis not "
                     "checked", WARNING)
            return
        rank = len(shape)
        axis = self._axis(lead)
        if not -rank <= axis < rank:
            self.add(lead, "scale-shape", f"axis {axis} is out of range for weight '{lead.input[0]}' of shape {list(shape)}")
            return
        axis %= rank
        if scale.size != shape[axis]:
            self.add(lead, "scale-shape", f"{scale.size} scales on axis {axis} of weight '{lead.input[0]}' "
                     f"{list(shape)}: axis {axis} has {shape[axis]} channels")
            return
        checked = False
        for dq in dqs:
            for consumer, slot, path, shapes in self.forward_uses(dq.output[0], shape):
                if shapes[-1] is None:
                    self.add(lead, "weight-consumer", f"the layout of weight '{lead.input[0]}' at {consumer.op_type} "
                             f"'{self.name(consumer)}' is unknown; axis not checked", WARNING)
                    continue
                expected = self.consumer_out_axis(consumer, slot, len(shapes[-1]))
                if isinstance(expected, int):
                    expected = self.map_back(expected, path, shapes)
                if isinstance(expected, str):
                    self.add(lead, "weight-consumer", f"{expected}: per-channel axis of weight '{lead.input[0]}' "
                             "not checked", WARNING)
                    continue
                checked = True
                if expected != axis:
                    via = "".join(f" -> {p.op_type}" + (f"(perm={list(attr(p, 'perm') or [])})" if p.op_type == "Transpose" else "")
                                  for p in path)
                    self.add(lead, "weight-axis", f"weight '{lead.input[0]}' {list(shape)} is quantized per channel on "
                             f"axis {axis}, but {consumer.op_type} '{self.name(consumer)}' reads it (DequantizeLinear"
                             f"{via} -> {consumer.op_type} input {slot}) with its output channels on axis {expected}; "
                             f"scales must run along the output channels (axis={expected})")
                if slot == 1 and consumer.op_type in _LAYER_OPS and not self.is_dequantized(consumer.input[0]):
                    self.add(consumer, "unquantized-input", f"{consumer.op_type} reads quantized weight "
                             f"'{lead.input[0]}' but its input '{consumer.input[0]}' has no DequantizeLinear; "
                             "TensorRT keeps this layer in higher precision", WARNING)
        if checked:
            self.counts["checked_weight_axes"] += 1

    def is_dequantized(self, tensor: str) -> bool:
        for _ in range(8):
            node = self.graph.producer.get(tensor)
            if node is None:
                return False
            if node.op_type == "DequantizeLinear":
                return True
            if node.op_type not in _PASS_OPS | LAYOUT_OPS:
                return False
            tensor = node.input[0]
        return False

    # -------------------------------------------------------------------------------- sparse INT8 rule
    def output_quantized(self, tensor: str, depth: int = 0, bias_seen: bool = False) -> bool:
        """Every use of ``tensor`` is a QuantizeLinear, after at most one bias ``Add`` and layout ops."""
        uses = self.consumers.get(tensor, [])
        if not uses or tensor in self.graph_outputs or depth > 8:
            return False
        for node, slot in uses:
            if node.op_type == "QuantizeLinear" and slot == 0:
                continue
            if node.op_type == "Add" and not bias_seen and self.graph.trace(node.input[1 - slot]) is not None:
                ok = self.output_quantized(node.output[0], depth + 1, True)
            elif node.op_type in _PASS_OPS or (node.op_type in LAYOUT_OPS and slot == 0):
                ok = self.output_quantized(node.output[0], depth + 1, bias_seen)
            else:
                ok = False
            if not ok:
                return False
        return True

    def check_sparse_int8(self, layer_map: dict[str, str], expected: set[str] | None) -> list[GemmEligibility]:
        """:class:`GemmEligibility` of every n:m layer in ``layer_map`` (initializer -> module) and of every
        attention matmul; adds ``sparse-int8`` errors and ``int8-attention`` warnings."""
        out: list[GemmEligibility] = []
        seen: set[tuple] = set()
        for init, module in sorted(layer_map.items(), key=lambda kv: kv[1]):
            if expected is not None and module not in expected:
                continue
            shape = self.graph.shape(init) if self.graph.is_const(init) else None
            gemms = []
            starts = []  # (tensor, weight read through a DequantizeLinear of the constant / of Q(constant))
            for first, _ in self.consumers.get(init, []):
                if first.op_type == "DequantizeLinear":
                    starts.append((first.output[0], True))
                elif first.op_type == "QuantizeLinear":
                    starts += [(dq.output[0], True) for dq, _ in self.consumers.get(first.output[0], [])
                               if dq.op_type == "DequantizeLinear"]
                else:
                    starts.append((init, False))
            for start, weight_dq in dict(starts).items():
                for consumer, cslot, _, _ in self.forward_uses(start, tuple(shape) if shape else None):
                    if consumer.op_type in ("MatMul", "Gemm"):
                        gemms.append((consumer, cslot, weight_dq))
            if not gemms:
                self.add(None, "sparse-int8", f"n:m layer {module}: no MatMul/Gemm reads its weight '{init}'")
                continue
            for gemm, slot, weight_dq in gemms:
                seen.add(_key(gemm))
                data = gemm.input[1 - slot] if gemm.op_type == "MatMul" else gemm.input[0]
                int8_in, int8_out = self.is_dequantized(data), self.output_quantized(gemm.output[0])
                missing = []
                if not int8_in:
                    missing.append(f"Q/DQ on the input '{data}'")
                if not weight_dq:
                    missing.append(f"DequantizeLinear of the INT8 weight '{init}'")
                if not int8_out:
                    missing.append(f"QuantizeLinear on the output '{gemm.output[0]}' (after the bias)")
                row = GemmEligibility(self.name(gemm), "n:m", module, int8_in, weight_dq, int8_out, missing)
                out.append(row)
                if missing:
                    self.add(gemm, "sparse-int8", f"n:m layer {module} is not eligible for TensorRT's sparse INT8 "
                             f"kernels: no {', no '.join(missing)}; TensorRT runs structured-sparse INT8 GEMMs "
                             "only INT8-in/INT8-out (quantize the GEMM outputs: train.qat.quantizers.gemm_outputs)")
        for node in self.proto.graph.node:
            if node.op_type != "MatMul" or _key(node) in seen:
                continue
            if any(self.graph.trace(i) is not None for i in node.input):
                continue  # a weight GEMM that is not n:m (not this rule's business)
            dq = [self.is_dequantized(i) for i in node.input]
            missing = [f"Q/DQ on the input '{i}'" for i, ok in zip(node.input, dq) if not ok]
            out.append(GemmEligibility(self.name(node), "attention", None, all(dq), True, True, missing))
            if missing:
                self.add(node, "int8-attention", f"attention matmul has no {', no '.join(missing)}; TensorRT keeps "
                         "it in higher precision (train.qat.quantizers.attention)", WARNING)
        return out

    # ------------------------------------------------------------------------------------------- main
    def run(self, layer_map: dict[str, str] | None = None, expected: set[str] | None = None) -> QdqLintReport:
        nodes = list(self.proto.graph.node)
        quant = [n for n in nodes if n.op_type == "QuantizeLinear"]
        dequant = [n for n in nodes if n.op_type == "DequantizeLinear"]
        self.counts["quantize_linear"], self.counts["dequantize_linear"] = len(quant), len(dequant)
        if not quant and not dequant:
            self.add(None, "no-qdq", "no QuantizeLinear/DequantizeLinear nodes: the graph is not explicitly quantized")
        if any(n.op_type == "Round" for n in nodes):
            first = next(n for n in nodes if n.op_type == "Round")
            self.add(first, "decomposed-fake-quant", "Round in the graph: fake quantization may have been exported "
                     "as arithmetic instead of Q/DQ", WARNING)
        if (quant or dequant) and self.opset < 10:
            self.add(None, "opset", f"opset {self.opset}: QuantizeLinear/DequantizeLinear need opset >= 10")

        paired_dqs: set[tuple] = set()
        for q in quant:
            scale, zero = self.check_params(q, None)
            dqs = []
            uses = self.consumers.get(q.output[0], [])
            if not uses:
                if q.output[0] in self.graph_outputs:
                    self.add(q, "qdq-pair", f"output '{q.output[0]}' is a graph output without DequantizeLinear")
                else:
                    self.add(q, "qdq-pair", "QuantizeLinear has no DequantizeLinear (its output is unused)")
            for consumer, _ in uses:
                if consumer.op_type != "DequantizeLinear":
                    self.add(q, "qdq-pair", f"QuantizeLinear feeds {consumer.op_type} '{self.name(consumer)}' "
                             "directly; TensorRT needs each QuantizeLinear followed by a DequantizeLinear")
                    continue
                dqs.append(consumer)
                paired_dqs.add(_key(consumer))
                self.check_match(q, consumer, scale, zero)
            self.check_granularity(q, dqs, scale)

        for dq in dequant:
            if _key(dq) in paired_dqs:
                continue
            src = dq.input[0]
            codes = self.value(src)
            if codes is None and self.graph.trace(src) is None:
                self.add(dq, "qdq-pair", f"DequantizeLinear reads '{src}', which is neither a QuantizeLinear output "
                         "nor a constant; TensorRT needs Q/DQ pairs on activations")
                self.check_params(dq, None)
                continue
            scale, _ = self.check_params(dq, codes.dtype if codes is not None else None)
            self.check_granularity(dq, [dq], scale)

        if self.counts["per_channel_weights"] and self.opset < 13:
            self.add(None, "opset", f"opset {self.opset}: per-channel QuantizeLinear/DequantizeLinear need opset >= 13")
        gemms = self.check_sparse_int8(layer_map, expected) if layer_map is not None else None
        self.findings.sort(key=lambda item: item[0])
        return QdqLintReport(path=self.path, findings=[f for _, f in self.findings], counts=dict(self.counts),
                             gemms=gemms)

    def check_match(self, q: onnx.NodeProto, dq: onnx.NodeProto, scale, zero) -> None:
        same_inputs = list(q.input[1:3]) == list(dq.input[1:3])
        if same_inputs:
            if self._axis(q) != self._axis(dq) and scale is not None and scale.size > 1:
                self.add(dq, "qdq-pair", f"axis {self._axis(dq)} differs from QuantizeLinear '{self.name(q)}' "
                         f"(axis {self._axis(q)})")
            return
        dq_scale, dq_zero = self.check_params(dq, None)
        problems = []
        if scale is not None and dq_scale is not None and (scale.shape != dq_scale.shape or not np.array_equal(scale, dq_scale)):
            problems.append("scale")
        if (zero is None) != (dq_zero is None) or (
            zero is not None and dq_zero is not None and (zero.dtype != dq_zero.dtype or not np.array_equal(zero, dq_zero))
        ):
            problems.append("zero point")
        if scale is not None and scale.size > 1 and self._axis(q) != self._axis(dq):
            problems.append("axis")
        if problems:
            self.add(dq, "qdq-pair", f"{' and '.join(problems)} differ(s) from its QuantizeLinear '{self.name(q)}'")

    def check_granularity(self, lead: onnx.NodeProto, dqs: list[onnx.NodeProto], scale: np.ndarray | None) -> None:
        if self.graph.trace(lead.input[0]) is not None:  # constant-derived: a weight
            self.check_weight(lead, dqs, scale)
            return
        self.counts["activation_quantizers"] += 1
        if scale is not None and scale.size > 1:
            self.add(lead, "activation-per-tensor", f"activation '{lead.input[0]}' is quantized per channel "
                     f"({scale.size} scales, axis {self._axis(lead)}); TensorRT needs one scale per activation tensor")


def sparse_int8_summary(gemms: list[GemmEligibility]) -> dict:
    """Counts of :attr:`QdqLintReport.gemms` for manifests: ``nm_layers``, ``eligible``, ``not_eligible``
    (module fqns), ``attention_matmuls``, ``attention_int8``."""
    nm = [g for g in gemms if g.kind == "n:m"]
    attention = [g for g in gemms if g.kind == "attention"]
    return {"nm_layers": len(nm), "eligible": sum(g.eligible for g in nm),
            "not_eligible": [g.module for g in nm if not g.eligible],
            "attention_matmuls": len(attention), "attention_int8": sum(g.eligible for g in attention)}


def lint_qdq(model: str | os.PathLike | onnx.ModelProto, layer_map: dict[str, str] | None = None,
             expected=None, sparse_rule: bool = True) -> QdqLintReport:
    """Check the Q/DQ nodes of an ONNX model against TensorRT's explicit-quantization rules.

    Args:
        model: path to an ``.onnx`` file (external data read from its directory) or an ``onnx.ModelProto``.
            Scales and zero points may be initializers or ``Constant`` outputs.
        layer_map: initializer name -> torch module fqn of every n:m layer, for the ``sparse-int8`` rule;
            default: the graph's ``nxm_deploy.sparsity`` metadata (written by the export stage), if any.
        expected: the module fqns that must be sparse INT8 (default: the metadata's ``expected``, else every
            layer of ``layer_map``).
        sparse_rule: False skips the ``sparse-int8``/``int8-attention`` rules (``report.gemms`` is None).

    Returns:
        QdqLintReport: every finding (see :data:`RULES`), each naming the offending node, plus Q/DQ counts.
        ``report.ok`` is True when there is no error.

    Raises:
        ExportError: when the file does not exist or cannot be parsed.
    """
    proto, path_text, base_dir = load_model_proto(model)
    if sparse_rule and layer_map is None:
        from nxm_deploy.export.verify import read_sparsity_metadata

        meta = read_sparsity_metadata(proto) or {}
        layer_map = meta.get("layer_map")
        expected = meta.get("expected") if expected is None else expected
    report = _Linter(proto, path_text, base_dir).run(
        layer_map if sparse_rule else None, set(expected) if expected is not None else None)
    log.info("%s", report.summary())
    return report


def verify_qdq(model: str | os.PathLike | onnx.ModelProto, allowed_rules: tuple[str, ...] = (),
               **kwargs) -> QdqLintReport:
    """Like :func:`lint_qdq` (``kwargs`` go to it), but raise when any rule of severity ``error`` is broken,
    except the rules in ``allowed_rules`` (their errors stay in the report, e.g. ``sparse-int8`` at export).

    Returns:
        QdqLintReport: the report (warnings allowed) when there is no error.

    Raises:
        ExportError: listing every error finding as ``node: [rule] message``; ``.report`` holds the report.
            Also raised for a missing or unreadable file.
    """
    report = lint_qdq(model, **kwargs)
    errors = [f for f in report.errors if f.rule not in allowed_rules]
    if not errors:
        return report
    lines = [f"{f.node}: [{f.rule}] {f.message}" for f in errors]
    exc = ExportError(
        f"{len(lines)} Q/DQ error(s) in {report.path} (not TensorRT-ready):\n  " + "\n  ".join(lines),
        hint="Export fake quantization as symmetric INT8 (int8 zero point 0), activations per tensor, weights per "
             "output channel (nxm_deploy.quantization.export_mode does this).",
    )
    exc.report = report
    raise exc
