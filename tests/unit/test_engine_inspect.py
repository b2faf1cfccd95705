"""Post-build check from the engine inspector's layer JSON (CPU only).

The fixtures in tests/trt/fixtures/ are written in the documented format of
``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` (DETAILED verbosity) of TensorRT 10
and 11 (sources in tests/trt/fixtures/README.md and the docstring of nxm_deploy.engine.inspect). They are
joined to the ONNX graphs of a synthetic run exported with the project's own code.
"""

import copy
import json
from pathlib import Path

import pytest

from tiny_models import demo_run_module

from nxm_deploy.engine.inspect import (
    EngineLayer, GemmNode, check_engine, gemm_nodes, module_from_node, normalize_dtype, onnx_names_of,
    parse_layer_json, parse_sparsity_log,
)
from nxm_deploy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "trt" / "fixtures"
TRT10_INT8 = FIXTURES / "layers_trt10_sparse_int8.json"
TRT11_FP16 = FIXTURES / "layers_trt11_dense_fp16.json"
FFN = ["*.layer.*.intermediate.dense", "*.layer.*[0-9].output.dense"]




@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """1-layer BERT (hidden 64, FFN 256): dense FP32, sparse INT8 Q/DQ and the FP16 graph."""
    from nxm_deploy.engine.fp16 import convert_to_fp16

    run_dir = tmp_path_factory.mktemp("run")
    manifest = demo_run_module().make_run(run_dir)
    fp16 = convert_to_fp16(run_dir / "onnx" / "dense_fp32.onnx")
    return {"dir": run_dir, "manifest": manifest, "fp16": fp16}


def _matcher(patterns):
    import fnmatch

    return lambda module: module is not None and any(fnmatch.fnmatchcase(module, p) for p in patterns)


def _int8_check(run, data=None, require=FFN, log=None):
    gemms = gemm_nodes(run["dir"] / "onnx" / "sparse_int8_qdq.onnx", run["manifest"]["layer_map"])
    info = parse_layer_json(data if data is not None else TRT10_INT8)
    return check_engine(info, precision="int8-qdq", sparse_weights=True, gemms=gemms,
                        sparse_modules=run["manifest"]["sparse_modules"], require_sparse=_matcher(require),
                        sparsity_log=log)


def _fp16_check(run, data=None):
    gemms = gemm_nodes(run["dir"] / "onnx" / "dense_fp16.onnx")
    info = parse_layer_json(data if data is not None else TRT11_FP16)
    return check_engine(info, precision="fp16", sparse_weights=False, gemms=gemms, fp32_nodes=run["fp16"].fp32_nodes)


# ------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, dtype", [
    ("Row major linear FP32", "FP32"), ("Row major linear FP16 format", "FP16"),
    ("Channel major FP16 format where channel % 8 == 0", "FP16"),
    ("Thirty-two wide channel vectorized row major Int8 format", "INT8"), ("Row major Int8 format", "INT8"),
    ("Channel major INT8 format where channel % 16 == 0", "INT8"), ("Row major linear Int32", "INT32"),
    ("Row major linear Int64 format", "INT64"), ("Row major linear BOOL", "BOOL"),
    ("Row major linear BFloat16 format", "BF16"), ("Half", "FP16"), ("Float", "FP32"), ("Int8", "INT8"),
    ("Row major linear FP32 format (kLINEAR)", "FP32"), ("Unknown format", None), ("", None),
])
def test_normalize_dtype(text, dtype):
    assert normalize_dtype(text) == dtype


