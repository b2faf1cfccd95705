"""Export of tiny BERT / RoBERTa / DistilBERT models, dense and sparse INT8: Q/DQ guard, layer map, per-layer
n:m verification through Q/DQ + Transpose, a planted violation caught by name, ORT parity."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tiny_models import tiny_classifier

from nxm_deploy.data import get_task
from nxm_deploy.errors import ExportError, SparsityVerificationError
from nxm_deploy.export.onnx import export_model, guard_qdq, layer_map_for, onnx_parity
from nxm_deploy.export.verify import check_onnx_sparsity, verify_onnx_sparsity
from nxm_deploy.quantization import calibrate, export_mode, quantize_model_
from nxm_deploy.sparsity import nm_mask
from nxm_deploy.sparsity.admm import apply_masks_
from nxm_deploy.sparsity.targets import select_targets, target_names
from nxm_deploy.sparsity.pattern import NMPattern


def _tiny(model_type):
    torch.manual_seed(0)
    model = tiny_classifier(model_type, vocab_size=120).eval()
    model.set_attn_implementation("eager")
    return model

def _inputs(model_type, batch=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    feeds = {"input_ids": torch.randint(5, 120, (batch, length), generator=g),
             "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    feeds["attention_mask"][0, -3:] = 0  # some padding
    if model_type == "bert":
        feeds["token_type_ids"] = torch.zeros(batch, length, dtype=torch.long)
    return feeds


@pytest.fixture(scope="module", params=["bert", "roberta", "distilbert"])
def exported(request, tmp_path_factory):
    model_type = request.param
    out = tmp_path_factory.mktemp(model_type)
    model = _tiny(model_type)
    feeds = _inputs(model_type)
    dense_path = export_model(model, {k: v[:2] for k, v in feeds.items()}, out / "dense.onnx")

    pattern = NMPattern.parse("2:4")
    targets = target_names(select_targets(model, pattern))
    assert len(targets) == 12
    masks = {f"{t}.weight": nm_mask(model.get_submodule(t).weight, pattern) for t in targets}
    apply_masks_(model, masks)
    quantize_model_(model, targets)
    calibrate(model, lambda m: m(**feeds))
    with export_mode(model):
        int8_path = export_model(model, {k: v[:2] for k, v in feeds.items()}, out / "int8.onnx")
    return model_type, model, targets, feeds, dense_path, int8_path


def test_int8_graph_guard_and_layer_map(exported):
    _, model, targets, _, _, int8_path = exported
    proto = onnx.load(str(int8_path))
    counts = guard_qdq(proto, expected_quantized=len(targets))
    assert counts["per_channel_weight_quantizers"] == 12
    layer_map = layer_map_for(proto, model, targets)
    assert sorted(layer_map.values()) == sorted(targets)


def test_dense_export_has_no_qdq_and_is_dense(exported):
    _, _, _, _, dense_path, _ = exported
    proto = onnx.load(str(dense_path))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    report = check_onnx_sparsity(dense_path, "2:4")
    assert report.layers and all(r.status == "dense" for r in report.layers)


def test_int8_export_verifies_2of4_per_module(exported):
    _, model, targets, _, _, int8_path = exported
    proto = onnx.load(str(int8_path))
    report = verify_onnx_sparsity(int8_path, "2:4", layer_map=layer_map_for(proto, model, targets), expected=set(targets))
    sparse = {r.module for r in report.layers if r.status == "sparse"}
    assert sparse == set(targets)


def test_planted_violation_is_caught_with_layer_and_group(exported, tmp_path):
    _, model, targets, _, _, int8_path = exported
    proto = onnx.load(str(int8_path))
    layer_map = layer_map_for(proto, model, targets)
    victim = targets[4]  # FFN1 of layer 0
    init_name = next(k for k, v in layer_map.items() if v == victim)
    init = next(i for i in proto.graph.initializer if i.name == init_name)
    array = numpy_helper.to_array(init).copy()
    row, col = np.argwhere(array == 0)[0]  # a pruned weight ([out, in] as stored in front of QuantizeLinear)
    array[row, col] = 0.5
    init.CopyFrom(numpy_helper.from_array(array, init_name))
    with pytest.raises(SparsityVerificationError) as info:
        verify_onnx_sparsity(proto, "2:4", layer_map=layer_map, expected=set(targets))
    message = str(info.value)
    assert victim in message and f"({row}, {col - col % 4})" in message
    assert [r.module for r in info.value.report.failures] == [victim]


def test_ort_parity_dense_and_int8(exported):
    _, model, targets, feeds, dense_path, int8_path = exported
    names = list(feeds)
    loader = [{**{k: v for k, v in feeds.items()}, "labels": torch.tensor([0, 1, 0, 1])}]
    task = get_task("rte")
    with export_mode(model):
        int8 = onnx_parity(int8_path, model, loader, names, task)
    assert int8["argmax_agreement"] == 1.0 and int8["max_abs_diff"] < 1e-3
    assert int8["metric_ort"] == int8["metric_torch"]
    # the tie margin from the twin's own FP32-vs-FP64 noise: the FP64 copy keeps the export scales FP32 (what
    # torch's fake-quant ops take) and its logits are not the FP32 ones bit for bit
    with export_mode(model):
        noisy = onnx_parity(int8_path, model, loader, names, task, tie_margin=0.05, noise_floor=True)
    noise = noisy["noise_floor"]
    assert 0.0 < noise["max_abs_diff"] < 0.5
    assert noisy["tie_margin"] == noise["tie_margin"] == max(0.05, 2.0 * noise["max_abs_diff"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the twin itself untouched


def test_noise_tie_margin_is_twice_the_fp64_gap_with_a_floor():
    from nxm_deploy.export.parity import noise_tie_margin

    fp64 = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    fp32 = fp64 + np.array([[0.0, 0.1], [-0.2, 0.0], [0.0, 0.0]])
    got = noise_tie_margin(fp32, fp64, floor=0.05)
    assert got["tie_margin"] == pytest.approx(0.4) and got["max_abs_diff"] == pytest.approx(0.2)
    assert noise_tie_margin(fp64 + 1e-4, fp64, floor=0.05)["tie_margin"] == 0.05


def test_export_failure_is_export_error(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            raise RuntimeError("boom")

    with pytest.raises(ExportError, match="boom"):
        export_model(Broken(), {"input_ids": torch.ones(1, 4, dtype=torch.long),
                                "attention_mask": torch.ones(1, 4, dtype=torch.long)}, tmp_path / "x.onnx")


def test_int8_codes_match_the_pytorch_twin_and_onnx_arithmetic():
    """Weights that land exactly between two codes: ``w / s`` (ONNX QuantizeLinear) and ``w * (1 / s)`` (PyTorch
    fake_quantize, the exported twin) can round apart; each mode reproduces its own reference exactly."""
    import numpy as np
    import torch

    from nxm_deploy.export.int8_weights import int8_codes

    gen = torch.Generator().manual_seed(0)
    scale = (torch.rand(64, generator=gen) * 0.02 + 1e-3).float()
    w = (torch.randint(-127, 128, (64, 256), generator=gen).float() + 0.5) * scale[:, None]  # halfway points
    w += torch.randn(64, 256, generator=gen) * 1e-9
    fake = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(64, dtype=torch.int32), 0, -128, 127)
    torch_codes = torch.round(fake / scale[:, None]).numpy()
    np.testing.assert_array_equal(int8_codes(w.numpy(), scale.numpy()[:, None], "torch"), torch_codes)
    onnx_codes = np.clip(np.rint(w.numpy() / scale.numpy()[:, None]), -128, 127)
    np.testing.assert_array_equal(int8_codes(w.numpy(), scale.numpy()[:, None], "onnx"), onnx_codes)
    assert (int8_codes(w.numpy(), scale.numpy()[:, None], "torch") != onnx_codes).any()  # the modes do differ here


def test_parity_leaves_numerical_ties_out_of_the_agreement(tmp_path):
    """A class flip where the PyTorch twin's top-2 margin is below ``tie_margin`` is a tie, not a disagreement;
    a flip on a clear margin still counts."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper

    from nxm_deploy.data import get_task
    from nxm_deploy.export.onnx import onnx_parity

    # ONNX model: logits = x (the input values themselves, 2 classes)
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["b", 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 2])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    onnx_logits = torch.tensor([[0.0, 0.01], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    twin_logits = torch.tensor([[0.01, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # flips only the near-tie row

    class Twin(torch.nn.Module):
        def forward(self, input_ids):
            return type("Out", (), {"logits": twin_logits[: len(input_ids)]})()

    loader = [{"input_ids": onnx_logits, "labels": torch.tensor([0, 1, 0, 1])}]
    result = onnx_parity(path, Twin(), loader, ["input_ids"], get_task("rte"), tie_margin=0.05)
    assert result["argmax_agreement"] == 0.75 and result["near_ties"] == 1
    assert result["argmax_agreement_decisive"] == 1.0
    clear = onnx_parity(path, Twin(), loader, ["input_ids"], get_task("rte"), tie_margin=0.001)
    assert clear["near_ties"] == 0 and clear["argmax_agreement_decisive"] == 0.75
