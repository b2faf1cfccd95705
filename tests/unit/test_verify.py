"""Unit tests of nxm_deploy.export.verify on small hand-built ONNX graphs (no torch export)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nxm_deploy.errors import ExportError, SparsityVerificationError
from nxm_deploy.export.verify import SparsityReport, check_onnx_sparsity, verify_onnx_sparsity
from nxm_deploy.sparsity.pattern import NMPattern

OPSET = 13


# ----------------------------------------------------------------------------------------------- helpers
def nm_array(shape, axis, n_keep=2, m_group=4, seed=0, dtype=np.float32) -> np.ndarray:
    """Random array with exactly ``n_keep`` nonzeros in every ``m_group`` consecutive entries along ``axis``."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    moved = np.moveaxis(values, axis, -1)
    groups = moved.reshape(-1, m_group).copy()
    keep = np.argsort(rng.random(groups.shape), axis=1)[:, :n_keep]
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, keep, True, axis=1)
    groups[~mask] = 0.0
    return np.moveaxis(groups.reshape(moved.shape), -1, axis).astype(dtype)


def first_bad_reference(array: np.ndarray, axis: int, n_keep: int, m_group: int):
    """Loop-based reference for 2-D arrays: first violating group in (other-axis, group) order."""
    assert array.ndim == 2
    other = 1 - axis
    for j in range(array.shape[other]):
        for g in range(0, array.shape[axis], m_group):
            group = array[g : g + m_group, j] if axis == 0 else array[j, g : g + m_group]
            if np.count_nonzero(group) > n_keep:
                return (g, j) if axis == 0 else (j, g)
    return None


