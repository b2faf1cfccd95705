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
