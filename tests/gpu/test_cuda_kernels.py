"""The GPU kernels and the PyTorch CUDA runner (:mod:`nxm_deploy.gpu`) on a real NVIDIA GPU.

Marked ``gpu``: skipped, with the reason, where ``torch.cuda.is_available()`` is false. Run on a GPU machine with
``pytest -m gpu tests/gpu`` (``tools/gpu_check.sh`` does).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False"),
]


def _weight(n, k, seed=0):
    from nxm_deploy.sparsity import nm_mask

    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=gen)
    return w * nm_mask(w, "2:4"), torch.randn(n, device="cuda", generator=gen)


@pytest.mark.parametrize("int8", [False, True])
def test_semi_sparse_linear_matches_reference(int8):
    from nxm_deploy.gpu.kernels import SemiSparseLinear, reference_linear

    w, b = _weight(256, 512)
    x = torch.randn(3, 37, 512, device="cuda").half()  # 111 tokens: padded to the kernel's row multiple inside
    scales = {}
    if int8:
        scales = {"input_scale": x.float().abs().amax() / 127,
                  "weight_scale": w.abs().amax(dim=1) * torch.linspace(0.5, 1.0, 256, device="cuda") / 127}
    layer = SemiSparseLinear(w, b, **scales)
    ref = reference_linear(w, b, x.reshape(-1, 512).float(), **scales).reshape(3, 37, 256)
    results = {}
    for fuse_alpha, fuse_bias in ((layer.int8, True), (layer.int8, False), (False, False)):
        layer.fuse_alpha, layer.fuse_bias = fuse_alpha, fuse_bias
        try:
            out = layer(x)
        except RuntimeError as exc:
            results[(fuse_alpha, fuse_bias)] = f"error: {exc}"
            continue
        assert out.shape == (3, 37, 256) and out.dtype == torch.float16
        results[(fuse_alpha, fuse_bias)] = float((out.float() - ref).abs().max() / ref.abs().max())
    print("relative max error per (fuse_alpha, fuse_bias):", results)
    assert any(isinstance(v, float) and v < 1e-2 for v in results.values()), results
    # the unfused path is the reference behaviour: it must always hold
    assert isinstance(results[(False, False)], float) and results[(False, False)] < 1e-2, results


def test_int8_linear_matches_reference():
    from nxm_deploy.gpu.kernels import Int8Linear, reference_linear

    w, b = _weight(384, 1536, seed=1)
    x = torch.randn(5, 1536, device="cuda").half()
    s_x, s_w = x.float().abs().amax() / 127, w.abs().amax(dim=1) / 127
    out = Int8Linear(w, b, input_scale=s_x, weight_scale=s_w)(x)
    ref = reference_linear(w, b, x.float(), input_scale=s_x, weight_scale=s_w)
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < 1e-2


def _tiny_qat(tmp_path):
    from tiny_models import build_tiny_qdq

    return build_tiny_qdq(tmp_path / "tiny.onnx", gemm_outputs=True, attention=True)


def test_convert_tiny_qat_model_matches_fake_quant(tmp_path):
    """Every 2:4 Linear of the tiny QAT BERT goes to cuSPARSELt INT8; the classifier (2 outputs) stays dense with
    the reason; logits match the FP32 fake-quant model within the INT8 parity rule."""
    from nxm_deploy.export.parity import INT8_MIN_AGREEMENT, INT8_TIE_MARGIN, argmax_agreement_stats
    from nxm_deploy.gpu.kernels import convert_model

    model, names = _tiny_qat(tmp_path)
    model.eval()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (64, 32), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, 20:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
    model.cuda()
    records = convert_model(model, "sparse-int8", names + ["classifier"])
    kernels = {r.name: r.kernel for r in records}
    assert all(kernels[n] == "cusparselt-int8" for n in names), kernels
    assert kernels["classifier"] == "dense-fp16" and "multiple of 32" in next(r.reason for r in records if r.name == "classifier")
    with torch.no_grad():
        got = model(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.float().cpu().numpy()
    stats = argmax_agreement_stats(ref, got, INT8_TIE_MARGIN)
    print("max |Δlogit|", float(np.abs(ref - got).max()), stats)
    assert (stats["argmax_agreement_decisive"] or 1.0) >= INT8_MIN_AGREEMENT
    assert float(np.abs(ref - got).max()) < 0.1


def test_graphed_forward_replays_per_shape(tmp_path):
    from nxm_deploy.gpu.graphs import GraphedForward, hf_forward
    from nxm_deploy.gpu.kernels import convert_model

    model, names = _tiny_qat(tmp_path)
    model.cuda().eval()
    convert_model(model, "sparse-int8", names)
    graphed = GraphedForward(hf_forward(model, "logits"))
    with torch.no_grad():
        for batch, seq in ((4, 32), (8, 16), (4, 32)):
            ids = torch.randint(0, 1000, (batch, seq), device="cuda")
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            eager = model(**inputs).logits
            got = graphed(**inputs)
            assert graphed.capture_error is None, graphed.capture_error
            assert torch.allclose(got.float(), eager.float(), atol=1e-3), (batch, seq, (got - eager).abs().max())
    assert graphed.graphs == 2 and graphed.eager_calls == 0 and graphed.replay_checked


def test_torch_cuda_runner_labels_and_timing(tmp_path):
    from nxm_deploy.runtimes.pytorch import TorchCudaRunner

    model, names = _tiny_qat(tmp_path)
    runner = TorchCudaRunner(model, "torch_cuda_sparse_int8", ["input_ids", "attention_mask"], variant="sparse-int8",
                             targets=names)
    feed = {"input_ids": np.random.default_rng(0).integers(0, 1000, (4, 32)), "attention_mask": np.ones((4, 32), np.int64)}
    with runner:
        out = runner.infer(feed)
        assert out["logits"].shape == (4, 2) and out["logits"].dtype == np.float32
        assert runner.last_inference_s > 0
    info = runner.describe()
    assert info["capture_error"] is None, info
    assert info["backend"] == "pytorch-cuda" and info["precision"] == "int8" and info["sparse"] is True
    assert info["kernels"] == {"cusparselt-int8": len(names)} and info["graphs"] == 1
