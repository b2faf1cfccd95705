"""Read a built engine's layer information and check it against the request (CPU-only; no ``tensorrt``).

Input: the JSON of ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` for an engine
built with ``ProfilingVerbosity.DETAILED`` (what ``trtexec --profilingVerbosity=detailed
--exportLayerInfo=f.json`` writes). Format, per the TensorRT developer guide "Engine Inspector" section,
NVIDIA's trt-engine-explorer (``trex/parser.py``, ``trex/activations.py``, ``trex/layer.py``) and the layer
dumps in NVIDIA/TensorRT#4020 and #4056::

    {"Layers": [{"Name": "...", "LayerType": "CaskConvolution" | "CaskGemmMatrixMultiply" | "gemm" | ...,
                 "Inputs":  [{"Name", "Location", "Dimensions", "Format/Datatype": "Row major linear FP32"}],
                 "Outputs": [...],
                 "ParameterType": "Convolution" | "MatrixMultiply" | ...,
                 "Weights": {"Type": "Int8", "Count": N}, "Bias": {"Type": "Float", "Count": N},
                 "HasSparseWeights": 0 | 1, "TacticName": "...", "TacticValue": "0x...",
                 "Metadata": "[ONNX Layer: a]\\x1e[ONNX Layer: b]"}, ...],
     "Bindings": ["input_ids", ...]}                                  # TensorRT 10.x

TensorRT 11 ("Migrating IEngineInspector Usage from TensorRT 10.x to 11.x") replaces ``Bindings`` by
``"I/O Tensors": [{"Name", "IOMode", "DataType", "Dimensions", ...}]`` and splits the tensor descriptions
into ``"DataType"`` and ``"Format"``; both forms are read. Myelin ("kgen") layers report bare data types
("Half", "Float", "Int8"). Layer names hold the ONNX node names, fused with ``" + "`` (Myelin regions as
``{ForeignNode[first...last]}``), and ``Metadata`` lists them as ``[ONNX Layer: name]`` separated by
``\\x1e``/``\\x1f``; that is the join key back to ONNX nodes, and through the export manifest's layer map
(initializer -> torch module) to the torch modules trained sparse.

The check (:func:`check_engine`) flags

(a) layers trained n:m sparse that do not run a sparse tactic, with the likely reason (weights not n:m in
    the ONNX, not found in the engine, MatMul form, FP output of an INT8 GEMM, too narrow, not eligible /
    slower per the builder log); a miss of a ``require_sparse`` module is an error, other misses warnings;
(b) any layer whose precision differs from the request: every GEMM (ONNX ``MatMul``/``Gemm`` with a constant
    weight) must run INT8 when its weight is quantized (``int8-qdq``), FP16 for ``fp16`` and FP32 for
    ``fp32``; for ``fp16`` every other float layer made only of converted nodes must run FP16 (the "silent
    FP32 engine" failure). These are errors.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nxm_deploy.errors import ConfigError, EngineCheckError  # noqa: F401 - EngineCheckError: part of this API

__all__ = [
    "EngineCheck", "EngineCheckError", "EngineInfo", "EngineLayer", "GemmNode", "TensorInfo", "check_engine",
    "gemm_nodes", "module_from_node", "parse_layer_json", "parse_sparsity_log",
]




# ------------------------------------------------------------------------------------------- layer JSON

_DTYPE_TOKENS = [  # (regex on the description, normalized precision); first match wins
    (r"\bBFloat16\b|\bBF16\b", "BF16"),
    (r"\bFP8\b|\bFloat8\b|\bE4M3\b", "FP8"),
    (r"\bFP16\b|\bHalf\b", "FP16"),
    (r"\bFP32\b|\bFloat\b", "FP32"),
    (r"\bDouble\b", "FP64"),
    (r"\bINT8\b|\bInt8\b", "INT8"),
    (r"\bUInt8\b|\bUINT8\b", "UINT8"),
    (r"\bInt4\b|\bINT4\b", "INT4"),
    (r"\bInt32\b|\bINT32\b", "INT32"),
    (r"\bInt64\b|\bINT64\b", "INT64"),
    (r"\bBool\b|\bBOOL\b", "BOOL"),
]
FLOAT_TYPES = {"FP32", "FP16", "BF16", "FP8", "FP64"}


def normalize_dtype(text: str | None) -> str | None:
    """``"Row major linear FP16 format"`` / ``"Half"`` / ``"Float"`` / ``"Int8 NC/32HW32"`` -> ``FP16``/``FP32``/``INT8``."""
    if not text:
        return None
    for pattern, name in _DTYPE_TOKENS:
        if re.search(pattern, str(text)):
            return name
    return None


@dataclass
class TensorInfo:
    name: str
    dims: list
    dtype: str | None  # normalized: FP32, FP16, INT8, INT32, INT64, BOOL, ...
    format: str

    @classmethod
    def from_json(cls, raw: dict) -> "TensorInfo":
        if "DataType" in raw:  # TensorRT 11
            dtype, fmt = normalize_dtype(raw.get("DataType")), str(raw.get("Format", ""))
        else:  # TensorRT 8.x-10.x
            fmt = str(raw.get("Format/Datatype", ""))
            dtype = normalize_dtype(fmt)
        return cls(name=str(raw.get("Name", "")), dims=list(raw.get("Dimensions") or []), dtype=dtype, format=fmt)


_ONNX_META = re.compile(r"\[ONNX Layer: ([^\]\x1e\x1f]+)\]")
_FOREIGN = re.compile(r"\{ForeignNode\[(.*)\]\}")
_PROFILE_SUFFIX = re.compile(r"\s*\[profile \d+\]$")
_MYELIN_SUFFIX = re.compile(r"_myl\d+_\d+$")


def onnx_names_of(name: str, metadata: str | None) -> list[str]:
    """ONNX node names a TensorRT layer was made from: the ``Metadata`` entries, else the fused name parts."""
    names = [m.strip() for m in _ONNX_META.findall(metadata or "")]
    if names:
        return list(dict.fromkeys(names))
    name = _PROFILE_SUFFIX.sub("", name)
    foreign = _FOREIGN.search(name)
    if foreign:  # a Myelin region: only its first and last node are named
        parts = [p.strip() for p in foreign.group(1).split("...")]
    else:
        parts = [p.strip() for p in re.split(r"\s\+\s|\x1e|\x1f", name)]
    out = []
    for part in parts:
        part = _MYELIN_SUFFIX.sub("", part)
        part = re.sub(r"^(Reformatting CopyNode for (Input|Output) Tensor \d+ to )", "", part)
        if part:
            out.append(part)
    return list(dict.fromkeys(out))


_SPARSE_TACTIC = re.compile(r"sparse|sptensor", re.IGNORECASE)
_GEMM_TYPES = re.compile(r"convolution|gemm|matrixmultiply|matmul|fullyconnected", re.IGNORECASE)
_SKIP_TYPES = {"reformat", "noop", "signal", "wait", "constant"}


@dataclass
class EngineLayer:
    """One layer of the engine inspector's JSON."""

    name: str
    layer_type: str
    parameter_type: str | None
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    tactic: str | None
    has_sparse_weights: bool | None  # None: the layer reports no such field (not a conv/FC-like layer)
    weights_type: str | None
    onnx_nodes: list[str]

    @classmethod
    def from_json(cls, raw: dict) -> "EngineLayer":
        name = str(raw.get("Name", ""))
        sparse = raw.get("HasSparseWeights")
        weights = raw.get("Weights") if isinstance(raw.get("Weights"), dict) else {}
        return cls(
            name=name, layer_type=str(raw.get("LayerType", "")), parameter_type=raw.get("ParameterType"),
            inputs=[TensorInfo.from_json(t) for t in raw.get("Inputs") or [] if isinstance(t, dict)],
            outputs=[TensorInfo.from_json(t) for t in raw.get("Outputs") or [] if isinstance(t, dict)],
            tactic=raw.get("TacticName"), has_sparse_weights=None if sparse is None else bool(int(sparse)),
            weights_type=normalize_dtype(weights.get("Type")), onnx_nodes=onnx_names_of(name, raw.get("Metadata")),
        )

    @property
    def ran_sparse(self) -> bool:
        """The chosen tactic is a sparse kernel (``sparse``/``sptensor`` in its name).

        ``HasSparseWeights: 1`` alone does not say so: TensorRT 10 sets it on layers whose weights are eligible and
        then may pick a dense tactic (NVIDIA/TensorRT#4020: ``HasSparseWeights: 1`` with
        ``sm80_xmma_fprop_implicit_gemm_...`` on one layer, with ``sm80_xmma_fprop_avdt_sparse_int8int8_...`` on
        another). Only a layer that reports no tactic name falls back to ``HasSparseWeights``.
        """
        if self.tactic:
            return bool(_SPARSE_TACTIC.search(self.tactic))
        return bool(self.has_sparse_weights)

    @property
    def precision(self) -> str | None:
        """Compute precision: INT8 when an input or the weights are INT8, else the first float type of the
        inputs (then outputs), else the first non-float type (shape/index layers), else None."""
        types = [t.dtype for t in self.inputs if t.dtype]
        if "INT8" in types or self.weights_type == "INT8":
            return "INT8"
        floats = [t for t in types if t in FLOAT_TYPES] or [t.dtype for t in self.outputs if t.dtype in FLOAT_TYPES]
        if floats:
            return floats[0]
        return (types or [t.dtype for t in self.outputs if t.dtype] or [None])[0]

    @property
    def output_precision(self) -> str | None:
        return next((t.dtype for t in self.outputs if t.dtype), None)

    @property
    def is_gemm_like(self) -> bool:
        return bool(_GEMM_TYPES.search(f"{self.layer_type} {self.parameter_type or ''}"))

    @property
    def is_matmul_form(self) -> bool:
        """A matrix-multiply layer (not convolution/FC form): no sparse tactic exists for it in some versions."""
        text = f"{self.layer_type} {self.parameter_type or ''}".lower()
        return ("matrixmultiply" in text or "matmul" in text or self.layer_type.lower() == "gemm") and "convolution" not in text

    @property
    def skipped(self) -> bool:
        return self.layer_type.lower() in _SKIP_TYPES or (self.parameter_type or "").lower() in _SKIP_TYPES

    @property
    def opaque(self) -> bool:
        """A whole Myelin region reported as one layer (``{ForeignNode[first...last]}``): its I/O types are the
        region's boundary, not the precision of the GEMMs inside, so it verifies nothing."""
        return self.layer_type.lower() == "myelin" or bool(_FOREIGN.search(self.name))


