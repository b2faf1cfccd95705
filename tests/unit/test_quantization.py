"""INT8 fake quant: numerics equal torch's/ONNX's, exact zeros kept, LSQ gradients, calibration, Q/DQ export."""

import numpy as np
import pytest
import torch
from torch import nn

from nxm_deploy.errors import ConfigError
from nxm_deploy.quantization import QuantLinear, TensorQuantizer, calibrate, export_mode, quantize_model_
from nxm_deploy.sparsity import nm_mask


def _qlinear(seed=0, in_features=16, out_features=8):
    torch.manual_seed(seed)
    q = QuantLinear.from_linear(nn.Linear(in_features, out_features))
    x = torch.randn(32, in_features)
    calibrate(q, lambda m: m(x))
    return q, x


def test_weight_fake_quant_equals_torch_per_channel_op():
    q, _ = _qlinear()
    w = q.weight.detach()
    scale = (q.weight_quantizer.amax.detach() / 127).float()
    ref = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(8, dtype=torch.int32), 0, -128, 127)
    assert torch.equal(q.weight_quantizer(w), ref)


def test_calibration_max_sets_amax_to_abs_max():
    q, x = _qlinear()
    assert torch.allclose(q.weight_quantizer.amax, q.weight.detach().abs().amax(dim=1))
    assert torch.allclose(q.input_quantizer.amax, x.abs().max())


def test_percentile_calibration_below_max():
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(16, 8))
    x = torch.randn(512, 16)
    x[0, 0] = 100.0  # outlier
    calibrate(q, lambda m: m(x), method="percentile", percentile=99.0)
    assert float(q.input_quantizer.amax) < 5.0


def test_pruned_weights_stay_exact_zero_and_codes_zero():
    q, x = _qlinear()
    mask = nm_mask(q.weight, "2:4")
    with torch.no_grad():
        q.weight.mul_(mask)
    wq = q.weight_quantizer(q.weight)
    assert (wq[~mask] == 0).all()
    codes = q.weight_quantizer.int8_codes(q.weight)
    assert codes.dtype == torch.int8 and (codes[~mask] == 0).all()
    assert int(codes.min()) >= -128 and int(codes.max()) <= 127


def test_lsq_gradients_reach_amax_and_weights():
    q, x = _qlinear()
    q(x).pow(2).sum().backward()
    assert q.weight_quantizer.amax.grad is not None and q.weight_quantizer.amax.grad.abs().sum() > 0
    assert q.input_quantizer.amax.grad is not None
    assert q.weight.grad.abs().sum() > 0  # straight-through rounding


def test_fixed_amax_when_not_learned():
    q = TensorQuantizer(axis=None, learn_amax=False)
    assert not q.amax.requires_grad


def test_quantize_model_replaces_named_linears():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    before = model[0].weight.detach().clone()
    quantize_model_(model, ["0"])
    assert isinstance(model[0], QuantLinear) and not isinstance(model[2], QuantLinear)
    assert torch.equal(model[0].weight, before)
    with pytest.raises(ConfigError, match="not nn.Linear"):
        quantize_model_(model, ["1"])
    with pytest.raises(ConfigError, match="no such module"):
        quantize_model_(model, ["7"])


def test_calibrate_without_quantizers_or_data_fails():
    with pytest.raises(ConfigError, match="no quantizers"):
        calibrate(nn.Linear(4, 4), lambda m: None)
    q = QuantLinear.from_linear(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="no calibration data"):
        calibrate(q, lambda m: None)


