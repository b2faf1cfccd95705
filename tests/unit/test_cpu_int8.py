"""Unit tests of nxm_deploy.export.cpu_int8: the ORT CPU INT8 rewrite of a real Q/DQ export of a tiny BERT.

Checks: the rewritten model runs in ONNX Runtime, its logits match the S8S8 Q/DQ model (same argmax, float
rounding-level differences), the quantized layers are U8S8 integer MatMuls, the weight codes are int8,
bit-identical to ORT's own QuantizeLinear of the weights, and still 2:4 along the reduction axis.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tiny_models import build_tiny_qdq

from nxm_deploy.errors import ConfigError, ExportError
from nxm_deploy.export.cpu_int8 import compare_logits, make_cpu_int8
from nxm_deploy.sparsity import count_nm_violations

ort = pytest.importorskip("onnxruntime")




def random_feeds(rows: int = 64, seq: int = 32, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, seq + 1, size=rows)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    types = ((np.arange(seq)[None, :] >= lengths[:, None] // 2) & (mask == 1)).astype(np.int64)
    ids = rng.integers(0, 1000, size=(rows, seq)).astype(np.int64) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu_int8")
    qdq = root / "sparse_int8_qdq.onnx"
    model, names = build_tiny_qdq(qdq)
    infos = {form: make_cpu_int8(qdq, root / f"cpu_{form}.onnx", form=form) for form in ("fused", "standard")}
    return {"qdq": qdq, "model": model, "names": names, "infos": infos}


@pytest.mark.parametrize("form", ["fused", "standard"])
def test_logits_match_the_qdq_model(artifacts, form):
    info = artifacts["infos"][form]
    result = compare_logits(artifacts["qdq"], info["path"], random_feeds())
    assert result["argmax_agreement"] == 1.0
    assert result["max_abs_diff"] < 1e-4, result  # same rounding op; only float summation order differs
    # and against the torch fake-quant model itself
    feeds = random_feeds(rows=8, seed=3)
    with torch.no_grad():
        ref = artifacts["model"](**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    (got,) = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"]).run(["logits"], feeds)
    np.testing.assert_allclose(got, ref, atol=1e-2)  # torch vs ORT kernels: rare one-code flips


def test_what_was_converted(artifacts):
    std, fused = artifacts["infos"]["standard"], artifacts["infos"]["fused"]
    for info in (std, fused):
        assert info["converted"] == 12
        assert info["activation_quantizers"] < 12  # Q, K, V read one shared UINT8 activation
        assert info["remaining_qdq"] == {"QuantizeLinear": info["activation_quantizers"], "DequantizeLinear": 0}
        reasons = {r["reason"] for r in info["left_float"]}
        assert len(info["left_float"]) == 6  # 2 attention products per layer + pooler and classifier Gemm
        assert any("activation x activation" in r for r in reasons)
        assert any("not quantized" in r for r in reasons)
    assert std["ops"]["MatMulInteger"] == 12 and "MatMul" in std["ops"]  # attention stays float
    assert "MatMulIntegerToFloat" not in std["ops"]
    assert fused["ops"]["MatMulIntegerToFloat"] == 12 and "MatMulInteger" not in fused["ops"]
    assert all(row["bias_fused"] for row in fused["converted_nodes"])
    model = onnx.load(std["path"])
    assert not any(i.data_type == TensorProto.FLOAT and i.name in std["weight_codes"].values() for i in model.graph.initializer)
    assert std["bytes"] < artifacts["qdq"].stat().st_size


def test_weight_codes_are_int8_2of4_and_equal_ort_quantize_linear(artifacts):
    info = artifacts["infos"]["standard"]
    model = onnx.load(info["path"])
    inits = {i.name: i for i in model.graph.initializer}
    # ORT's own QuantizeLinear of every weight: expose the weight Q outputs of the Q/DQ model
    qdq = onnx.load(str(artifacts["qdq"]))
    weight_qs = {n.input[0]: n.output[0] for n in qdq.graph.node
                 if n.op_type == "QuantizeLinear" and any(n.input[0] == i.name for i in qdq.graph.initializer)}
    for out in weight_qs.values():
        qdq.graph.output.append(helper.make_tensor_value_info(out, TensorProto.INT8, None))
    session = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = random_feeds(rows=1, seq=8)
    ort_codes = dict(zip(weight_qs, session.run(list(weight_qs.values()), feeds)))
    assert len(info["weight_codes"]) == 12
    for codes_name, source in info["weight_codes"].items():
        assert inits[codes_name].data_type == TensorProto.INT8
        codes = numpy_helper.to_array(inits[codes_name])  # [K, N] = [in, out]
        np.testing.assert_array_equal(codes, ort_codes[source].T)
        checked, bad, first = count_nm_violations(codes, "2:4", axis=0)
        assert checked > 0 and bad == 0, (codes_name, first)
        assert np.count_nonzero(codes) <= codes.size // 2


def test_check_onnx_sparsity_sees_the_codes(artifacts):
    from nxm_deploy.export import verify
    from nxm_deploy.export.onnx import layer_map_for

    if "MatMulInteger" not in verify._WEIGHT_INPUT:
        pytest.skip("verify.check_onnx_sparsity does not trace MatMulInteger inputs yet")
    info = artifacts["infos"]["standard"]
    qdq_map = layer_map_for(onnx.load(str(artifacts["qdq"])), artifacts["model"], artifacts["names"])
    layer_map = {codes: qdq_map[src] for codes, src in info["weight_codes"].items()}
    report = verify.verify_onnx_sparsity(info["path"], "2:4", layer_map=layer_map, expected=set(artifacts["names"]))
    assert report.ok and sum(r.status == "sparse" for r in report.layers) == 12
    assert all(r.dtype == "int8" and r.axis == 0 for r in report.layers if r.module)


def test_float_model_cannot_be_converted(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(np.ones((4, 3), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ExportError, match="mm: weight"):
        make_cpu_int8(model, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(ConfigError):
        make_cpu_int8(model, tmp_path / "out.onnx", form="qlinear")


def test_grouped_qdq_model_keeps_the_gelu_fused_and_the_logits(tmp_path):
    """INT8 GEMM outputs + INT8 attention: the output Q/DQ pairs stay (the trained numerics), the erf GELU behind
    a dequantized GEMM output becomes one Gelu (ORT would dequantize it twice and run five ops), logits agree."""
    qdq = tmp_path / "grouped.onnx"
    build_tiny_qdq(qdq, gemm_outputs=True, attention=True)
    info = make_cpu_int8(qdq, tmp_path / "cpu.onnx")
    assert info["converted"] == 12 and info["gelu_fused"] == 2  # one GELU per layer
    assert info["ops"].get("Gelu") == 2 and "Erf" not in info["ops"]
    assert info["remaining_qdq"]["DequantizeLinear"] == 2 * (3 + 4)  # per layer: 3 GEMM outputs + 4 attention inputs
    result = compare_logits(qdq, info["path"], random_feeds())
    assert result["argmax_agreement"] == 1.0 and result["max_abs_diff"] < 1e-4, result
    plain = make_cpu_int8(qdq, tmp_path / "cpu_std.onnx", form="standard")
    assert plain["gelu_fused"] == 0 and "Erf" in plain["ops"]  # standard form: plain ONNX ops only