@dataclass
class EngineInfo:
    layers: list[EngineLayer]
    io_tensors: list[str]
    schema: str  # "trt10" (Bindings, Format/Datatype) or "trt11" (I/O Tensors, DataType/Format)


def parse_layer_json(data: str | bytes | dict | Path) -> EngineInfo:
    """Parse the engine inspector's JSON (text, bytes, parsed dict or a file path).

    Raises:
        ConfigError: not that JSON, or built without ``ProfilingVerbosity.DETAILED`` (layers are bare names).
    """
    if isinstance(data, Path):
        data = data.read_text()
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"Engine layer information is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("Layers"), list):
        raise ConfigError("Engine layer information has no 'Layers' list.")
    raw_layers = data["Layers"]
    if raw_layers and not all(isinstance(layer, dict) for layer in raw_layers):
        raise ConfigError("Engine layer information lists bare layer names: the engine was not built with "
                          "ProfilingVerbosity.DETAILED.")
    raw_layers = [layer for layer in raw_layers if str(layer.get("LayerType", "")).lower() not in ("signal", "wait")]
    raw_layers = [layer for layer in raw_layers if not re.search(r"\[profile [1-9]\d*\]", str(layer.get("Name", "")))]
    if "I/O Tensors" in data:
        io = [str(t.get("Name")) for t in data["I/O Tensors"] if isinstance(t, dict)]
        schema = "trt11"
    else:
        io = [str(t) for t in data.get("Bindings") or []]
        schema = "trt10"
    return EngineInfo(layers=[EngineLayer.from_json(layer) for layer in raw_layers], io_tensors=io, schema=schema)