def test_export_gives_qdq_and_matches_ort(tmp_path):
    import onnx
    import onnxruntime as ort

    q, x = _qlinear()
    with torch.no_grad():
        q.weight.mul_(nm_mask(q.weight, "2:4"))
    path = tmp_path / "q.onnx"
    with export_mode(q), torch.no_grad():
        torch.onnx.export(q, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
        ref = q(x).numpy()
    assert not any(n.startswith("_export") for n, _ in q.named_buffers())  # export buffers removed again
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 2
    assert "Round" not in ops and "Div" not in ops  # not decomposed, scales are constants
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    inits.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"})
    for node in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        zero = inits[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any()
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # the trained (STE) forward equals the export forward
    np.testing.assert_allclose(q(x).detach().numpy(), ref, atol=1e-6)


def test_fake_quant_equals_float64_reference_exactly():
    """q(x) = clamp(round_half_even(x / s), -128, 127) * s computed in float64, then cast: bit-exact in float32."""
    q, x = _qlinear(seed=3)
    for quantizer, value in ((q.input_quantizer, x), (q.weight_quantizer, q.weight.detach())):
        scale = (quantizer.amax.detach().double() / 127)
        if quantizer.axis is not None:
            scale = scale.reshape(-1, 1)
        codes = torch.clamp(torch.round(value.double() / scale.float().double()), -128, 127)
        reference = (codes * scale.float().double()).float()
        assert torch.equal(quantizer(value).detach(), reference)


def test_calibration_is_deterministic():
    a, _ = _qlinear(seed=5)
    b, _ = _qlinear(seed=5)
    for qa, qb in ((a.input_quantizer, b.input_quantizer), (a.weight_quantizer, b.weight_quantizer)):
        assert torch.equal(qa.amax, qb.amax)


def test_non_finite_calibration_is_an_error():
    q = QuantLinear.from_linear(nn.Linear(4, 4))
    x = torch.randn(2, 4)
    x[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="non-finite amax"):
        calibrate(q, lambda m: m(x))


@pytest.mark.parametrize("bits", [4, 16, True])
def test_num_bits_other_than_8_is_refused(bits):
    from nxm_deploy.config.recipe import recipe_from_dict

    with pytest.raises(ConfigError, match=f"num_bits={bits!r} is not supported"):
        TensorQuantizer(num_bits=bits)
    with pytest.raises(ConfigError, match="num_bits"):
        recipe_from_dict({"name": "x", "model": {"source": "minilm"}, "task": {"name": "rte"},
                          "train": {"qat": {"num_bits": bits}}})
    assert TensorQuantizer(num_bits=8).num_bits == 8


# ------------------------------------------------------------------------ quantizer groups (placement.py)


def _tiny_bert_quantized(gemm_outputs: bool, attention: bool, targets=None):
    import transformers

    from nxm_deploy.quantization.placement import place_quantizers_

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config).eval()
    names = targets or [f"bert.encoder.layer.{i}.{n}" for i in range(2) for n in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")]
    quantize_model_(model, names)
    placed = place_quantizers_(model, names, gemm_outputs=gemm_outputs, attention=attention)
    batch = {"input_ids": torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(1)),
             "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    batch["attention_mask"][0, 8:] = 0  # padding must stay masked in the INT8 attention
    return model, names, placed, batch


def test_quantizer_groups_place_one_quantizer_per_tensor():
    model, names, placed, _ = _tiny_bert_quantized(True, True)
    assert placed["attention"] == ["bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"]
    # Q/K/V outputs are quantized as attention inputs, so they get no second (output) quantizer
    assert sorted(placed["gemm_outputs"]) == sorted(n for n in names if ".attention.self." not in n)
    assert model.get_submodule("bert.encoder.layer.0.attention.self.query").output_quantizer is None
    assert model.config._attn_implementation == "nxm_int8_eager"
    only_outputs, _, placed2, _ = _tiny_bert_quantized(True, False)
    assert placed2["attention"] == [] and sorted(placed2["gemm_outputs"]) == sorted(names)
    assert only_outputs.config._attn_implementation != "nxm_int8_eager"


def test_int8_attention_matches_eager_attention_when_disabled_and_quantizes_when_enabled():
    from nxm_deploy.quantization.placement import ATTENTION_QUANTIZERS

    model, _, _, batch = _tiny_bert_quantized(True, True)
    reference, _, _, _ = _tiny_bert_quantized(False, False)
    reference.set_attn_implementation("eager")
    for q in (m for m in reference.modules() if isinstance(m, TensorQuantizer)):
        q.enabled = False
    calibrate(model, lambda m: m(**batch))
    attention = model.get_submodule("bert.encoder.layer.0.attention.self")
    probs = {}
    hook = attention.softmax_quantizer.register_forward_hook(lambda m, i, o: probs.setdefault("p", i[0].detach()))
    quantized = model.bert(**batch).last_hidden_state
    hook.remove()
    # softmax probabilities calibrate by max (bounded by 1), whatever the activation method
    assert 0 < float(attention.softmax_quantizer.amax) <= 1.0
    assert torch.all(probs["p"][0, :, :, 8:] == 0)  # padded keys get probability 0 (the eager mask is applied)
    for q in (m for m in model.modules() if isinstance(m, TensorQuantizer)):
        q.enabled = False
    plain = model.bert(**batch).last_hidden_state
    assert torch.allclose(plain, reference.bert(**batch).last_hidden_state, atol=1e-5)  # transformers' eager math
    assert (quantized - plain).abs().max() > 1e-3  # and the quantizers do act
    assert all(getattr(attention, n) is not None for n in ATTENTION_QUANTIZERS)


def test_int8_attention_needs_quantized_qkv():
    with pytest.raises(ConfigError, match="query, key, value Linears"):
        _tiny_bert_quantized(False, True, targets=["bert.encoder.layer.0.intermediate.dense"])


def test_quantizer_groups_export_as_qdq_pairs(tmp_path):
    import onnx

    from nxm_deploy.export.onnx import export_model
    from nxm_deploy.quantization.placement import use_eager_attention

    model, _, _, batch = _tiny_bert_quantized(True, True)
    calibrate(model, lambda m: m(**batch))
    use_eager_attention(model)
    assert model.config._attn_implementation == "nxm_int8_eager"  # export keeps the INT8 attention
    with export_mode(model):
        path = export_model(model, {k: v[:2] for k, v in batch.items()}, tmp_path / "m.onnx")
    nodes = onnx.load(str(path)).graph.node
    quant = [n.name for n in nodes if n.op_type == "QuantizeLinear"]
    for part in ("softmax_quantizer", "q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "output_quantizer"):
        assert sum(part in name for name in quant) >= 2, part  # one per layer