def test_parse_trt10_fixture():
    info = parse_layer_json(TRT10_INT8.read_text())
    assert info.schema == "trt10"
    assert info.io_tensors == ["input_ids", "attention_mask", "token_type_ids", "logits"]
    by_type = {layer.layer_type: layer for layer in info.layers}
    ffn = next(layer for layer in info.layers if "intermediate/dense/MatMul" in layer.name and layer.layer_type == "CaskConvolution")
    assert ffn.has_sparse_weights is True and ffn.ran_sparse and ffn.precision == "INT8"
    assert ffn.onnx_nodes == ["/model/bert/encoder/layer.0/intermediate/dense/MatMul",
                              "/model/bert/encoder/layer.0/intermediate/dense/Add"]
    assert "sptensor" in ffn.tactic
    key = by_type["CaskGemmMatrixMultiply"]
    assert key.has_sparse_weights is None and key.is_matmul_form and not key.ran_sparse
    myelin = by_type["Myelin"]
    assert myelin.onnx_nodes == ["/model/bert/embeddings/Shape", "/model/bert/embeddings/LayerNorm/LayerNormalization"]
    assert by_type["Reformat"].skipped


def test_parse_trt11_fixture():
    info = parse_layer_json(json.loads(TRT11_FP16.read_text()))
    assert info.schema == "trt11"
    assert info.io_tensors == ["input_ids", "attention_mask", "token_type_ids", "logits"]
    gemm = next(layer for layer in info.layers if layer.name.startswith("/model/bert/encoder/layer.0/attention/self/query"))
    assert gemm.precision == "FP16" and gemm.onnx_nodes[0] == "/model/bert/encoder/layer.0/attention/self/query/MatMul"
    ln = next(layer for layer in info.layers if layer.name.endswith("LayerNormalization_myl0_7"))
    assert ln.precision == "FP32"


@pytest.mark.parametrize("name, metadata, nodes", [
    ("a + b + c", None, ["a", "b", "c"]),
    ("x_myl0_12", None, ["x"]),
    ("{ForeignNode[/m/first.../m/last]}", None, ["/m/first", "/m/last"]),
    ("a + b [profile 1]", None, ["a", "b"]),
    ("Reformatting CopyNode for Input Tensor 0 to conv1", None, ["conv1"]),
    ("anything", "[ONNX Layer: n1]\x1e[ONNX Layer: n2]\x1f[ONNX Layer: n1]", ["n1", "n2"]),
])
def test_onnx_names_of(name, metadata, nodes):
    assert onnx_names_of(name, metadata) == nodes


def test_not_detailed_or_not_layer_json():
    with pytest.raises(ConfigError, match="DETAILED"):
        parse_layer_json({"Layers": ["conv1", "relu1"], "Bindings": ["x"]})
    with pytest.raises(ConfigError, match="Layers"):
        parse_layer_json({"Bindings": []})
    with pytest.raises(ConfigError, match="not JSON"):
        parse_layer_json("{nope")


def test_other_profiles_are_dropped():
    layer = {"Name": "a", "LayerType": "CaskConvolution", "Inputs": [], "Outputs": []}
    info = parse_layer_json({"Layers": [layer, {**layer, "Name": "a [profile 1]"}], "Bindings": []})
    assert [layer.name for layer in info.layers] == ["a"]


def test_sparsity_log_lines():
    lines = [
        "[MemUsageChange] whatever",
        "(Sparsity) Layers eligible for sparse math: /l0/fc1/MatMul + /l0/fc1/Add, /l0/fc2/MatMul",
        "(Sparsity) TRT inference plan picked sparse implementation for layers: /l0/fc2/MatMul",
    ]
    eligible, picked = parse_sparsity_log(lines)
    assert eligible == {"/l0/fc1/MatMul", "/l0/fc1/Add", "/l0/fc2/MatMul"}
    assert picked == {"/l0/fc2/MatMul"}
    assert parse_sparsity_log(["nothing"]) == (None, None)


def test_module_from_node():
    assert module_from_node("/model/bert/encoder/layer.0/attention/self/query/MatMul") == \
        "bert.encoder.layer.0.attention.self.query"
    assert module_from_node("/model/classifier/Gemm") == "classifier"
    assert module_from_node("MatMul_12") is None


# ------------------------------------------------------------------------------------------- joined check


