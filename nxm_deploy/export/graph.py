"""The ONNX graph walker of the export checks: name maps of one graph, constant values, and the walk back from a
weight input through layout-neutral ops to its initializer (after Polygraphy's ``polygraphy/tools/sparse.py``).

Used by the n:m check (:mod:`nxm_deploy.export.verify`), the Q/DQ lint (:mod:`nxm_deploy.export.qdq_lint`) and the
CPU INT8 rewrite (:mod:`nxm_deploy.export.cpu_int8`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from nxm_deploy.errors import ExportError

#: ops a weight passes through without changing its layout (a quantized export puts them in front of GEMMs)
SAME_LAYOUT_OPS = {"QuantizeLinear", "DequantizeLinear", "Cast", "Identity"}
#: ops that change the layout in a way the walk maps (``perm``, a constant target shape)
LAYOUT_OPS = {"Transpose", "Reshape"}


@dataclass
class Trace:
    """Where a weight input comes from: an initializer plus the ops between it and the consumer."""

    initializer: str
    chain: list[onnx.NodeProto]  # forward order: chain[0] reads the initializer
    stop: onnx.NodeProto | None = None  # an op the walk cannot see through (weight still constant)


class Graph:
    """Name maps of one ONNX graph plus per-initializer caches."""

    def __init__(self, model: onnx.ModelProto, base_dir: str):
        graph = model.graph
        self.base_dir = base_dir
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.constants: dict[str, onnx.NodeProto] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            if node.op_type == "Constant" and node.output:
                self.constants[node.output[0]] = node
        self._arrays: dict[str, np.ndarray] = {}
        self._const_derived: dict[str, bool] = {}

    def is_const(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def array(self, name: str) -> np.ndarray:
        """The value of an initializer or ``Constant`` output (cached)."""
        if name not in self._arrays:
            if name in self.initializers:
                value = numpy_helper.to_array(self.initializers[name], base_dir=self.base_dir)
            else:
                value = constant_value(self.constants[name])
            self._arrays[name] = np.asarray(value)
        return self._arrays[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.initializers:
            return tuple(int(d) for d in self.initializers[name].dims)
        return tuple(self.array(name).shape)

    def dtype(self, name: str) -> str:
        if name in self.initializers:
            try:
                return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.initializers[name].data_type)))
            except Exception:  # noqa: BLE001 - exotic types: fall back to the ONNX name
                return onnx.TensorProto.DataType.Name(self.initializers[name].data_type).lower()
        return str(self.array(name).dtype)

    def const_leaves(self, name: str) -> list[str] | None:
        """Constant tensors ``name`` is computed from, or None when it depends on a graph input."""
        leaves: list[str] = []
        stack, seen = [name], set()
        while stack:
            tensor = stack.pop()
            if tensor in seen or not tensor:
                continue
            seen.add(tensor)
            if self.is_const(tensor):
                leaves.append(tensor)
                continue
            if self._const_derived.get(tensor) is False:
                return None
            node = self.producer.get(tensor)
            if node is None:  # graph input
                self._const_derived[name] = False
                return None
            stack.extend(node.input)
        self._const_derived[name] = True
        return leaves

    def trace(self, tensor: str) -> Trace | None:
        """Walk back from a weight input to its initializer; None when it is not constant."""
        backward: list[onnx.NodeProto] = []
        name, seen = tensor, set()
        while not self.is_const(name):
            if name in seen:
                return None
            seen.add(name)
            node = self.producer.get(name)
            if node is None:
                return None  # graph input: an activation
            if node.op_type in SAME_LAYOUT_OPS or node.op_type in LAYOUT_OPS:
                backward.append(node)
                name = node.input[0]
                continue
            leaves = self.const_leaves(name)
            if not leaves:
                return None
            largest = max(leaves, key=lambda t: math.prod(self.shape(t)))
            return Trace(initializer=largest, chain=list(reversed(backward)), stop=node)
        return Trace(initializer=name, chain=list(reversed(backward)))


def constant_value(node: onnx.NodeProto) -> np.ndarray:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return np.asarray(onnx.helper.get_attribute_value(attr))
    raise ValueError(f"Constant node '{node.name}' has no dense value attribute")


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def reshape_target(graph: Graph, node: onnx.NodeProto, in_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    if len(node.input) < 2 or not graph.is_const(node.input[1]):
        return None
    target = [int(d) for d in graph.array(node.input[1]).reshape(-1)]
    allow_zero = bool(attr(node, "allowzero", 0))
    out = [in_shape[i] if (d == 0 and not allow_zero and i < len(in_shape)) else d for i, d in enumerate(target)]
    if out.count(-1) == 1:
        known = math.prod(d for d in out if d != -1)
        out[out.index(-1)] = math.prod(in_shape) // known if known else 0
    if any(d < 0 for d in out) or math.prod(out) != math.prod(in_shape):
        return None
    return tuple(out)


def load_model_proto(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str, str]:
    if isinstance(model, onnx.ModelProto):
        return model, "<in-memory>", ""
    path = Path(os.fspath(model))
    if not path.is_file():
        raise ExportError(f"ONNX model {str(path)!r} does not exist.", hint="Export the model first.")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # noqa: BLE001 - protobuf / external-data errors vary by onnx version
        raise ExportError(
            f"Cannot load ONNX model {str(path)!r}: {exc}",
            hint="Keep external data files next to the .onnx file, as onnx.save writes them.",
        ) from exc
    return proto, str(path), str(path.parent)