def make_model(nodes, initializers, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def fvi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def matmul_model(weight: np.ndarray, name: str = "w") -> onnx.ModelProto:
    """y = x @ W with W ``[K, N]`` an initializer."""
    k, n = weight.shape
    return make_model(
        [helper.make_node("MatMul", ["x", name], ["y"], name="mm")],
        [numpy_helper.from_array(weight, name)],
        [fvi("x", [2, k])],
        [fvi("y", [2, n])],
    )


def qdq_linear_model(weight_out_in: np.ndarray) -> onnx.ModelProto:
    """TorchScript-style fake-quant nn.Linear: W[out,in] -> Q -> DQ -> Transpose[1,0] -> MatMul."""
    out_f, in_f = weight_out_in.shape
    inits = [
        numpy_helper.from_array(weight_out_in, "fc.weight"),
        numpy_helper.from_array(np.full((out_f,), 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros((out_f,), np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["fc.weight", "w_scale", "w_zp"], ["wq"], name="q", axis=0),
        helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wdq"], name="dq", axis=0),
        helper.make_node("Transpose", ["wdq"], ["wt"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"], name="fc_mm"),
    ]
    return make_model(nodes, inits, [fvi("x", [2, in_f])], [fvi("y", [2, out_f])])


def only(report: SparsityReport):
    assert len(report.layers) == 1, report.table()
    return report.layers[0]


# ----------------------------------------------------------------------------------------------- (a) MatMul
def test_matmul_sparse_along_k():
    w = nm_array((16, 8), axis=0)
    layer = only(check_onnx_sparsity(matmul_model(w)))
    assert layer.status == "sparse"
    assert (layer.node, layer.op_type, layer.initializer) == ("mm", "MatMul", "w")
    assert layer.axis == 0 and layer.shape == (16, 8) and layer.dtype == "float32"
    assert layer.groups_checked == 4 * 8 and layer.groups_violating == 0
    assert layer.first_bad is None
    assert layer.density == pytest.approx(0.5)
    assert layer.module is None and layer.expected_sparse is False


def test_matmul_sparse_only_along_n_is_dense():
    w = nm_array((16, 8), axis=1, seed=3)
    layer = only(check_onnx_sparsity(matmul_model(w)))
    assert layer.status == "dense" and layer.axis == 0
    assert layer.groups_violating > 0
    assert layer.first_bad == first_bad_reference(w, 0, 2, 4)


def test_matmul_one_dense_group_first_bad():
    w = nm_array((16, 8), axis=0, seed=1)
    w[8:12, 5] = 1.0  # the group of rows 8..11 in column 5 now has 4 nonzeros
    layer = only(check_onnx_sparsity(matmul_model(w)))
    assert layer.status == "violating"
    assert layer.groups_violating == 1
    assert layer.first_bad == (8, 5)


# ----------------------------------------------------------------------------------------------- (b) Gemm
def gemm_model(weight: np.ndarray, trans_b: int) -> onnx.ModelProto:
    k = weight.shape[1] if trans_b else weight.shape[0]
    n = weight.shape[0] if trans_b else weight.shape[1]
    return make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=trans_b)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(n, np.float32), "b")],
        [fvi("x", [2, k])],
        [fvi("y", [2, n])],
    )


def test_gemm_trans_b_checks_axis_1():
    w = nm_array((8, 16), axis=1)  # [N, K], 2:4 along K
    layer = only(check_onnx_sparsity(gemm_model(w, trans_b=1)))
    assert (layer.op_type, layer.axis, layer.status) == ("Gemm", 1, "sparse")


def test_gemm_no_trans_b_checks_axis_0():
    w_k_n = nm_array((16, 8), axis=0)
    layer = only(check_onnx_sparsity(gemm_model(w_k_n, trans_b=0)))
    assert (layer.axis, layer.status) == (0, "sparse")
    # the transB=1 layout read without transB is checked on axis 0, where it is not 2:4
    w_n_k = nm_array((8, 16), axis=1, seed=5)
    layer = only(check_onnx_sparsity(gemm_model(w_n_k, trans_b=0)))
    assert (layer.axis, layer.status) == (0, "dense")
    assert layer.first_bad == first_bad_reference(w_n_k, 0, 2, 4)


# ----------------------------------------------------------------------------------------------- (c) QDQ + Transpose
def test_qdq_transpose_linear_sparse_then_dense():
    w = nm_array((8, 16), axis=1, seed=2)  # nn.Linear weight [out, in], 2:4 along in
    layer = only(check_onnx_sparsity(qdq_linear_model(w)))
    assert (layer.initializer, layer.axis, layer.status) == ("fc.weight", 1, "sparse")
    assert layer.shape == (8, 16)

    row, col = 3, 4
    zeros = np.flatnonzero(w[row, col : col + 4] == 0)
    w[row, col + zeros[0]] = 0.7  # fill one of the two zeros: 3 nonzeros in this group
    assert np.count_nonzero(w[row, col : col + 4]) == 3
    layer = only(check_onnx_sparsity(qdq_linear_model(w)))
    assert layer.status == "violating" and layer.groups_violating == 1
    assert layer.first_bad == (row, col)


def test_transpose_3d_maps_axis_through_perm():
    # init [A=8, B=2, C=12] -> Transpose perm [1, 2, 0] -> [B, C, A] = batched B [batch, K, N]:
    # consumer axis 1 (K = C) maps to producer axis perm[1] = 2.
    w = nm_array((8, 2, 12), axis=2, seed=4)
    model = make_model(
        [
            helper.make_node("Transpose", ["w"], ["wt"], name="t", perm=[1, 2, 0]),
            helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm"),
        ],
        [numpy_helper.from_array(w, "w")],
        [fvi("x", [2, 3, 12])],
        [fvi("y", [2, 3, 8])],
    )
    layer = only(check_onnx_sparsity(model))
    assert (layer.axis, layer.status) == (2, "sparse")


def test_reshape_keeping_layout_is_followed_and_other_reshape_skipped():
    w = nm_array((16, 8), axis=0)
    shape_same = numpy_helper.from_array(np.array([16, -1], np.int64), "shape_same")
    shape_flat = numpy_helper.from_array(np.array([8, 16], np.int64), "shape_flat")
    inits = [numpy_helper.from_array(w, "w"), shape_same, shape_flat]
    ok_model = make_model(
        [
            helper.make_node("Reshape", ["w", "shape_same"], ["wr"], name="r"),
            helper.make_node("MatMul", ["x", "wr"], ["y"], name="mm"),
        ],
        inits, [fvi("x", [2, 16])], [fvi("y", [2, 8])],
    )
    assert only(check_onnx_sparsity(ok_model)).status == "sparse"
    bad_model = make_model(
        [
            helper.make_node("Reshape", ["w", "shape_flat"], ["wr"], name="r"),
            helper.make_node("MatMul", ["x", "wr"], ["y"], name="mm"),
        ],
        inits, [fvi("x", [2, 8])], [fvi("y", [2, 16])],
    )
    layer = only(check_onnx_sparsity(bad_model, layer_map={"w": "enc.fc"}))
    assert layer.status == "skipped: reshape changes layout"
    assert layer.module == "enc.fc" and layer.expected_sparse


# ----------------------------------------------------------------------------------------------- (d) INT8 codes
def int8_dq_model(codes: np.ndarray, zero_point: int | None) -> onnx.ModelProto:
    k, n = codes.shape
    inits = [numpy_helper.from_array(codes, "w_codes"), numpy_helper.from_array(np.array(0.02, np.float32), "s")]
    dq_inputs = ["w_codes", "s"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(np.array(zero_point, np.int8), "zp"))
        dq_inputs.append("zp")
    return make_model(
        [
            helper.make_node("DequantizeLinear", dq_inputs, ["w"], name="dq"),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        ],
        inits, [fvi("x", [2, k])], [fvi("y", [2, n])],
    )


def test_int8_codes_through_dequantize():
    codes = np.round(nm_array((16, 8), axis=0) * 100).astype(np.int8)
    layer = only(check_onnx_sparsity(int8_dq_model(codes, zero_point=None)))
    assert (layer.dtype, layer.status, layer.axis) == ("int8", "sparse", 0)
    assert layer.density == pytest.approx(0.5)
    codes[0:4, 2] = 7
    layer = only(check_onnx_sparsity(int8_dq_model(codes, zero_point=0)))
    assert layer.status == "violating" and layer.first_bad == (0, 2)


def test_int8_codes_with_nonzero_zero_point_compare_against_it():
    zp = 3
    mask = nm_array((16, 8), axis=0) != 0
    codes = np.where(mask, 50, zp).astype(np.int8)  # dequantizes to 0 exactly where code == zp
    assert only(check_onnx_sparsity(int8_dq_model(codes, zero_point=zp))).status == "sparse"
    assert only(check_onnx_sparsity(int8_dq_model(codes, zero_point=0))).status == "dense"


# ----------------------------------------------------------------------------------------------- (e) Cast, Constant
def test_cast_in_chain():
    w = nm_array((16, 8), axis=0, dtype=np.float16)
    model = make_model(
        [
            helper.make_node("Cast", ["w16"], ["w"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("Identity", ["w"], ["wi"], name="id"),
            helper.make_node("MatMul", ["x", "wi"], ["y"], name="mm"),
        ],
        [numpy_helper.from_array(w, "w16")],
        [fvi("x", [2, 16])], [fvi("y", [2, 8])],
    )
    layer = only(check_onnx_sparsity(model))
    assert (layer.initializer, layer.dtype, layer.status) == ("w16", "float16", "sparse")


def test_constant_node_counts_as_initializer():
    w = nm_array((16, 8), axis=0)
    model = make_model(
        [
            helper.make_node("Constant", [], ["wc"], name="c", value=numpy_helper.from_array(w, "wc")),
            helper.make_node("MatMul", ["x", "wc"], ["y"], name="mm"),
        ],
        [], [fvi("x", [2, 16])], [fvi("y", [2, 8])],
    )
    layer = only(check_onnx_sparsity(model))
    assert (layer.initializer, layer.status) == ("wc", "sparse")


def test_weight_computed_by_unsupported_op_is_listed_as_skipped():
    w = nm_array((16, 8), axis=0)
    model = make_model(
        [
            helper.make_node("Mul", ["w", "scale"], ["ws"], name="mul"),
            helper.make_node("MatMul", ["x", "ws"], ["y"], name="mm"),
        ],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(2.0, np.float32), "scale")],
        [fvi("x", [2, 16])], [fvi("y", [2, 8])],
    )
    layer = only(check_onnx_sparsity(model, layer_map={"w": "enc.fc"}))
    assert layer.status.startswith("skipped: weight computed by Mul")
    assert layer.initializer == "w" and layer.expected_sparse
    with pytest.raises(SparsityVerificationError):
        verify_onnx_sparsity(model, layer_map={"w": "enc.fc"})


# ----------------------------------------------------------------------------------------------- (f) activations
def test_activation_activation_matmul_not_listed():
    wk = nm_array((16, 16), axis=0)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "wk"], ["k"], name="key"),
            helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
            helper.make_node("MatMul", ["x", "kt"], ["scores"], name="scores"),
            helper.make_node("MatMul", ["scores", "x"], ["ctx"], name="ctx"),
        ],
        [numpy_helper.from_array(wk, "wk")],
        [fvi("x", [2, 4, 16])], [fvi("ctx", [2, 4, 16])],
    )
    report = check_onnx_sparsity(model)
    assert [layer.node for layer in report.layers] == ["key"]
    assert report.layers[0].status == "sparse"


