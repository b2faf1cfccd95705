"""TensorRT's sparse INT8 rule on the exported graph (``inspect qdq``, rule ``sparse-int8``).

A tiny 2:4 BERT is quantized and exported as the pipeline does; with the quantizer groups on, every n:m GEMM is
INT8-in/INT8-out and both attention matmuls have INT8 inputs. Planting a missing output Q/DQ on one GEMM, or
exporting without the groups, must fail (exit 1) naming the layer.
"""

from __future__ import annotations

import json

import onnx
import pytest

from tiny_models import build_tiny_qdq

from nxm_deploy.cli.main import main
from nxm_deploy.export.qdq_lint import lint_qdq

LAYER = "bert.encoder.layer.1.output.dense"


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    path = tmp_path_factory.mktemp("grouped") / "model.onnx"
    _, names = build_tiny_qdq(path, gemm_outputs=True, attention=True, metadata=True)
    return path, names


def remove_output_qdq(proto: onnx.ModelProto, module: str) -> str:
    """Delete the QuantizeLinear/DequantizeLinear pair after ``module``'s bias Add; returns the Add's output."""
    prefix = "/" + module.replace(".", "/").replace("/layer/", "/layer.") + "/"
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and prefix + "output_quantizer/" in n.name)
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name == dq.output[0]:
                node.input[i] = q.input[0]
    proto.graph.node.remove(q)
    proto.graph.node.remove(dq)
    return q.input[0]


def test_grouped_export_is_sparse_int8_eligible(grouped):
    path, names = grouped
    report = lint_qdq(path)
    assert report.ok, report.table()
    gemms = {g.module: g for g in report.gemms if g.kind == "n:m"}
    assert set(gemms) == set(names) and len(names) == 12
    assert all(g.int8_in and g.int8_weight and g.int8_out for g in gemms.values())
    attention = [g for g in report.gemms if g.kind == "attention"]
    assert len(attention) == 4 and all(g.eligible for g in attention)


def test_missing_output_qdq_fails_naming_the_layer(grouped, tmp_path, capsys):
    path, _ = grouped
    proto = onnx.load(str(path))
    remove_output_qdq(proto, LAYER)
    planted = tmp_path / "planted.onnx"
    onnx.save(proto, str(planted))
    capsys.readouterr()
    assert main(["-q", "inspect", "qdq", str(planted)]) == 1
    err = capsys.readouterr().err
    assert "[sparse-int8]" in err and LAYER in err and "QuantizeLinear on the output" in err
    errors = [f for f in lint_qdq(planted).errors if f.rule == "sparse-int8"]
    assert len(errors) == 1 and LAYER in errors[0].message
    assert main(["-q", "inspect", "qdq", str(planted), "--json"]) == 1
    rows = {g["module"]: g for g in json.loads(capsys.readouterr().out)["gemms"] if g["module"]}
    assert rows[LAYER]["int8_out"] is False and rows[LAYER]["int8_in"] is True
    assert sum(not g["eligible"] for g in rows.values()) == 1


def test_inputs_and_weights_only_is_not_eligible(tmp_path):
    path = tmp_path / "plain.onnx"
    _, names = build_tiny_qdq(path, metadata=True)
    report = lint_qdq(path)
    failing = {g.module for g in report.gemms if g.kind == "n:m" and not g.int8_out}
    assert failing == set(names)  # no GEMM has an INT8 output without the groups
    assert {f.rule for f in report.errors} == {"sparse-int8"}
    assert any(f.rule == "int8-attention" for f in report.warnings)
    assert lint_qdq(path, sparse_rule=False).ok  # the plain TensorRT Q/DQ rules still hold


def test_no_layer_map_no_sparse_rule(tmp_path):
    path = tmp_path / "nometa.onnx"
    build_tiny_qdq(path, gemm_outputs=True, attention=True)
    report = lint_qdq(path)
    assert report.gemms is None and "not checked" in report.eligibility_table()
