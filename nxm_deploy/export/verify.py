"""Check that the weights of an exported ONNX graph hold an n:m sparsity pattern.

The graph walk is after Polygraphy's ``polygraphy/tools/sparse.py`` (``SparsityPruner``): for every
``MatMul``, ``Gemm`` and ``Conv`` node, take the weight input, trace it back through the layout-neutral
ops a quantized export puts in front of it (``DequantizeLinear``, ``QuantizeLinear``, ``Cast``,
``Identity``, rank- and group-preserving ``Reshape``) and through ``Transpose`` (mapping the reduction
axis through ``perm``) to an initializer, then count the groups of ``m_group`` consecutive entries along
the reduction axis that hold more than ``n_keep`` nonzeros.

Differences from Polygraphy, on purpose:

* any n:m pattern, not only 2:4; INT8/INT4 code initializers are checked too (Polygraphy skips non-float
  tensors). For codes read by a ``DequantizeLinear`` with a nonzero zero point, "zero" means
  ``code == zero_point`` (the value that dequantizes to 0.0);
* the whole tensor is counted (vectorised numpy) instead of stopping at the first bad group, so the report
  carries the number of violating groups and the first bad one;
* ``Transpose`` maps a consumer axis ``a`` to producer axis ``perm[a]`` (ONNX semantics:
  ``out.shape[i] == in.shape[perm[i]]``); Polygraphy uses ``perm.index(a)``, which agrees for 2-D;
* only input 1 of ``MatMul``/``Gemm`` is treated as the weight;
* a weight that is constant but computed by an op the walk cannot see through (``Mul``, ``Slice`` ...)
  is listed as skipped instead of silently dropped, so an expected layer hidden that way fails.

Weights that depend on a graph input (activation x activation ``MatMul`` in attention) are not listed.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from nxm_deploy.errors import ExportError, PatternError, SparsityVerificationError
from nxm_deploy.export.graph import Graph, Trace, attr, load_model_proto, node_name, reshape_target
from nxm_deploy.sparsity.mask import count_nm_violations
from nxm_deploy.sparsity.pattern import NMPattern

logger = logging.getLogger("nxm_deploy.export")

__all__ = ["LayerSparsity", "SparsityReport", "check_onnx_sparsity", "verify_onnx_sparsity"]

_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "MatMulInteger": 1, "MatMulIntegerToFloat": 1}
_UNKNOWN_AXIS = -1


#: A layer in which at least this share of the groups holds the pattern, but not all, is ``"violating"`` (a
#: damaged sparse layer), not ``"dense"``: in a dense weight almost no group of m holds n nonzeros or fewer.
VIOLATING_MIN_SHARE = 0.9

#: ``metadata_props`` key of the sparsity contract that travels inside an exported ONNX file.
SPARSITY_METADATA_KEY = "nxm_deploy.sparsity"


def write_sparsity_metadata(proto: onnx.ModelProto, pattern, layer_map: dict[str, str], expected, producer: str) -> None:
    """Store the sparsity contract in ``proto.metadata_props`` (replacing an earlier one).

    Args:
        pattern: the n:m pattern, e.g. ``"2:4"``. layer_map: initializer name -> torch module fqn of each
        n:m layer. expected: the torch module fqns trained n:m. producer: e.g. ``"nxm-deploy 0.1.0"``.
    """
    import json

    value = json.dumps({"pattern": str(pattern), "layer_map": dict(layer_map), "expected": sorted(expected),
                        "producer": producer}, sort_keys=True)
    for prop in list(proto.metadata_props):
        if prop.key == SPARSITY_METADATA_KEY:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = SPARSITY_METADATA_KEY, value


def read_sparsity_metadata(model: str | os.PathLike | onnx.ModelProto) -> dict | None:
    """The contract :func:`write_sparsity_metadata` stored (``pattern``, ``layer_map``, ``expected``,
    ``producer``), or None when the file carries none. Reads only the model header, not external data.

    Raises:
        ExportError: the file cannot be parsed.
    """
    import json

    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        try:
            proto = onnx.load(os.fspath(model), load_external_data=False)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"Cannot read ONNX model {model}: {exc}") from exc
    for prop in proto.metadata_props:
        if prop.key == SPARSITY_METADATA_KEY:
            return json.loads(prop.value)
    return None


@dataclass
class LayerSparsity:
    """The n:m check of one weight consumer (one ``MatMul``/``Gemm``/``Conv`` node).

    Attributes:
        node: ONNX node name (``"<op_type>_<index>"`` when the node is unnamed).
        op_type: ``"MatMul"``, ``"Gemm"`` or ``"Conv"``.
        initializer: name of the initializer (or ``Constant`` output) the weight traces back to.
        module: torch module fqn from the layer map (initializer name -> module), else None.
        shape: the initializer's shape.
        axis: the reduction axis in the initializer's own coordinates; ``-1`` when the walk could not map
            it (status is then ``"skipped: ..."``).
        dtype: numpy dtype name of the initializer, e.g. ``"float32"``, ``"int8"``.
        groups_checked: number of ``m_group``-long groups counted (0 when skipped).
        groups_violating: groups with more than ``n_keep`` nonzeros.
        density: fraction of nonzero entries of the initializer (for codes behind a ``DequantizeLinear``
            with a nonzero zero point: entries that do not dequantize to 0).
        expected_sparse: True when the layer map says this module was trained n:m.
        status: ``"sparse"``, ``"dense"``, ``"violating"`` (only without a layer map, i.e. no manifest and no
            contract in the file: at least :data:`VIOLATING_MIN_SHARE` of the groups hold the pattern but some do
            not, a damaged sparse layer; a failure) or ``"skipped: <reason>"``.
        first_bad: index of the first element of the first violating group, in the initializer's
            coordinates (``(row, column)`` for a 2-D weight), or None.
    """

    node: str
    op_type: str
    initializer: str
    module: str | None
    shape: tuple[int, ...]
    axis: int
    dtype: str
    groups_checked: int
    groups_violating: int
    density: float
    expected_sparse: bool
    status: str
    first_bad: tuple[int, ...] | None

    @property
    def label(self) -> str:
        """Module fqn when known, else the node name."""
        return self.module if self.module is not None else self.node

    @property
    def failed(self) -> bool:
        """True when the layer is expected sparse and is not ``"sparse"``, or when it is ``"violating"``."""
        return (self.expected_sparse and self.status != "sparse") or self.status == "violating"


@dataclass
class SparsityReport:
    """Per-layer n:m check of one ONNX model.

    Attributes:
        path: the model's path, or ``"<in-memory>"`` for a ``ModelProto``.
        pattern: the pattern checked, e.g. ``"2:4"``.
        layers: one entry per weight-consuming node, in graph order.
        missing_expected: modules of the ``expected`` set that no listed layer maps to (so they were not
            verified at all); sorted. Empty when ``expected`` was not given.
    """

    path: str
    pattern: str
    layers: list[LayerSparsity]
    missing_expected: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[LayerSparsity]:
        """Layers expected to be sparse whose status is not ``"sparse"`` (dense or skipped), and violating ones."""
        return [layer for layer in self.layers if layer.failed]

    @property
    def ok(self) -> bool:
        """True when no expected layer failed and every expected module was found in the graph."""
        return not self.failures and not self.missing_expected

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (tuples become lists)."""
        layers = []
        for layer in self.layers:
            row = asdict(layer)
            row["shape"] = list(layer.shape)
            row["first_bad"] = None if layer.first_bad is None else list(layer.first_bad)
            row["density"] = float(layer.density)
            layers.append(row)
        return {
            "path": self.path,
            "pattern": self.pattern,
            "ok": self.ok,
            "failures": [layer.label for layer in self.failures],
            "missing_expected": list(self.missing_expected),
            "layers": layers,
        }

    def table(self) -> str:
        """Fixed-width plain-text table, one row per layer.

        Columns: module (or node), initializer, shape, axis, groups, bad, density, status.
        """
        header = ("module", "initializer", "shape", "axis", "groups", "bad", "density", "status")
        rows = [
            (
                layer.label,
                layer.initializer,
                "x".join(str(d) for d in layer.shape) or "scalar",
                str(layer.axis),
                str(layer.groups_checked),
                str(layer.groups_violating),
                f"{layer.density:.3f}",
                layer.status,
            )
            for layer in self.layers
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        right = {3, 4, 5, 6}  # numeric columns

        def fmt(row: tuple[str, ...]) -> str:
            cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
            return "  ".join(cells).rstrip()

        lines = [fmt(header), "  ".join("-" * w for w in widths)]
        lines.extend(fmt(row) for row in rows)
        return "\n".join(lines)


def _consumer_axis(node: onnx.NodeProto, rank: int) -> int | str:
    """Reduction axis of the weight as the consumer sees it, or a skip reason."""
    if node.op_type in ("MatMul", "MatMulInteger", "MatMulIntegerToFloat"):
        if rank < 1:
            return "scalar weight"
        return 0 if rank == 1 else rank - 2
    if node.op_type == "Gemm":
        if rank != 2:
            return f"Gemm weight of rank {rank}"
        return 1 if attr(node, "transB", 0) else 0
    if rank < 2:  # Conv
        return f"Conv weight of rank {rank}"
    return 1


def _map_axis(graph: Graph, trace: Trace, consumer: onnx.NodeProto) -> int | str:
    """Map the consumer's reduction axis back through ``trace.chain``; an int axis or a skip reason."""
    shapes = [graph.shape(trace.initializer)]
    for node in trace.chain:  # forward: shape after each op
        shape = shapes[-1]
        if node.op_type == "Transpose":
            perm = attr(node, "perm") or list(reversed(range(len(shape))))
            if sorted(perm) != list(range(len(shape))):
                return f"transpose perm {list(perm)} does not fit shape {list(shape)}"
            shape = tuple(shape[p] for p in perm)
        elif node.op_type == "Reshape":
            target = reshape_target(graph, node, shape)
            if target is None:
                return "reshape with a non-constant or invalid shape"
            shape = target
        shapes.append(shape)

    axis = _consumer_axis(consumer, len(shapes[-1]))
    if isinstance(axis, str):
        return axis
    for i in range(len(trace.chain) - 1, -1, -1):  # backward: consumer axis -> producer axis
        node, in_shape, out_shape = trace.chain[i], shapes[i], shapes[i + 1]
        if node.op_type == "Transpose":
            perm = attr(node, "perm") or list(reversed(range(len(in_shape))))
            axis = int(perm[axis])
        elif node.op_type == "Reshape":
            keeps = (
                len(in_shape) == len(out_shape)
                and in_shape[axis] == out_shape[axis]
                and math.prod(in_shape[axis + 1 :]) == math.prod(out_shape[axis + 1 :])
            )
            if not keeps:
                return "reshape changes layout"
    return axis


def _zero_point(graph: Graph, trace: Trace) -> tuple[np.ndarray | None, str | None]:
    """Zero point to compare codes against, when the initializer holds codes read by a DequantizeLinear.

    Returns:
        (zero_point broadcastable to the initializer or None when codes compare against 0, skip reason).
    """
    before: list[str] = []
    for node in trace.chain:
        if node.op_type == "QuantizeLinear":
            return None, None  # float weight: Q(0) = zp and DQ(zp) = 0, zero stays zero
        if node.op_type != "DequantizeLinear":
            before.append(node.op_type)
            continue
        if len(node.input) < 3 or not node.input[2]:
            return None, None
        if not graph.is_const(node.input[2]):
            return None, "zero point is not constant"
        zero = graph.array(node.input[2])
        if not np.any(zero != 0):
            return None, None
        if any(op not in ("Identity",) for op in before):
            return None, f"asymmetric zero point behind {before}"
        shape = graph.shape(trace.initializer)
        if zero.ndim == 0 or zero.size == 1:
            return zero.reshape(()).astype(np.int64), None
        dq_axis = int(attr(node, "axis", 1)) % len(shape)
        block = int(attr(node, "block_size", 0) or 0)
        if zero.ndim == 1 and zero.shape[0] == shape[dq_axis]:
            view = [1] * len(shape)
            view[dq_axis] = shape[dq_axis]
            return zero.reshape(view).astype(np.int64), None
        if block and zero.ndim == len(shape):
            return np.repeat(zero.astype(np.int64), block, axis=dq_axis), None
        return None, f"zero point of shape {list(zero.shape)} does not fit weight {list(shape)}"
    return None, None


def check_onnx_sparsity(
    model: str | os.PathLike | onnx.ModelProto,
    pattern: NMPattern | str = "2:4",
    layer_map: dict[str, str] | None = None,
    expected: set[str] | None = None,
) -> SparsityReport:
    """Check the n:m pattern of every constant ``MatMul``/``Gemm``/``Conv`` weight (after Polygraphy tools/sparse.py).

    Reduction axis at the consumer: ``MatMul`` B ``[..., K, N]`` -> ``-2`` (0 for 2-D, 0 for 1-D);
    ``Gemm`` B -> 1 if ``transB`` else 0; ``Conv`` W ``[K, C, R, S]`` -> 1 (``C``). The axis is mapped back
    through ``Transpose`` (consumer axis ``a`` -> ``perm[a]``) and ``Reshape`` (only when rank, axis length
    and the trailing volume are kept) to the initializer, whose array (float weights or integer codes, any
    dtype) is counted once per (initializer, axis).

    Args:
        model: path to an ``.onnx`` file (external data is read from its directory) or a loaded
            ``onnx.ModelProto``.
        pattern: the pattern, e.g. ``"2:4"`` (``n_keep`` nonzeros kept per ``m_group`` consecutive weights).
        layer_map: initializer name -> torch module fqn (the export manifest's layer map). None: no layer
            is expected sparse, the report is informational.
        expected: module fqns trained n:m. None with a ``layer_map``: every mapped module is expected.

    Returns:
        SparsityReport: one :class:`LayerSparsity` per weight-consuming node whose weight is constant.
        Nodes whose weight depends on a graph input (activation x activation) are not listed.

    Raises:
        ConfigError: for a malformed pattern.
        ExportError: when the file does not exist or cannot be parsed.
    """
    pattern = NMPattern.parse(pattern)
    proto, path_text, base_dir = load_model_proto(model)
    graph = Graph(proto, base_dir)
    counted: dict[tuple[str, int, str], tuple[int, int, tuple[int, ...] | None, float] | str] = {}

    def count(trace: Trace, axis: int) -> tuple[int, int, tuple[int, ...] | None, float] | str:
        quant = next((n for n in trace.chain if n.op_type in ("QuantizeLinear", "DequantizeLinear")), None)
        zero_input = quant.input[2] if quant is not None and quant.op_type == "DequantizeLinear" and len(quant.input) > 2 else ""
        key = (trace.initializer, axis, zero_input)
        if key in counted:
            return counted[key]
        try:
            array = graph.array(trace.initializer)
        except Exception as exc:  # noqa: BLE001 - unreadable external data and the like
            counted[key] = f"cannot read initializer: {exc}"
            return counted[key]
        zero, reason = _zero_point(graph, trace)
        if reason is not None:
            counted[key] = reason
            return counted[key]
        if zero is not None:
            array = array.astype(np.int64) - zero
        try:
            checked, bad, first_bad = count_nm_violations(array, pattern, axis)
        except PatternError as exc:  # pre-checked by the caller; keep the message if it still happens
            counted[key] = exc.message
            return counted[key]
        density = float(np.count_nonzero(array)) / array.size if array.size else 0.0
        counted[key] = (checked, bad, first_bad, density)
        return counted[key]

    layers: list[LayerSparsity] = []
    for index, node in enumerate(proto.graph.node):
        if node.op_type not in _WEIGHT_INPUT or len(node.input) <= _WEIGHT_INPUT[node.op_type]:
            continue
        name = node_name(node, index)
        trace = graph.trace(node.input[_WEIGHT_INPUT[node.op_type]])
        if trace is None:
            logger.debug("%s %s: weight is not constant, not listed", node.op_type, name)
            continue
        init = trace.initializer
        shape = graph.shape(init)
        module = layer_map.get(init) if layer_map is not None else None
        if layer_map is None:
            is_expected = False
        elif expected is None:
            is_expected = module is not None
        else:
            is_expected = module is not None and module in expected

        groups_checked = groups_bad = 0
        first_bad: tuple[int, ...] | None = None
        density = float("nan")
        axis: int | str
        if trace.stop is not None:
            axis = _UNKNOWN_AXIS
            stop_name = trace.stop.name or trace.stop.output[0]
            status = f"skipped: weight computed by {trace.stop.op_type} '{stop_name}'"
        else:
            axis = _map_axis(graph, trace, node)
            if isinstance(axis, str):
                status, axis = f"skipped: {axis}", _UNKNOWN_AXIS
            elif shape[axis] % pattern.m_group != 0:
                status = f"skipped: reduction axis {shape[axis]} not a multiple of {pattern.m_group}"
            else:
                result = count(trace, axis)
                if isinstance(result, str):
                    status = f"skipped: {result}"
                else:
                    groups_checked, groups_bad, first_bad, density = result
                    if groups_bad == 0:
                        status = "sparse"
                    elif layer_map is None and 1 - groups_bad / groups_checked >= VIOLATING_MIN_SHARE:
                        status = "violating"
                    else:
                        status = "dense"
        if math.isnan(density):
            try:
                array = graph.array(init)
                density = float(np.count_nonzero(array)) / array.size if array.size else 0.0
            except Exception:  # noqa: BLE001
                density = 0.0
        layers.append(
            LayerSparsity(
                node=name,
                op_type=node.op_type,
                initializer=init,
                module=module,
                shape=shape,
                axis=int(axis),
                dtype=graph.dtype(init),
                groups_checked=int(groups_checked),
                groups_violating=int(groups_bad),
                density=float(density),
                expected_sparse=is_expected,
                status=status,
                first_bad=first_bad,
            )
        )

    missing: list[str] = []
    if expected is not None:
        found = {layer.module for layer in layers if layer.module is not None}
        missing = sorted(set(expected) - found)
        if missing:
            logger.warning(
                "%d expected %s module(s) not found among the graph's weights: %s",
                len(missing), pattern, ", ".join(missing),
            )
    report = SparsityReport(path=path_text, pattern=str(pattern), layers=layers, missing_expected=missing)
    logger.info(
        "%s: %d weight layer(s), %d sparse %s, %d failure(s)",
        path_text, len(layers), sum(layer.status == "sparse" for layer in layers), pattern, len(report.failures),
    )
    return report


def verify_onnx_sparsity(
    model: str | os.PathLike | onnx.ModelProto,
    pattern: NMPattern | str = "2:4",
    layer_map: dict[str, str] | None = None,
    expected: set[str] | None = None,
) -> SparsityReport:
    """Like :func:`check_onnx_sparsity`, but raise when an expected layer is not n:m sparse.

    Args:
        model: path to an ``.onnx`` file or an ``onnx.ModelProto``.
        pattern: the pattern, e.g. ``"2:4"``.
        layer_map: initializer name -> torch module fqn.
        expected: module fqns trained n:m; None: every module in ``layer_map``.

    Returns:
        SparsityReport: the report, when every expected layer is sparse.

    Raises:
        SparsityVerificationError: when ``report.failures`` (expected layers that are dense or skipped) or
            ``report.missing_expected`` is non-empty. The message names every failing layer (module if
            known, else node) with its first bad group; ``.report`` holds the full report.
        ConfigError: for a malformed pattern.
        ExportError: when the file does not exist or cannot be parsed.
    """
    report = check_onnx_sparsity(model, pattern, layer_map=layer_map, expected=expected)
    if report.ok:
        return report
    parts = []
    for layer in report.failures:
        where = f"'{layer.label}' (node '{layer.node}', initializer '{layer.initializer}')"
        if layer.status in ("dense", "violating"):
            coord = "(row, column)" if len(layer.first_bad or ()) == 2 else "index"
            parts.append(
                f"{where}: {layer.groups_violating} of {layer.groups_checked} groups along axis {layer.axis} "
                f"have more than {NMPattern.parse(report.pattern).n_keep} nonzeros, first bad group at "
                f"{coord} = {layer.first_bad}"
            )
        else:
            parts.append(f"{where}: {layer.status}")
    for module in report.missing_expected:
        parts.append(f"'{module}': expected sparse but no weight in the graph maps to it")
    total = len(report.failures) + len(report.missing_expected)
    message = f"{total} layer(s) of {report.path} expected to be {report.pattern} sparse are not:\n  " + "\n  ".join(parts)
    raise SparsityVerificationError(
        message,
        report=report,
        hint=(
            f"Re-apply the {report.pattern} projection to these weights before export (nm_project), check "
            "that the layer map names the exported initializers, or drop the layers from the expected set "
            "if they were not trained sparse."
        ),
    )