# ----------------------------------------------------------------------------------------------- (g) skipped axis
def test_axis_not_multiple_of_group_is_skipped_and_fails_only_when_expected():
    w = np.ones((6, 8), np.float32)
    model = matmul_model(w)
    layer = only(check_onnx_sparsity(model))
    assert layer.status == "skipped: reduction axis 6 not a multiple of 4"
    assert layer.groups_checked == 0 and layer.density == pytest.approx(1.0)

    not_expected = check_onnx_sparsity(model, layer_map={"w": "enc.fc"}, expected=set())
    assert not not_expected.layers[0].expected_sparse and not_expected.failures == [] and not_expected.ok
    expected = check_onnx_sparsity(model, layer_map={"w": "enc.fc"})  # expected=None: all mapped modules
    assert expected.layers[0].expected_sparse
    assert [f.module for f in expected.failures] == ["enc.fc"] and not expected.ok


# ----------------------------------------------------------------------------------------------- (h) verify
def three_layer_model(dense_row_col=(3, 4)) -> onnx.ModelProto:
    """Three QDQ linears in sequence; the middle one ("enc.mid") gets one group with 3 nonzeros."""
    nodes, inits = [], []
    x = "x"
    for i, name in enumerate(["enc.first", "enc.mid", "enc.last"]):
        w = nm_array((16, 16), axis=1, seed=10 + i)
        if name == "enc.mid":
            r, c = dense_row_col
            w[r, c : c + 4] = [0.5, 0.6, 0.7, 0.0]
        inits += [
            numpy_helper.from_array(w, f"{name}.weight"),
            numpy_helper.from_array(np.array(0.01, np.float32), f"s{i}"),
            numpy_helper.from_array(np.array(0, np.int8), f"z{i}"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", [f"{name}.weight", f"s{i}", f"z{i}"], [f"q{i}"], name=f"q{i}"),
            helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"dq{i}"], name=f"dq{i}"),
            helper.make_node("Transpose", [f"dq{i}"], [f"t{i}"], name=f"t{i}", perm=[1, 0]),
            helper.make_node("MatMul", [x, f"t{i}"], [f"y{i}"], name=f"/{name}/MatMul"),
        ]
        x = f"y{i}"
    return make_model(nodes, inits, [fvi("x", [2, 16])], [fvi(x, [2, 16])])