def parse_sparsity_log(lines: list[str]) -> tuple[set[str] | None, set[str] | None]:
    """ONNX node names ``(eligible, picked)`` from the builder's ``(Sparsity)`` lines (None: line absent).

    TensorRT 10 writes ``(Sparsity) Found N layer(s) eligible to use sparse tactics: a, b`` and ``(Sparsity) Chose N
    layer(s) using sparse tactics: a`` (inside Myelin regions prefixed ``(foreignNode)``; NVIDIA's TensorRT 10.16
    sparsity sample log); TensorRT 8 wrote ``Layers eligible for sparse math: ...`` and ``TRT inference plan picked
    sparse implementation for layers: ...``. Both forms are read; lines of several regions are merged.
    """
    eligible = picked = None
    for line in lines:
        head, _, tail = line.partition(":")
        if "(Sparsity)" not in head and "(Sparsity)" not in line:
            continue
        match = re.search(r"\(Sparsity\)\s*(.*?):\s*(.*)$", line)
        if not match:
            continue
        what, names = match.group(1).lower(), match.group(2)
        nodes = {n for part in names.split(", ") for n in onnx_names_of(part.strip(), None)} if names.strip() else set()
        if "eligible" in what:
            eligible = (eligible or set()) | nodes
        elif "picked" in what or "chose" in what:
            picked = (picked or set()) | nodes
    return eligible, picked