def test_gemm_nodes_of_the_qdq_graph(run):
    gemms = gemm_nodes(run["dir"] / "onnx" / "sparse_int8_qdq.onnx", run["manifest"]["layer_map"])
    encoder = [g for g in gemms if ".layer." in (g.module or "")]
    assert sorted(g.module for g in encoder) == sorted(run["manifest"]["sparse_modules"])
    assert all(g.quantized and g.nm_sparse for g in encoder)
    assert {g.module: g.quantized for g in gemms if ".layer." not in g.module} == {"bert.pooler.dense": False,
                                                                                 "classifier": False}


def test_int8_sparse_engine_passes_and_reports_dense_layers_with_reasons(run):
    check = _int8_check(run)
    assert check.ok, check.errors
    rows = {r.module: r for r in check.rows}
    for module in ("intermediate.dense", "output.dense"):
        row = rows[f"bert.encoder.layer.0.{module}"]
        assert row.ran_sparse and row.precision == "INT8" and row.has_sparse_weights
    query = rows["bert.encoder.layer.0.attention.self.query"]
    assert query.precision == "INT8" and not query.ran_sparse
    assert "FP output" in query.sparse_reason and "too narrow" in query.sparse_reason
    assert "MatMul form" in rows["bert.encoder.layer.0.attention.self.key"].sparse_reason
    assert "MatMul form" in rows["bert.encoder.layer.0.attention.self.value"].sparse_reason  # Myelin gemm
    attn_out = rows["bert.encoder.layer.0.attention.output.dense"]
    assert "FP output" not in attn_out.sparse_reason and "too narrow" in attn_out.sparse_reason
    assert rows["classifier"].expected_precision is None  # not quantized: no INT8 request
    assert len(check.warnings) == 4  # q, k, v, attention output trained sparse but dense
    assert "2/6 trained-sparse layers run sparse" in check.summary()
    table = check.table()
    assert "bert.encoder.layer.0.intermediate.dense" in table and "INT8" in table


def test_required_sparse_layer_running_dense_fails(run):
    check = _int8_check(run, require=FFN + ["*.attention.output.dense"])
    assert not check.ok
    assert any("attention.output.dense" in e and "require_sparse" in e for e in check.errors)


def test_silent_fp32_int8_engine_fails(run):
    data = json.loads(TRT10_INT8.read_text())
    for layer in data["Layers"]:  # Q/DQ not fused: every GEMM runs FP32 with float weights
        for tensor in layer.get("Inputs", []) + layer.get("Outputs", []):
            tensor["Format/Datatype"] = "Row major linear FP32"
        if "Weights" in layer:
            layer["Weights"]["Type"] = "Float"
        layer.pop("HasSparseWeights", None)
        layer["TacticName"] = "sm80_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize64x64x32"
    check = _int8_check(run, data)
    assert not check.ok
    mismatched = [r.module for r in check.rows if r.problem]
    assert sorted(mismatched) == sorted(run["manifest"]["sparse_modules"])
    assert all("runs FP32, the spec requests INT8" in e for e in check.errors if "require_sparse" not in e)


def test_fp16_engine_passes_with_layernorm_in_fp32(run):
    check = _fp16_check(run)
    assert check.ok, check.errors
    assert all(r.precision == "FP16" for r in check.rows)
    assert not check.other_mismatches


def test_silent_fp32_fp16_engine_fails(run):
    data = copy.deepcopy(json.loads(TRT11_FP16.read_text()))
    for layer in data["Layers"]:
        if "value/MatMul" in layer["Name"] or layer["Name"].startswith("/model/bert/encoder/layer.0/attention/output/Add"):
            for tensor in layer["Inputs"] + layer["Outputs"]:
                tensor["DataType"], tensor["Format"] = "Float", "Row major linear FP32 format (kLINEAR)"
    check = _fp16_check(run, data)
    assert not check.ok
    assert [r.module for r in check.rows if r.problem] == ["bert.encoder.layer.0.attention.self.value"]
    assert [m["onnx_nodes"] for m in check.other_mismatches] == [["/model/bert/encoder/layer.0/attention/output/Add"]]