LAYER_MAP = {f"{m}.weight": m for m in ["enc.first", "enc.mid", "enc.last"]}


def test_verify_raises_with_module_and_first_bad_group():
    with pytest.raises(SparsityVerificationError) as info:
        verify_onnx_sparsity(three_layer_model((3, 4)), "2:4", layer_map=LAYER_MAP)
    err = info.value
    assert "enc.mid" in str(err) and "(3, 4)" in str(err)
    assert "enc.first" not in err.message and "enc.last" not in err.message
    assert isinstance(err.report, SparsityReport)
    assert [f.module for f in err.report.failures] == ["enc.mid"]
    assert err.report.failures[0].first_bad == (3, 4)


def test_verify_names_every_failing_layer_and_passes_when_clean():
    model = three_layer_model()
    # enc.mid is dense; the others pass -> only enc.mid is named
    report = check_onnx_sparsity(model, layer_map=LAYER_MAP)
    assert [l.status for l in report.layers] == ["sparse", "dense", "sparse"]
    # dense layer not expected: verify returns the report
    ok = verify_onnx_sparsity(model, layer_map=LAYER_MAP, expected={"enc.first", "enc.last"})
    assert ok.ok and [l.expected_sparse for l in ok.layers] == [True, False, True]
    # every failing layer is named
    with pytest.raises(SparsityVerificationError) as info:
        verify_onnx_sparsity(model, "1:4", layer_map=LAYER_MAP)
    for module in LAYER_MAP.values():
        assert module in info.value.message