# ------------------------------------------------------------------------------------------- ONNX side


@dataclass
class GemmNode:
    """An ONNX ``MatMul``/``Gemm`` with a constant weight (from :func:`check_onnx_sparsity` rows)."""

    node: str
    op_type: str
    initializer: str
    module: str | None
    shape: list[int]
    nm_sparse: bool  # the weight holds the pattern in the ONNX file
    quantized: bool  # the weight reaches the node through a DequantizeLinear


def module_from_node(node: str) -> str | None:
    """``/model/bert/encoder/layer.0/attention/self/query/MatMul`` -> ``bert.encoder.layer.0.attention.self.query``
    (the TorchScript exporter's scope names; the export wraps the model as ``model``)."""
    if not node.startswith("/"):
        return None
    parts = node.strip("/").split("/")[:-1]
    if parts and parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts) or None


def gemm_nodes(onnx_path: str | Path, layer_map: dict[str, str] | None = None, pattern: str = "2:4") -> list[GemmNode]:
    """The GEMMs with constant weights of an ONNX file, with torch module, n:m status and quantization.

    Module names come from the export manifest's layer map (initializer -> module) when it covers the
    initializer, else from the node's scope name (:func:`module_from_node`).
    """
    import onnx

    from nxm_deploy.export.verify import check_onnx_sparsity

    model = onnx.load(str(onnx_path), load_external_data=False)
    producer = {out: n for n in model.graph.node for out in n.output}
    report = check_onnx_sparsity(str(onnx_path), pattern, layer_map=layer_map)
    by_name = {n.name: n for n in model.graph.node}
    rows = []
    for row in report.layers:
        if row.op_type not in ("MatMul", "Gemm"):
            continue
        node = by_name.get(row.node)
        quantized = False
        if node is not None and len(node.input) > 1:
            tensor, hops = node.input[1], 0
            while tensor in producer and hops < 8:
                prev = producer[tensor]
                if prev.op_type == "DequantizeLinear":
                    quantized = True
                    break
                if prev.op_type not in ("Transpose", "Reshape", "Cast", "Identity"):
                    break
                tensor, hops = prev.input[0], hops + 1
        rows.append(GemmNode(
            node=row.node, op_type=row.op_type, initializer=row.initializer,
            module=row.module or module_from_node(row.node), shape=list(row.shape),
            nm_sparse=row.status == "sparse", quantized=quantized,
        ))
    return rows


# ------------------------------------------------------------------------------------------- the check


@dataclass
class LayerRow:
    """One GEMM of the request joined to the engine."""

    module: str | None
    onnx_node: str
    engine_layer: str | None
    layer_type: str | None
    precision: str | None
    expected_precision: str | None
    tactic: str | None
    has_sparse_weights: bool | None
    trained_sparse: bool
    ran_sparse: bool
    sparse_reason: str | None = None
    problem: str | None = None