def test_int8_engine_with_fp16_remainder_flags_fp32_layers_outside_the_kept_ops(run):
    gemms = gemm_nodes(run["dir"] / "onnx" / "sparse_int8_qdq.onnx", run["manifest"]["layer_map"])
    info = parse_layer_json(TRT10_INT8)  # the GELU and the attention products run FP32 ("Float") in this engine
    kept = [layer.onnx_nodes[0] for layer in info.layers if "Softmax" in layer.name or "LayerNorm" in layer.name]

    def check(remainder):
        return check_engine(info, precision="int8-qdq", sparse_weights=True, gemms=gemms,
                            sparse_modules=run["manifest"]["sparse_modules"], fp32_nodes=kept,
                            fp16_remainder=remainder)

    flagged = [m["onnx_nodes"] for m in check(True).other_mismatches]
    assert any("intermediate_act_fn/Div" in n for nodes in flagged for n in nodes)
    assert not any("Softmax" in n or "LayerNorm" in n for nodes in flagged for n in nodes)  # kept FP32 by design
    assert any("an INT8 engine with an FP16 remainder" in e for e in check(True).errors)
    assert not check(False).other_mismatches  # an FP32-remainder INT8 engine may run its remainder in FP32


def test_engine_without_visible_gemms_cannot_be_verified(run):
    data = {"Layers": [{"Name": "{ForeignNode[/model/bert/embeddings/Shape.../model/classifier/Gemm]}",
                        "LayerType": "Myelin", "Inputs": [], "Outputs": []}], "Bindings": []}
    check = _fp16_check(run, data)
    assert not check.ok and "cannot be verified" in check.errors[0]


def _gemm(node="/m/l0/fc/MatMul", shape=(1024, 1024), sparse=True, quantized=True):
    return GemmNode(node=node, op_type="MatMul", initializer="w", module="l0.fc", shape=list(shape),
                    nm_sparse=sparse, quantized=quantized)


def _layer(node="/m/l0/fc/MatMul", layer_type="CaskConvolution", out="Int8", sparse=0):
    raw = {"Name": node, "LayerType": layer_type, "ParameterType": "Convolution",
           "Inputs": [{"Name": "x", "Dimensions": [-1, 1024], "Format/Datatype": "Row major Int8 format"}],
           "Outputs": [{"Name": "y", "Dimensions": [-1, 1024], "Format/Datatype": f"Row major linear {out}"}],
           "HasSparseWeights": sparse, "TacticName": "sm90_xmma_fprop_implicit_gemm_i8i8"}
    return EngineLayer.from_json(raw)


@pytest.mark.parametrize("gemm, layer, log, reason", [
    (_gemm(sparse=False), _layer(), None, "not 2:4 in the ONNX"),
    (_gemm(), None, None, "not found"),
    (_gemm(), _layer(out="FP32"), None, "FP output"),
    (_gemm(shape=(1024, 128)), _layer(), None, "too narrow"),
    (_gemm(), _layer(), ["(Sparsity) Layers eligible for sparse math: /m/l0/fc/MatMul",
                         "(Sparsity) TRT inference plan picked sparse implementation for layers: "],
     "eligible, but the dense tactic timed faster"),
    (_gemm(), _layer(), ["(Sparsity) Layers eligible for sparse math: /m/other"], "not eligible per the builder log"),
    (_gemm(), _layer(), None, "no reason known"),
])
def test_sparse_miss_reasons(gemm, layer, log, reason):
    from nxm_deploy.engine.inspect import EngineInfo

    info = EngineInfo(layers=[layer] if layer else [], io_tensors=[], schema="trt10")
    check = check_engine(info, precision="int8-qdq", sparse_weights=True, gemms=[gemm], sparse_modules=["l0.fc"],
                         sparsity_log=log)
    assert reason in check.rows[0].sparse_reason
    assert not check.rows[0].ran_sparse


