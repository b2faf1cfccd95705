"""Unit tests of nxm_deploy.export.qdq_lint: a real fake-quant export of a tiny BERT passes, planted faults fail.

The exported model is built the way the pipeline builds it: tiny random ``BertForSequenceClassification``,
2:4 masks on the 12 encoder Linears, ``quantize_model_`` + ``calibrate``, eager attention, ``export_mode`` +
``export_model`` (TorchScript exporter). Planted faults edit a copy of the ONNX graph.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tiny_models import build_tiny_qdq

from nxm_deploy.errors import ExportError
from nxm_deploy.export.qdq_lint import RULES, QdqLintReport, lint_qdq, verify_qdq

OPSET = 17


# ----------------------------------------------------------------------------------------------- helpers


def const_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute(name, value))


def dqs_of(model: onnx.ModelProto, q: onnx.NodeProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]


def requantize(model: onnx.ModelProto, q: onnx.NodeProto, *, scale=None, zero=None, axis=None) -> None:
    """Give ``q`` and its DequantizeLinear nodes a new scale / zero point initializer and/or axis."""
    nodes = [q, *dqs_of(model, q)]
    if scale is not None:
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(scale), f"planted_scale_{q.name}"))
    if zero is not None:
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(zero), f"planted_zero_{q.name}"))
    for node in nodes:
        if scale is not None:
            node.input[1] = f"planted_scale_{q.name}"
        if zero is not None:
            node.input[2] = f"planted_zero_{q.name}"
        if axis is not None:
            set_attr(node, "axis", axis)


def activation_qs(model):
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear" and const_value(model, n.input[1]).size == 1]


def weight_q(model, suffix: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0].endswith(suffix))


def rules_at(report: QdqLintReport, node: str) -> set[str]:
    return {f.rule for f in report.errors if f.node == node}


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("qdq") / "tiny_qdq.onnx"
    build_tiny_qdq(path)
    return path


@pytest.fixture
def proto(exported) -> onnx.ModelProto:
    return onnx.load(str(exported))


# ----------------------------------------------------------------------------------- the real export
def test_real_export_is_tensorrt_ready(exported):
    report = verify_qdq(exported)
    assert report.ok, report.table()
    assert report.counts["weight_quantizers"] == 12
    assert report.counts["per_channel_weights"] == 12
    assert report.counts["checked_weight_axes"] == 12  # every weight axis traced to its MatMul
    assert report.counts["activation_quantizers"] >= 6  # Q/K/V share one, 4 inputs per layer at most
    assert report.counts["quantize_linear"] == report.counts["weight_quantizers"] + report.counts["activation_quantizers"]
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["ok"] is True and as_dict["errors"] == 0
    assert "TensorRT-ready" in report.summary()


def test_real_export_weight_path_is_transpose_matmul(proto):
    """The export shape the axis rule relies on: W[out,in] -> Q(axis 0) -> DQ -> Transpose -> MatMul."""
    q = weight_q(proto, "layer.0.attention.self.query.weight")
    (dq,) = dqs_of(proto, q)
    users = [n for n in proto.graph.node if dq.output[0] in n.input]
    assert [u.op_type for u in users] == ["Transpose"]
    assert any(n.op_type == "MatMul" and n.input[1] == users[0].output[0] for n in proto.graph.node)


# ---------------------------------------------------------------------------------------- planted faults
def test_uint8_zero_point_is_an_error_naming_the_node(proto):
    q = activation_qs(proto)[0]
    requantize(proto, q, zero=np.array(0, dtype=np.uint8))
    report = lint_qdq(proto)
    assert not report.ok
    hit = [f for f in report.errors if f.node == q.name and f.rule == "zero-point-int8"]
    assert hit and "TensorRT needs signed INT8" in hit[0].message and "uint8" in hit[0].message


def test_nonzero_zero_point_is_an_error(proto):
    q = activation_qs(proto)[0]
    requantize(proto, q, zero=np.array(3, dtype=np.int8))
    assert "zero-point-zero" in rules_at(lint_qdq(proto), q.name)


def test_per_channel_activation_is_an_error(proto):
    q = activation_qs(proto)[1]
    scale = float(const_value(proto, q.input[1]))
    requantize(proto, q, scale=np.full(64, scale, np.float32), zero=np.zeros(64, np.int8), axis=2)
    report = lint_qdq(proto)
    assert rules_at(report, q.name) == {"activation-per-tensor"}, report.table()


def test_weight_per_channel_on_the_input_axis_is_an_error(proto):
    q = weight_q(proto, "layer.1.attention.self.query.weight")  # square [64, 64]: both axes fit 64 scales
    requantize(proto, q, axis=1)
    report = lint_qdq(proto)
    finding = next(f for f in report.errors if f.node == q.name)
    assert finding.rule == "weight-axis"
    assert "axis 1" in finding.message and "axis=0" in finding.message and "Transpose" in finding.message
    assert len(report.errors) == 1  # only the planted fault


def test_negative_or_nan_scale_is_an_error(proto):
    q = weight_q(proto, "layer.0.output.dense.weight")
    scale = const_value(proto, q.input[1]).copy()
    scale[5] = -scale[5]
    requantize(proto, q, scale=scale)
    report = lint_qdq(proto)
    finding = next(f for f in report.errors if f.node == q.name)
    assert finding.rule == "scale-positive-finite" and "index 5" in finding.message
    q2 = activation_qs(proto)[0]
    requantize(proto, q2, scale=np.array(np.nan, np.float32))
    assert "scale-positive-finite" in rules_at(lint_qdq(proto), q2.name)


def test_quantize_without_dequantize_is_an_error(proto):
    q = weight_q(proto, "layer.0.intermediate.dense.weight")
    (dq,) = dqs_of(proto, q)
    for node in proto.graph.node:  # readers of the DQ now read the Q: Q -> Transpose -> MatMul
        for i, name in enumerate(node.input):
            if name == dq.output[0]:
                node.input[i] = q.output[0]
    proto.graph.node.remove(dq)
    report = lint_qdq(proto)
    finding = next(f for f in report.errors if f.node == q.name)
    assert finding.rule == "qdq-pair" and "Transpose" in finding.message


def test_dequantize_with_a_different_scale_is_an_error(proto):
    q = weight_q(proto, "layer.0.attention.output.dense.weight")
    (dq,) = dqs_of(proto, q)
    scale = const_value(proto, q.input[1]) * 2
    proto.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), "other_scale"))
    dq.input[1] = "other_scale"
    report = lint_qdq(proto)
    assert "qdq-pair" in rules_at(report, dq.name)


def test_verify_qdq_raises_with_every_error(proto):
    qa = activation_qs(proto)[0]
    qw = weight_q(proto, "layer.1.attention.self.key.weight")
    requantize(proto, qa, zero=np.array(0, dtype=np.uint8))
    requantize(proto, qw, axis=1)
    with pytest.raises(ExportError) as info:
        verify_qdq(proto)
    text = info.value.message
    assert qa.name in text and qw.name in text and "[zero-point-int8]" in text and "[weight-axis]" in text
    assert len(info.value.report.errors) == 2


# -------------------------------------------------------------------------- hand-built axis conventions
def _linear_graph(weight: np.ndarray, consumer: str, axis: int, *, trans_b: int = 0, per_tensor: bool = False,
                  constants: bool = False) -> onnx.ModelProto:
    """x[2, K] -> Q/DQ -> (MatMul | Gemm) with a quantized constant weight, scales as initializers or Constants."""
    channels = 1 if per_tensor else weight.shape[axis]
    w_scale = np.full((channels,) if not per_tensor else (), 0.01, np.float32)
    values = {
        "w": weight, "w_scale": w_scale, "w_zero": np.zeros(w_scale.shape, np.int8),
        "x_scale": np.array(0.02, np.float32), "x_zero": np.array(0, np.int8),
    }
    nodes, inits = [], []
    for name, value in values.items():
        if constants and name != "w":
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        else:
            inits.append(numpy_helper.from_array(value, name))
    qa = {} if per_tensor else {"axis": axis}
    nodes += [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="dq_x"),
        helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zero"], ["wq"], name="q_w", **qa),
        helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zero"], ["wd"], name="dq_w", **qa),
    ]
    if consumer == "MatMul":
        nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"))
        k, n = weight.shape
    else:
        nodes.append(helper.make_node("Gemm", ["xd", "wd"], ["y"], name="gemm", transB=trans_b))
        n, k = weight.shape if trans_b else weight.shape[::-1]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(
    "consumer, trans_b, shape, good_axis",
    [("MatMul", 0, (16, 8), 1), ("Gemm", 1, (8, 16), 0), ("Gemm", 0, (16, 8), 1)],
)
@pytest.mark.parametrize("constants", [False, True])
def test_weight_axis_conventions(consumer, trans_b, shape, good_axis, constants):
    weight = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    good = lint_qdq(_linear_graph(weight, consumer, good_axis, trans_b=trans_b, constants=constants))
    assert good.ok and not good.findings, good.table()
    assert good.counts["checked_weight_axes"] == 1
    bad = lint_qdq(_linear_graph(weight, consumer, 1 - good_axis, trans_b=trans_b, constants=constants))
    assert [(f.node, f.rule) for f in bad.errors] == [("q_w", "weight-axis")]


def test_per_tensor_weight_is_a_warning_only():
    report = lint_qdq(_linear_graph(np.ones((16, 8), np.float32), "MatMul", 1, per_tensor=True))
    assert report.ok
    assert [(f.node, f.rule, f.severity) for f in report.findings] == [("q_w", "weight-per-tensor", "warning")]


def test_missing_zero_point_means_uint8():
    model = _linear_graph(np.ones((16, 8), np.float32), "MatMul", 1)
    for node in model.graph.node:  # drop the activation zero point on Q and DQ: both read/write UINT8 now
        if node.name in ("q_x", "dq_x"):
            del node.input[2]
    report = lint_qdq(model)
    assert [(f.node, f.rule) for f in report.errors] == [("q_x", "zero-point-int8")]


def test_float_graph_has_no_qdq(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(np.ones((4, 3), np.float32), "w")],
    )
    report = lint_qdq(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))
    assert [(f.node, f.rule) for f in report.errors] == [("<graph>", "no-qdq")]
    assert "no-qdq" in report.table() and set(RULES) >= {f.rule for f in report.findings}


def test_unreadable_file_raises_export_error(tmp_path):
    with pytest.raises(ExportError):
        lint_qdq(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ExportError):
        lint_qdq(bad)


def test_cli_inspect_qdq(exported, proto, tmp_path, capsys):
    from nxm_deploy.cli.main import main

    assert main(["-q", "inspect", "qdq", str(exported)]) == 0
    capsys.readouterr()
    assert main(["-q", "inspect", "qdq", str(exported), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    requantize(proto, activation_qs(proto)[0], zero=np.array(0, dtype=np.uint8))
    planted = tmp_path / "planted.onnx"
    onnx.save(proto, str(planted))
    assert main(["-q", "inspect", "qdq", str(planted)]) == 1
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"junk")
    assert main(["-q", "inspect", "qdq", str(bad)]) == 2