@dataclass
class EngineCheck:
    """Result of :func:`check_engine`. ``ok`` is False when ``errors`` is not empty."""

    precision: str
    sparse_weights: bool
    rows: list[LayerRow]
    other_mismatches: list[dict]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    layers: int = 0
    schema: str = "trt10"

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        gemms = [r for r in self.rows if r.expected_precision]
        right = sum(1 for r in gemms if r.precision == r.expected_precision)
        trained = [r for r in self.rows if r.trained_sparse]
        text = f"{right}/{len(gemms)} GEMMs at requested precision"
        if self.sparse_weights:
            text += f", {sum(r.ran_sparse for r in trained)}/{len(trained)} trained-sparse layers run sparse"
        return text + ("" if self.ok else f"; {len(self.errors)} errors")

    def to_dict(self) -> dict:
        return {"ok": self.ok, "summary": self.summary(), "precision": self.precision,
                "sparse_weights": self.sparse_weights, "layers": self.layers, "schema": self.schema,
                "errors": self.errors, "warnings": self.warnings, "other_mismatches": self.other_mismatches,
                "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        """Fixed-width table: module, engine layer, precision (expected), tactic, sparse, note."""
        header = ("module / node", "engine layer", "precision", "sparse", "tactic", "note")
        body = []
        for r in self.rows:
            prec = r.precision or "-"
            if r.expected_precision and r.precision != r.expected_precision:
                prec += f" (want {r.expected_precision})"
            sparse = ("yes" if r.ran_sparse else "no") + ("*" if r.trained_sparse else "")
            body.append((r.module or r.onnx_node, _short(r.engine_layer or "(not found)", 48), prec, sparse,
                         _short(r.tactic or "-", 40), r.problem or r.sparse_reason or ""))
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
        lines.append("(* trained sparse)")
        return "\n".join(lines)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _expected(precision: str, gemm: GemmNode) -> str | None:
    if precision == "int8-qdq":
        return "INT8" if gemm.quantized else None
    return {"fp16": "FP16", "fp32": "FP32"}[precision]


#: below this many input or output channels sparse kernels rarely beat dense ones (NVIDIA/TensorRT#3849, #4065)
NARROW_CHANNELS = 256


def _sparse_reason(gemm: GemmNode, layer: EngineLayer | None, precision: str, eligible: set[str] | None,
                   picked: set[str] | None, pattern: str) -> str:
    if not gemm.nm_sparse:
        return f"not eligible: the weight is not {pattern} in the ONNX graph"
    if layer is None:
        return "not found: no engine layer names this ONNX node (inside a Myelin region or fused away)"
    reasons = []
    if eligible is not None and gemm.node not in eligible:
        reasons.append("not eligible per the builder log")
    if layer.is_matmul_form:
        reasons.append(f"MatMul form: TensorRT kept it as a {layer.layer_type} layer, which has no sparse tactics "
                       "in some versions (export as Gemm / 1x1 conv)")
    if precision == "int8-qdq" and layer.output_precision in FLOAT_TYPES:
        reasons.append(f"FP output: the INT8 GEMM writes {layer.output_precision}; sparse INT8 kernels want an INT8 "
                       "output (quantize the GEMM output)")
    narrow = [d for d in gemm.shape if d < NARROW_CHANNELS]
    if narrow:
        reasons.append(f"too narrow: weight {'x'.join(map(str, gemm.shape))} (< {NARROW_CHANNELS} channels; dense "
                       "tactics usually win)")
    if eligible is not None and gemm.node in eligible and (picked is None or gemm.node not in picked):
        reasons.append("eligible, but the dense tactic timed faster")
    return "; ".join(reasons) or "TensorRT chose a dense tactic (no reason known)"


def check_engine(info: EngineInfo, *, precision: str, sparse_weights: bool, gemms: list[GemmNode],
                 sparse_modules: list[str] | None = None, require_sparse=None, fp32_nodes: list[str] | None = None,
                 sparsity_log: list[str] | None = None, pattern: str = "2:4", fp16_remainder: bool = False) -> EngineCheck:
    """Join engine layers to the ONNX GEMMs and check precision and sparsity (see the module docstring).

    Args:
        precision: the spec's ``int8-qdq`` / ``fp16`` / ``fp32``.
        gemms: :func:`gemm_nodes` of the ONNX file the engine was built from.
        sparse_modules: torch modules trained n:m (the export manifest's ``sparse_modules``).
        require_sparse: callable ``module -> bool`` (the spec's ``require_sparse`` patterns), None when the
            spec has none; it must match at least one GEMM, and each match must run sparse.
        fp32_nodes: nodes the FP16 conversion left in FP32 (``fp16``, or INT8 with an FP16 remainder; FP32 is
            allowed there).
        fp16_remainder: an ``int8-qdq`` engine built from the FP16-remainder graph: every other float layer made
            only of converted nodes must run FP16, as in an ``fp16`` engine.
        sparsity_log: the builder's ``(Sparsity)`` lines.
    """
    sparse_modules = set(sparse_modules or [])
    fp32_nodes = set(fp32_nodes or [])
    eligible, picked = parse_sparsity_log(sparsity_log or [])
    by_node: dict[str, list[EngineLayer]] = {}
    opaque = [layer for layer in info.layers if layer.opaque]
    for layer in info.layers:
        if layer.opaque:
            continue
        for node in layer.onnx_nodes:
            by_node.setdefault(node, []).append(layer)
    check = EngineCheck(precision=precision, sparse_weights=sparse_weights, rows=[], other_mismatches=[],
                        layers=len(info.layers), schema=info.schema)
    gemm_names = {g.node for g in gemms}
    required_count = 0
    for gemm in gemms:
        candidates = by_node.get(gemm.node, [])
        real = [c for c in candidates if not c.skipped]  # not the reformat copies in front of it
        layer = next((c for c in real if c.is_gemm_like), real[0] if real else None)
        expected = _expected(precision, gemm)
        trained = sparse_weights and gemm.module in sparse_modules
        ran = any(c.ran_sparse for c in candidates) or (picked is not None and gemm.node in picked)
        row = LayerRow(
            module=gemm.module, onnx_node=gemm.node, engine_layer=layer.name if layer else None,
            layer_type=layer.layer_type if layer else None, precision=layer.precision if layer else None,
            expected_precision=expected, tactic=layer.tactic if layer else None,
            has_sparse_weights=layer.has_sparse_weights if layer else None, trained_sparse=trained, ran_sparse=ran,
        )
        if expected and layer is not None and row.precision != expected:
            row.problem = f"runs {row.precision}, requested {expected}"
            check.errors.append(f"{gemm.module or gemm.node}: engine layer '{_short(layer.name, 80)}' runs "
                                f"{row.precision}, the spec requests {expected}")
        required = sparse_weights and require_sparse is not None and require_sparse(gemm.module)
        required_count += bool(required)
        if (trained or required) and not ran:
            if trained:
                row.sparse_reason = _sparse_reason(gemm, layer, precision, eligible, picked, pattern)
            else:
                row.sparse_reason = "not trained sparse (not in the export manifest's sparse_modules)"
            message = f"{gemm.module or gemm.node} {'was trained ' + pattern + ' sparse but ' if trained else ''}" \
                      f"runs dense: {row.sparse_reason}"
            if required:
                check.errors.append(message + " (required by the spec's require_sparse)")
            else:
                check.warnings.append(message)
        check.rows.append(row)
    if require_sparse is not None and sparse_weights and not required_count:
        check.errors.append("the spec's require_sparse patterns match none of the engine's GEMM modules")
    if expected_checkable := [r for r in check.rows if r.expected_precision]:
        if all(r.engine_layer is None for r in expected_checkable):
            where = f" (the engine shows {len(opaque)} opaque Myelin region(s))" if opaque else ""
            check.errors.append(f"none of the {len(expected_checkable)} GEMMs could be found in the engine's layer "
                                f"information{where}, so their precision cannot be verified")
        else:
            missing = [r.module or r.onnx_node for r in expected_checkable if r.engine_layer is None]
            if missing:
                check.warnings.append(f"{len(missing)} GEMMs not found by name in the engine (precision unverified): "
                                      + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if precision == "fp16" or fp16_remainder:
        engine_kind = "an FP16 engine" if precision == "fp16" else "an INT8 engine with an FP16 remainder"
        for layer in info.layers:
            nodes = [n for n in layer.onnx_nodes if n not in gemm_names]
            if layer.skipped or layer.opaque or not nodes or set(layer.onnx_nodes) & (fp32_nodes | gemm_names):
                continue
            if any(n.startswith("graph_") and "cast" in n for n in layer.onnx_nodes) or any(
                    "_cast_to_fp" in n for n in layer.onnx_nodes):
                continue  # the converter's boundary casts change type by design
            if layer.precision == "FP32":
                check.other_mismatches.append({"engine_layer": layer.name, "onnx_nodes": layer.onnx_nodes,
                                               "precision": "FP32", "expected": "FP16"})
                check.errors.append(f"engine layer '{_short(layer.name, 80)}' runs FP32 in {engine_kind} "
                                    "(its ONNX nodes were converted to FP16)")
    if sparse_weights and check.rows and not any(r.ran_sparse for r in check.rows):
        check.warnings.append("no GEMM runs a sparse tactic although SPARSE_WEIGHTS was set")
    return check