def test_sparse_picked_per_log_counts_as_sparse():
    from nxm_deploy.engine.inspect import EngineInfo

    info = EngineInfo(layers=[_layer()], io_tensors=[], schema="trt10")
    log = ["(Sparsity) TRT inference plan picked sparse implementation for layers: /m/l0/fc/MatMul"]
    check = check_engine(info, precision="int8-qdq", sparse_weights=True, gemms=[_gemm()], sparse_modules=["l0.fc"],
                         sparsity_log=log, require_sparse=lambda m: True)
    assert check.ok and check.rows[0].ran_sparse


def test_require_sparse_must_match_a_gemm_and_needs_training(run):
    check = _int8_check(run, require=["*.no_such_module"])
    assert any("match none" in e for e in check.errors)
    untrained = _int8_check(run, require=FFN)
    assert untrained.ok
    gemms = gemm_nodes(run["dir"] / "onnx" / "sparse_int8_qdq.onnx", run["manifest"]["layer_map"])
    check = check_engine(parse_layer_json(TRT10_INT8), precision="int8-qdq", sparse_weights=True, gemms=gemms,
                         sparse_modules=[], require_sparse=_matcher(["*.attention.self.query"]))
    assert any("not trained sparse" in e for e in check.errors)


def test_sparsity_log_lines_of_tensorrt_10():
    """Verbatim (timestamps aside) from the TensorRT 10.16 sparsity sample log in NVIDIA/trt-samples-for-hackathon-cn
    (cookbook/04-Feature/Sparsity/log-main.py.log): a Myelin region's lines, then the classic layers' lines."""
    lines = [
        "[TRT] [V]  (foreignNode) (Sparsity) Found 1 layer(s) eligible to use sparse tactics: node_linear",
        "[TRT] [V]  (foreignNode) (Sparsity) Chose 0 layer(s) using sparse tactics:",
        "[TRT] [V] (Sparsity) Found 2 layer(s) eligible to use sparse tactics: node_conv2d + node_relu, "
        "node_conv2d_1 + node_relu_1",
        "[TRT] [V] (Sparsity) Chose 1 layer(s) using sparse tactics: node_conv2d_1 + node_relu_1",
    ]
    eligible, picked = parse_sparsity_log(lines)
    assert eligible == {"node_linear", "node_conv2d", "node_relu", "node_conv2d_1", "node_relu_1"}
    assert picked == {"node_conv2d_1", "node_relu_1"}
    eligible, picked = parse_sparsity_log(lines[:2])
    assert eligible == {"node_linear"} and picked == set()  # eligible, none chosen: the layer runs dense


def test_has_sparse_weights_alone_is_not_a_sparse_kernel():
    """NVIDIA/TensorRT#4020 (TensorRT 10, --sparsity=force): two layers with "HasSparseWeights": 1, one ran the
    dense implicit-GEMM tactic, the other a sparse one; tactic names verbatim from that engine's layer JSON."""
    base = {"LayerType": "CaskConvolution", "Inputs": [], "Outputs": [], "ParameterType": "Convolution",
            "Weights": {"Type": "Int8", "Count": 294912}, "HasSparseWeights": 1}
    dense = {**base, "Name": "resnetv15_stage3_conv0_fwd + resnetv15_stage3_batchnorm0_fwd",
             "TacticName": "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs_vect_c_32_"
                           "nchw_vect_c_32_tilesize32x32x64_stage6_warpsize2x1x1_g1_tensor16x8x32_t1r3s3"}
    sparse = {**base, "Name": "resnetv15_stage3_conv4_fwd",
              "TacticName": "sm80_xmma_fprop_avdt_sparse_int8int8_tilesize64x64x64_tapsperload3_threadspercta128_"
                            "r3s3_u1v1_scalebias_relu"}
    no_tactic = {**base, "Name": "x"}
    info = parse_layer_json({"Layers": [dense, sparse, no_tactic], "Bindings": []})
    assert [layer.ran_sparse for layer in info.layers] == [False, True, True]
