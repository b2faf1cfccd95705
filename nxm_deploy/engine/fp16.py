"""Graph-level FP16 conversion of an FP32 ONNX model for the dense FP16 TensorRT baseline (CPU only).

TensorRT 11 removed ``BuilderFlag.FP16`` and every network is strongly typed, so an FP16 engine needs an FP16
graph (the rf-detr#1453 failure: ``fp16=True`` silently built an FP32 engine). Converting the graph works on
TensorRT 10 and 11 alike.

The conversion is ONNX Runtime's ``onnxruntime.transformers.float16.convert_float_to_float16`` (a maintained
copy of onnxconverter-common's converter, shipped in the ``onnxruntime`` wheel we already depend on):
float initializers and tensors become FP16, graph inputs/outputs keep their types (``logits`` stays FP32),
and the ops in ``keep_fp32_ops`` (LayerNorm, Softmax by default) plus the converter's own block list run in
FP32 behind Cast nodes. Constants below/above the FP16 range are clamped (the attention-mask fill value
``finfo(float32).min`` becomes -65504, still a zero after Softmax). The converter appends its Cast nodes at
the end of the node list, so the graph is re-sorted topologically before the ONNX checker runs.

:func:`fp16_parity` runs both graphs in ONNX Runtime (CPU) on seeded inputs with padding and compares logits.

**INT8 graphs (the FP16 remainder).** A Q/DQ graph converts the same way, with the Q/DQ nodes *not* blocked: their
scales become FP16, so every DequantizeLinear outputs FP16 and every QuantizeLinear reads FP16 (TensorRT's ONNX
parser takes a DequantizeLinear's output type from its scale, ``IDequantizeLayer::setToType``), and no Cast sits
between a DequantizeLinear and its GEMM. FP16 scales need opset 19, so the graph is raised to opset 19 with
``onnx.version_converter`` (:func:`raise_opset`: it rewrites the ops whose form changed, e.g. the ReduceMean of a
Llama RMSNorm); the ops of an exported encoder (MatMul, Add, Mul, Div, Erf, Softmax, LayerNormalization, Gather,
Reshape, Transpose, Shape, Concat, Unsqueeze, Where, Cast, Q/DQ) mean the same at 17 and 19 for non-FP8 types. Parity uses the INT8
rule (:mod:`nxm_deploy.export.parity`): class agreement on the examples that are not numerical ties.

**Range check.** Before converting, the FP32 graph runs in ONNX Runtime on the parity inputs with every float
intermediate as an output; a node whose output reaches ``FP16_RANGE_LIMIT`` (a quarter of the FP16 maximum
65504) stays in FP32 (``range_fp32_nodes`` in the record), besides the ``keep_fp32_ops`` types. The
attention-mask fill value (``finfo(float32).min``) is a sentinel, not a range, and is left out of the check.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nxm_deploy.fileio import atomic_write_json, read_json, sha256_file, write_onnx
from nxm_deploy.errors import ExportError
from nxm_deploy.ort import make_session

log = logging.getLogger("nxm_deploy.engine")

#: max |logit(FP16 graph) - logit(FP32 graph)| allowed (absolute part; plus FP16_PARITY_RTOL * |logit|).
FP16_PARITY_ATOL = 1e-2
FP16_PARITY_RTOL = 1e-2
#: bump when the conversion changes, so existing FP16 files are rebuilt
CONVERTER_VERSION = 2
#: a node whose FP32 output reaches this |value| on the parity inputs stays FP32 (FP16 max 65504, 4x headroom)
FP16_RANGE_LIMIT = 16384.0
#: |values| at or above this are the attention-mask fill (finfo(float32).min), ignored by the range check
MASK_SENTINEL = 1e38
#: Q/DQ with FP16 scales need this default-domain opset
QDQ_FP16_OPSET = 19


@dataclass
class Fp16Conversion:
    """Result of :func:`convert_to_fp16` (also stored as ``<fp16 file>.json`` next to the model).

    Attributes:
        file: FP16 model file name (in the source's directory).
        sha256: its hash.
        source: source file name; ``source_sha256`` its hash.
        keep_fp32_ops: op types kept in FP32 (requested plus the converter's block list that occur).
        fp32_nodes: names of the nodes left in FP32 (the engine's precision check allows FP32 there).
        cast_nodes: number of Cast nodes in the converted graph.
        parity: :func:`fp16_parity` result (``max_abs_diff``, ``atol``, ``rtol``, ``ok``, ...).
        converter: ``onnxruntime.transformers.float16`` and its onnxruntime version.
        seconds: conversion + parity time.
        reused: True when an up-to-date conversion was found and nothing was written.
        int8: the source is a Q/DQ graph (FP16 scales, opset 19, INT8 parity rule).
        range_fp32_nodes: nodes kept FP32 by the range check, with their max |output| on the parity inputs.
    """

    file: str
    sha256: str
    source: str
    source_sha256: str
    keep_fp32_ops: list[str]
    fp32_nodes: list[str]
    cast_nodes: int
    parity: dict
    converter: str
    converter_version: int = CONVERTER_VERSION
    seconds: float = 0.0
    reused: bool = False
    notes: list[str] = field(default_factory=list)
    int8: bool = False  # a Q/DQ graph: FP16 scales (opset 19), INT8 parity rule
    range_fp32_nodes: dict[str, float] = field(default_factory=dict)  # node -> max |output| on the parity inputs

    def to_dict(self) -> dict:
        return asdict(self)


def fp16_path_for(source: Path) -> Path:
    """``dense_fp32.onnx`` -> ``dense_fp16.onnx``; ``model.onnx`` -> ``model_fp16.onnx`` (same directory)."""
    stem = source.stem
    name = stem.replace("fp32", "fp16") if "fp32" in stem else f"{stem}_fp16"
    return source.with_name(name + source.suffix)


def _toposort(graph) -> None:
    """Sort ``graph.node`` topologically in place (stable: keeps the original order where it is valid)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({n for node in rest for n in node.input if n not in available})[:5]
            raise ExportError(f"FP16 graph cannot be sorted: inputs {missing} are never produced.")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def is_qdq_graph(model) -> bool:
    """True when the graph holds QuantizeLinear/DequantizeLinear nodes (an explicitly quantized INT8 graph)."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def raise_opset(model, version: int):
    """The graph at default-domain opset ``version``: ``onnx.version_converter`` rewrites the ops whose form
    changed (opset 18 moved ``axes`` of ReduceMean & co. from an attribute to an input: Llama's RMSNorm); where the
    converter cannot take the graph, the opset number alone is raised (the encoder ops of the module docstring
    mean the same at 17 and 19)."""
    from onnx import version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), version)
    if current >= version:
        return model
    try:
        return version_converter.convert_version(model, version)
    except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError / ValidationError kinds
        log.warning("onnx version_converter %d -> %d failed (%s): raising the opset number only", current, version,
                    str(exc).splitlines()[0][:200])
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = version
        return model


def convert_model_to_fp16(model, keep_fp32_ops: list[str] | tuple[str, ...], fp32_node_names=()):
    """Convert a loaded FP32 ``onnx.ModelProto`` (modified in place) and return ``(model, fp32_nodes, ops)``.

    ``fp32_node_names``: nodes kept FP32 besides the ``keep_fp32_ops`` types (the range check's). A Q/DQ graph
    gets FP16 scales and opset :data:`QDQ_FP16_OPSET` (module docstring).
    """
    import onnx
    from onnxruntime.transformers import float16

    block = list(dict.fromkeys([*float16.DEFAULT_OP_BLOCK_LIST, *keep_fp32_ops]))
    if is_qdq_graph(model):
        model = raise_opset(model, QDQ_FP16_OPSET)
    model = onnx.shape_inference.infer_shapes(model)
    extra = set(fp32_node_names)
    fp32_nodes = [n.name for n in model.graph.node if n.op_type in block or n.name in extra]
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in block})
    model = float16.convert_float_to_float16(
        model, keep_io_types=True, disable_shape_infer=True, op_block_list=block, node_block_list=sorted(extra),
    )
    _toposort(model.graph)
    return model, fp32_nodes, ops


def range_check(model_path: str | Path, feeds: dict[str, np.ndarray], limit: float = FP16_RANGE_LIMIT) -> dict[str, float]:
    """Nodes of an FP32 graph whose float output reaches ``limit`` in |value| on ``feeds`` (ONNX Runtime CPU).

    Returns:
        dict: node name -> max |output| (only the nodes at or above ``limit``).
    """
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    floats = {v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    outputs = {o.name for o in model.graph.output}
    producer = {}
    for node in model.graph.node:
        for name in node.output:
            if name in floats and name not in outputs:
                producer[name] = node.name
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = make_session(model.SerializeToString(), quiet=True, optimize=False)  # every tensor as in the graph
    names = list(producer)
    values = session.run(names, feeds) if names else []
    out: dict[str, float] = {}
    for name, value in zip(names, values):
        magnitude = np.abs(np.asarray(value, np.float32))
        if not np.all(np.isfinite(magnitude)):
            out[producer[name]] = float("inf")
            continue
        # the attention-mask fill value finfo(float32).min (and its sums) is a sentinel, not a range: the
        # converter clamps it to -65504, which still gives a softmax weight of exactly 0
        peak = float(np.max(magnitude[magnitude < MASK_SENTINEL], initial=0.0))
        if peak >= limit:
            out[producer[name]] = max(out.get(producer[name], 0.0), peak)
    return out


def _vocab_sizes(model) -> dict[str, int]:
    """Exclusive upper bound of each integer input that indexes an embedding table (Gather on an initializer)."""
    inits = {i.name: i for i in model.graph.initializer}
    sizes = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in inits:
            sizes.setdefault(node.input[1], int(inits[node.input[0]].dims[0]))
    return sizes


def parity_feeds(model_path: str | Path, batch: int = 3, seq: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs: for a BERT-style graph int64 ids inside the embedding tables and padding in the mask; float
    inputs get standard-normal values (unknown dimensions: ``batch`` first, then ``seq``)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    sizes = _vocab_sizes(model)
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        name = inp.name
        if inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:  # a float input: seeded normal values
            dims = [d.dim_value or (batch if i == 0 else seq) for i, d in enumerate(inp.type.tensor_type.shape.dim)]
            feeds[name] = rng.standard_normal(dims).astype(np.float32)
        elif name == "attention_mask" or "mask" in name:
            mask = np.ones((batch, seq), np.int64)
            for row in range(1, batch):
                mask[row, seq - row * (seq // (batch + 1)):] = 0
            feeds[name] = mask
        else:
            feeds[name] = rng.integers(0, max(1, min(sizes.get(name, 2), 30000)), (batch, seq), dtype=np.int64)
    return feeds


def fp16_parity(fp32_path: str | Path, fp16_path: str | Path, feeds: dict[str, np.ndarray] | None = None,
                atol: float = FP16_PARITY_ATOL, rtol: float = FP16_PARITY_RTOL, int8: bool = False) -> dict:
    """Run both graphs in ONNX Runtime (CPU) and compare every output.

    ``int8``: the graphs are Q/DQ graphs, judged by the INT8 rule (:mod:`nxm_deploy.export.parity`: argmax
    agreement >= ``INT8_MIN_AGREEMENT`` on the rows that are not ties), since an FP16 remainder moves some
    activations across an INT8 rounding boundary and a logit bound would then be brittle.

    Returns:
        dict: ``max_abs_diff``, ``max_rel_excess`` (max of ``|d| - atol - rtol*|ref|``, <= 0 passes),
        ``argmax_agreement`` (for 2-D outputs), ``atol``, ``rtol``, ``inputs`` and ``ok``; with ``int8`` also
        ``near_ties``, ``tie_margin``, ``argmax_agreement_decisive``, ``rule``.
    """
    from nxm_deploy.export.parity import INT8_MIN_AGREEMENT, INT8_TIE_MARGIN, logit_stats

    feeds = feeds if feeds is not None else parity_feeds(fp32_path)
    ref_sess, new_sess = make_session(fp32_path, quiet=True), make_session(fp16_path, quiet=True)
    names = [o.name for o in ref_sess.get_outputs()]
    ref = ref_sess.run(names, feeds)
    new = new_sess.run(names, feeds)
    max_abs, excess, stats = 0.0, -np.inf, {}
    for a, b in zip(ref, new):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if not np.all(np.isfinite(b)):
            return {"max_abs_diff": float("inf"), "ok": False, "atol": atol, "rtol": rtol,
                    "inputs": _describe(feeds), "error": "non-finite FP16 output"}
        compared = logit_stats(a, b, INT8_TIE_MARGIN if int8 else None)
        max_abs = max(max_abs, compared["max_abs_diff"])
        excess = max(excess, float((np.abs(a - b) - atol - rtol * np.abs(a)).max(initial=-np.inf)))
        if compared["argmax_agreement"] is not None:
            stats = {k: v for k, v in compared.items() if k not in ("max_abs_diff", "mean_abs_diff")}
    result = {"max_abs_diff": max_abs, "max_rel_excess": excess, "argmax_agreement": stats.get("argmax_agreement"),
              "atol": atol, "rtol": rtol, "inputs": _describe(feeds), "ok": bool(excess <= 0.0)}
    if int8:
        decisive = stats.get("argmax_agreement_decisive")
        result.update(stats, rule="int8: argmax agreement on non-ties",
                      ok=decisive is None or decisive >= INT8_MIN_AGREEMENT)
    return result


def _describe(feeds: dict[str, np.ndarray]) -> str:
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    return f"seeded random ids with padding, shapes {shapes}"


def convert_to_fp16(source: str | Path, target: str | Path | None = None,
                    keep_fp32_ops: list[str] | tuple[str, ...] = ("LayerNormalization", "Softmax"),
                    *, check_parity: bool = True, force: bool = False) -> Fp16Conversion:
    """Write the FP16 version of ``source`` (idempotent, atomic) and check it against the FP32 graph in ORT.

    Skips the work when ``<target>.json`` records the same source hash, op list and converter version and
    the target file still has the recorded hash.

    Raises:
        ExportError: the source cannot be read, or the converted graph fails the ONNX checker.
    """
    from nxm_deploy.fileio import file_lock

    source = Path(source)
    target = Path(target) if target is not None else fp16_path_for(source)
    with file_lock(target.with_name(f".{target.name}.lock")):  # concurrent builds of one run convert once
        return _convert_locked(source, target, list(keep_fp32_ops), check_parity, force)


def _convert_locked(source: Path, target: Path, keep: list[str], check_parity: bool, force: bool) -> Fp16Conversion:
    import onnx
    import onnxruntime

    record_path = target.with_suffix(".json")
    source_sha = sha256_file(source)
    if not force and record_path.is_file() and target.is_file():
        try:
            old = read_json(record_path)
            if (old.get("source_sha256") == source_sha and old.get("keep_fp32_ops_requested") == keep
                    and old.get("converter_version") == CONVERTER_VERSION and old.get("sha256") == sha256_file(target)
                    and (not check_parity or (old.get("parity") or {}).get("ok") is not None)):
                old.pop("keep_fp32_ops_requested", None)
                return Fp16Conversion(**{**old, "reused": True})
        except (OSError, ValueError, TypeError):
            pass
    start = time.perf_counter()
    try:
        model = onnx.load(str(source))
    except Exception as exc:
        raise ExportError(f"Cannot read {source} for FP16 conversion: {type(exc).__name__}: {exc}") from exc
    int8 = is_qdq_graph(model)
    feeds = parity_feeds(source)
    ranged = range_check(source, feeds)
    model, fp32_nodes, ops = convert_model_to_fp16(model, keep, fp32_node_names=ranged)
    try:
        write_onnx(model, target, check=lambda tmp: onnx.checker.check_model(str(tmp)))
    except Exception as exc:
        raise ExportError(f"FP16 conversion of {source} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    del model
    parity = fp16_parity(source, target, feeds, int8=int8) if check_parity else {"ok": None, "skipped": True}
    casts = sum(1 for n in onnx.load(str(target), load_external_data=False).graph.node if n.op_type == "Cast")
    result = Fp16Conversion(
        file=target.name, sha256=sha256_file(target), source=source.name, source_sha256=source_sha,
        keep_fp32_ops=ops, fp32_nodes=fp32_nodes, cast_nodes=casts, parity=parity,
        converter=f"onnxruntime.transformers.float16 (onnxruntime {onnxruntime.__version__})",
        seconds=round(time.perf_counter() - start, 3), int8=int8, range_fp32_nodes=ranged,
    )
    atomic_write_json(record_path, {**result.to_dict(), "keep_fp32_ops_requested": keep})
    if parity.get("ok") is False:
        log.warning("FP16 graph %s differs from %s beyond tolerance: %s", target.name, source.name, parity)
    return result