def test_verify_fails_when_expected_module_is_missing():
    model = three_layer_model()
    with pytest.raises(SparsityVerificationError) as info:
        verify_onnx_sparsity(model, layer_map=LAYER_MAP, expected={"enc.first", "enc.not_exported"})
    assert "enc.not_exported" in info.value.message
    assert info.value.report.missing_expected == ["enc.not_exported"]


# ----------------------------------------------------------------------------------------------- (i) report forms
def test_to_dict_is_json_and_table_lists_modules():
    report = check_onnx_sparsity(three_layer_model(), layer_map=LAYER_MAP)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["pattern"] == "2:4" and data["ok"] is False and data["failures"] == ["enc.mid"]
    assert data["layers"][1]["first_bad"] == [3, 4] and data["layers"][1]["shape"] == [16, 16]
    table = report.table()
    for module in LAYER_MAP.values():
        assert module in table
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert lines[0].split()[:3] == ["module", "initializer", "shape"]
    assert "16x16" in lines[2] and "dense" in lines[3]


# ----------------------------------------------------------------------------------------------- (j) Conv
def conv_model(weight: np.ndarray) -> onnx.ModelProto:
    k, c, r, s = weight.shape
    return make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        [numpy_helper.from_array(weight, "w")],
        [fvi("x", [1, c, 5, 5])], [fvi("y", [1, k, 5, 5])],
    )


def test_conv_weight_axis_1():
    w = nm_array((4, 8, 3, 3), axis=1)
    layer = only(check_onnx_sparsity(conv_model(w)))
    assert (layer.op_type, layer.axis, layer.status) == ("Conv", 1, "sparse")
    w_bad = w.copy()
    w_bad[2, 4:8, 1, 0] = 1.0
    layer = only(check_onnx_sparsity(conv_model(w_bad)))
    assert layer.status == "violating" and layer.first_bad == (2, 4, 1, 0)
    layer = only(check_onnx_sparsity(conv_model(nm_array((4, 8, 3, 4), axis=3, seed=9))))
    assert layer.status == "dense"


