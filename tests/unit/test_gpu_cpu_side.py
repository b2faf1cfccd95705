"""The CPU-side logic of the GPU path (:mod:`nxm_deploy.gpu`): shape rules, the INT8 numerics (``torch._int_mm`` runs
on CPU too), model conversion, the bench report and the CLI's answer on a machine without a GPU. The cuSPARSELt
kernels themselves are tested on a GPU machine (``tests/gpu``)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch


def test_kernel_shape_rules():
    from nxm_deploy.gpu.kernels import kernel_reason

    assert kernel_reason(1536, 384, "sparse-int8") is None and kernel_reason(384, 1536, "sparse-fp16") is None
    assert "multiple of 32" in kernel_reason(2, 384, "sparse-int8")  # a 2-class classifier stays dense
    assert kernel_reason(48, 64, "sparse-fp16") is None and "multiple of 32x32" in kernel_reason(48, 64, "sparse-int8")
    assert kernel_reason(12, 64, "dense-int8") is not None and kernel_reason(16, 64, "dense-int8") is None
    assert kernel_reason(2, 3, "dense-fp16") is None


def test_is_2of4_along_the_input_axis():
    from nxm_deploy.gpu.kernels import is_2of4
    from nxm_deploy.sparsity import nm_mask

    w = torch.randn(8, 16)
    pruned = w * nm_mask(w, "2:4")
    assert is_2of4(pruned) and not is_2of4(w)
    assert not is_2of4(pruned.t().contiguous())  # 2:4 along the output axis is not what the kernels take


def test_int8_linear_is_the_qdq_math():
    from nxm_deploy.gpu.kernels import Int8Linear, reference_linear
    from nxm_deploy.quantization.fake_quant import int8_codes as quantize

    gen = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(32, 64, generator=gen), torch.randn(32, generator=gen), torch.randn(3, 5, 64, generator=gen)
    s_x, s_w = x.abs().amax() / 127, w.abs().amax(dim=1) / 127
    layer = Int8Linear(w, b, input_scale=s_x, weight_scale=s_w)
    out = layer(x.half())
    assert out.shape == (3, 5, 32) and out.dtype == torch.float16
    ref = reference_linear(w, b, x.half().float().reshape(-1, 64), input_scale=s_x, weight_scale=s_w).reshape(3, 5, 32)
    assert float((out.float() - ref).abs().max()) <= 1e-3 * float(ref.abs().max()) + 1e-3
    # the codes saturate like ONNX QuantizeLinear and round half to even
    assert quantize(torch.tensor([1000.0, -1000.0, 2.5, 3.5]), torch.tensor(1.0)).tolist() == [127, -128, 2, 4]


def test_convert_qat_model_to_dense_int8_keeps_its_predictions(tmp_path):
    """A tiny QAT BERT with INT8 attention and output quantizers, converted to real INT8 GEMMs (``torch._int_mm``)
    with FP16 elsewhere, predicts what its FP32 fake-quant twin predicts."""
    from tiny_models import build_tiny_qdq

    from nxm_deploy.export.parity import INT8_TIE_MARGIN, argmax_agreement_stats
    from nxm_deploy.gpu.kernels import FakeQuant, Int8Linear, convert_model

    model, names = build_tiny_qdq(tmp_path / "tiny.onnx", gemm_outputs=True, attention=True)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (32, 32), generator=gen)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    records = convert_model(model, "dense-int8", names + ["classifier"])
    assert [r.kernel for r in records[:-1]] == ["int_mm"] * len(names)
    assert records[-1].kernel == "dense-fp16" and "multiple of 8" in records[-1].reason
    assert records[0].max_abs_err is not None  # checked once per shape; the others take its settings
    assert isinstance(model.get_submodule(names[0]), Int8Linear)
    attention = model.get_submodule(names[0].rpartition(".")[0])
    assert isinstance(attention.softmax_quantizer, FakeQuant) and attention.softmax_quantizer.scale.dtype == torch.float32
    assert model.get_submodule(names[0]).alpha.dtype == torch.float32  # scales survive model.half()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().numpy()
    stats = argmax_agreement_stats(ref, got, INT8_TIE_MARGIN)
    assert (stats["argmax_agreement_decisive"] or 1.0) >= 0.95
    assert float(np.abs(ref - got).max()) < 0.2


def test_convert_refuses_unknown_variant_and_bad_target():
    from nxm_deploy.errors import ConfigError
    from nxm_deploy.gpu.kernels import convert_model

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ConfigError, match="Unknown GPU variant"):
        convert_model(model, "sparse-int4", ["0"])
    with pytest.raises(ConfigError, match="not a module"):
        convert_model(model, "dense-int8", ["nope"])
    with pytest.raises(ConfigError, match="no learned INT8 scales"):
        convert_model(model, "dense-int8", ["0"])


def test_gpu_slug():
    from nxm_deploy.gpu.bench import gpu_slug

    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_slug("NVIDIA H200") == "h200"
    assert gpu_slug("NVIDIA A100-SXM4-40GB") == "a100"


def _stats(ms):
    return {"p50_ms": ms, "p10_ms": ms, "p90_ms": ms, "samples": 5}


def _synthetic_results(ffn_int8_ratio: float, e2e_ratio: float) -> dict:
    from nxm_deploy.gpu.bench import SHAPE_SETS, _ratios

    gemm = []
    for layer, (n, k) in (("attention HxH", (768, 768)), ("FFN up", (3072, 768)), ("FFN down", (768, 3072))):
        t = {"dense-fp16": 1.0, "sparse-fp16": 0.8, "dense-int8": 0.6, "sparse-int8": 0.6 / ffn_int8_ratio}
        if layer.startswith("attention"):
            t["sparse-int8"] = 0.7  # slower than dense INT8
        row = {"layer": layer, "n": n, "k": k, "m": 4096, "errors": {}}
        for mode in ("eager", "graphed"):
            row[mode] = {v: _stats(x) for v, x in t.items()}
            row[mode + "_speedups"] = _ratios(t)
        gemm.append(row)
    t = {"dense-fp16": 2.0, "sparse-fp16": 1.8, "dense-int8": 1.5, "sparse-int8": 2.0 / e2e_ratio}
    e2e = [{"batch": 32, "seq": 128, "eager": {v: _stats(x) for v, x in t.items()}, "eager_speedups": _ratios(t),
            "graphed": {v: _stats(x) for v, x in t.items()}, "graphed_speedups": _ratios(t),
            "cosine_vs_dense_fp16": {v: 0.999 for v in t}}]
    return {"command": "nxm-deploy bench-gpu --shapes bert-base", "date": "2026-11-27", "method": "m",
            "environment": {"gpu": "NVIDIA H100", "line": "NVIDIA H100 (SM 90), cuSPARSELt 0.8"},
            "sets": {"bert-base": {"dims": SHAPE_SETS["bert-base"], "gemm": gemm, "e2e": e2e,
                                   "conversion": {"sparse-int8": {"kernels": {"cusparselt-int8": 72}}}}}}


def test_bench_report_checks_the_goals_and_names_where_sparse_loses():
    from nxm_deploy.gpu.bench import goal_values, render_markdown, where_sparse_does_not_help

    met = _synthetic_results(ffn_int8_ratio=1.3, e2e_ratio=1.9)
    assert goal_values(met) == {"gemm_ffn_int8": pytest.approx(1.3), "e2e_int8_vs_fp16": pytest.approx(1.9)}
    md = render_markdown(met)
    assert md.count("| met |") == 2 and "nxm-deploy bench-gpu --shapes bert-base" in md and "cuSPARSELt 0.8" in md
    missed = _synthetic_results(ffn_int8_ratio=1.1, e2e_ratio=1.5)
    assert render_markdown(missed).count("**missed**") == 2
    lines = where_sparse_does_not_help(met["sets"]["bert-base"])
    assert lines == ["GEMM attention HxH 768×768, M=4096: 2:4 INT8 at 0.86× dense INT8"]
    assert goal_values({"sets": {}}) == {"gemm_ffn_int8": None, "e2e_int8_vs_fp16": None}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without a GPU")
def test_bench_gpu_without_a_gpu_is_one_line_exit_3(capsys):
    from nxm_deploy.cli.main import main

    assert main(["bench-gpu", "--shapes", "minilm"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: bench-gpu needs an NVIDIA GPU") and "Traceback" not in err
    assert main(["bench-gpu", "--shapes", "bert-huge"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without a GPU")
def test_cuda_runner_refuses_to_activate_without_cuda():
    from nxm_deploy.errors import ValidationError
    from nxm_deploy.runtimes.pytorch import TorchCudaRunner

    runner = TorchCudaRunner(torch.nn.Linear(2, 2), "torch_cuda_sparse_int8", ["input_ids"], variant="sparse-int8",
                             targets=[])
    with pytest.raises(ValidationError, match="needs a CUDA device"):
        runner.activate()


def test_diff_pairs_the_cuda_runners_with_their_onnx_twins():
    from nxm_deploy.validate.diff import default_comparisons

    def r(backend, precision, sparse):
        return types.SimpleNamespace(backend=backend, precision=precision, sparse=sparse)

    runners = {"dense_fp32": r("onnxruntime-cpu", "fp32", False), "sparse_int8": r("onnxruntime-cpu", "int8", True),
               "torch_int8_fakequant": r("pytorch-cpu", "int8", True),
               "torch_cuda_dense_fp16": r("pytorch-cuda", "fp16", False),
               "torch_cuda_sparse_fp16": r("pytorch-cuda", "fp16", True),
               "torch_cuda_sparse_int8": r("pytorch-cuda", "int8", True)}
    pairs = {(c.reference, c.candidate): (c.tolerance, c.gated) for c in default_comparisons(runners)}
    assert pairs[("sparse_int8", "torch_cuda_sparse_int8")] == ("int8", False)
    assert pairs[("dense_fp32", "torch_cuda_dense_fp16")] == ("gpu_float", True)
    assert pairs[("dense_fp32", "torch_cuda_sparse_fp16")] == ("gpu_float", False)
    assert not any(cand == "torch_int8_fakequant" and ref == "sparse_int8" for ref, cand in pairs)


def test_hf_forward_4d_mask_gives_the_2d_mask_logits(tmp_path):
    """The graph-capturable forward passes transformers a 4-D additive mask; it must equal the 2-D mask's result
    (eager INT8 attention of a QAT model, and SDPA of a float model)."""
    from tiny_models import build_tiny_qdq, tiny_classifier

    from nxm_deploy.gpu.graphs import additive_mask, hf_forward

    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 3:] = 0
    qat, _ = build_tiny_qdq(tmp_path / "tiny.onnx", gemm_outputs=True, attention=True)
    float_model = tiny_classifier("bert").eval()
    float_model.set_attn_implementation("sdpa")
    for model in (qat, float_model):
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits
            got = hf_forward(model, "logits", dtype=torch.float32)(input_ids=ids, attention_mask=mask)
        assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    four_d = additive_mask(mask, torch.float16)
    assert four_d.shape == (3, 1, 12, 12) and four_d.dtype == torch.float16
    assert float(four_d[0, 0, 5, 8]) == float(torch.finfo(torch.float16).min) and float(four_d[0, 0, 5, 6]) == 0.0


def test_bucket_feed_pads_to_few_shapes_and_keeps_rows():
    from nxm_deploy.gpu.graphs import bucket_feed

    feed = {"input_ids": np.arange(5 * 37).reshape(5, 37), "attention_mask": np.ones((5, 37), np.int64)}
    padded, rows = bucket_feed(feed)
    assert rows == 5 and padded["input_ids"].shape == (8, 64) and padded["attention_mask"].shape == (8, 64)
    assert (padded["attention_mask"][:, 37:] == 0).all() and (padded["input_ids"][:5, :37] == feed["input_ids"]).all()
    assert (padded["input_ids"][5:, :37] == feed["input_ids"][-1]).all()  # extra rows repeat the last real one
    same, rows = bucket_feed({"input_ids": np.ones((32, 64), np.int64), "attention_mask": np.ones((32, 64), np.int64)})
    assert rows == 32 and same["input_ids"].shape == (32, 64)
    no_mask, _ = bucket_feed({"input_ids": np.ones((3, 37), np.int64)})
    assert no_mask["input_ids"].shape == (4, 37)  # without a mask, padding positions would change the result


def test_predicted_eager_cost_from_the_gemm_table():
    from nxm_deploy.gpu.bench import SHAPE_SETS, predicted_eager_s

    rows = [{"layer": layer, "m": 1024, "call_wall_ms": {"sparse-fp16": ms, "dense-fp16": 0.1}}
            for layer, ms in (("attention HxH", 200.0), ("FFN up", 250.0), ("FFN down", 300.0))]
    assert predicted_eager_s(SHAPE_SETS["bert-base"], rows, "sparse-fp16") == pytest.approx(12 * 1.35)
    assert predicted_eager_s(SHAPE_SETS["bert-base"], rows, "dense-fp16") == pytest.approx(12 * 0.6e-3)
    assert predicted_eager_s(SHAPE_SETS["bert-base"], [], "sparse-fp16") is None