# ----------------------------------------------------------------------------------------------- other patterns
@pytest.mark.parametrize("n_keep,m_group", [(1, 4), (2, 8), (4, 8)])
def test_other_patterns(n_keep, m_group):
    w = nm_array((32, 8), axis=0, n_keep=n_keep, m_group=m_group, seed=n_keep * 10 + m_group)
    pattern = f"{n_keep}:{m_group}"
    layer = only(check_onnx_sparsity(matmul_model(w), pattern))
    assert layer.status == "sparse"
    assert layer.groups_checked == (32 // m_group) * 8
    assert layer.density == pytest.approx(n_keep / m_group)
    assert only(check_onnx_sparsity(matmul_model(w), NMPattern.parse(pattern))).status == "sparse"


def test_patterns_are_not_interchangeable():
    w = nm_array((32, 8), axis=0)
    layer = only(check_onnx_sparsity(matmul_model(w), "1:4"))
    assert layer.status == "dense" and layer.first_bad == first_bad_reference(w, 0, 1, 4)
    w28 = nm_array((32, 8), axis=0, n_keep=2, m_group=8, seed=1)
    w28[0:8, 0] = [1, 1, 0, 0, 0, 0, 0, 0]  # 2 nonzeros in one group of 4: 2:8 holds, 2:4 holds
    w28[0:8, 1] = [0, 0, 0, 0, 0, 1, 1, 1]  # 3 nonzeros in 8: breaks 2:8 (and 2:4 in rows 4..7)
    layer = only(check_onnx_sparsity(matmul_model(w28), "2:8"))
    assert layer.status == "violating" and layer.groups_violating == 1 and layer.first_bad == (0, 1)
    w24 = nm_array((32, 8), axis=0, seed=2)  # 2:4 everywhere = 4 nonzeros per 8: breaks 2:8
    assert only(check_onnx_sparsity(matmul_model(w24), "2:4")).status == "sparse"
    assert only(check_onnx_sparsity(matmul_model(w24), "2:8")).status == "dense"


# ----------------------------------------------------------------------------------------------- loading
def test_path_with_external_data(tmp_path):
    w = nm_array((64, 64), axis=0)
    model = matmul_model(w)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    assert (tmp_path / "m.data").is_file()
    report = check_onnx_sparsity(path, layer_map={"w": "enc.fc"})
    assert report.path == str(path) and report.ok and report.layers[0].status == "sparse"


def test_missing_path_raises_export_error(tmp_path):
    with pytest.raises(ExportError):
        check_onnx_sparsity(tmp_path / "nope.onnx")


# ----------------------------------------------------------------------------------------------- Polygraphy cross-check
def test_agrees_with_polygraphy_inspect_sparsity(tmp_path):
    polygraphy = Path(sys.executable).parent / "polygraphy"
    if not polygraphy.is_file():
        pytest.skip(f"polygraphy script not found at {polygraphy}")
    weights = {
        "w_sparse_a": nm_array((64, 64), axis=0, seed=21),
        "w_dense": nm_array((64, 64), axis=1, seed=22),
        "w_sparse_b": nm_array((64, 64), axis=0, seed=23),
    }
    nodes, x = [], "x"
    for i, name in enumerate(weights):
        nodes.append(helper.make_node("MatMul", [x, name], [f"y{i}"], name=f"mm{i}"))
        x = f"y{i}"
    model = make_model(
        nodes, [numpy_helper.from_array(w, n) for n, w in weights.items()], [fvi("x", [2, 64])], [fvi(x, [2, 64])]
    )
    path = tmp_path / "three.onnx"
    onnx.save(model, str(path))

    proc = subprocess.run(
        [str(polygraphy), "inspect", "sparsity", str(path)], capture_output=True, text=True, timeout=120
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    theirs: dict[str, bool] = {}
    for match in re.finditer(r"Found (sparse|non-sparse) tensor: (\S+)", log):
        theirs[match.group(2)] = match.group(1) == "sparse"
    assert set(theirs) == set(weights), log

    ours = {layer.initializer: layer.status == "sparse" for layer in check_onnx_sparsity(path).layers}
    assert ours == theirs == {"w_sparse_a": True, "w_dense": False, "w_sparse_b": True}
