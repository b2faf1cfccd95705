"""TensorRT builds. Skipped, with the reason, where TensorRT or an NVIDIA GPU is absent (all CPU machines here)."""

import json

import pytest
import torch

from nxm_deploy.engine.spec import EngineSpec
from nxm_deploy.engine.trt import tensorrt_unavailable_reason

REASON = tensorrt_unavailable_reason()
pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(REASON is not None, reason=f"needs TensorRT and an NVIDIA GPU: {REASON}"),
]


@pytest.mark.parametrize("sparse_weights", [True, False])
def test_build_records_sparse_flag(tmp_path, sparse_weights):
    from transformers import BertConfig, BertForSequenceClassification

    from nxm_deploy.engine.stage import build_engine
    from nxm_deploy.export.onnx import export_model

    run_dir = tmp_path / "run"
    model = BertForSequenceClassification(BertConfig(vocab_size=128, num_hidden_layers=1, hidden_size=256,
                                                     num_attention_heads=4, intermediate_size=1024)).eval()
    sample = {"input_ids": torch.ones(2, 16, dtype=torch.long), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    export_model(model, sample, run_dir / "onnx" / "m.onnx")
    (run_dir / "onnx" / "manifest.json").write_text(json.dumps({"inputs": list(sample)}))
    spec = EngineSpec(name="t", onnx="m.onnx", precision="fp32", sparse_weights=sparse_weights,
                      batch_size={"min": 1, "opt": 2, "max": 4}, sequence_length={"min": 8, "opt": 16, "max": 32})
    record = build_engine(spec, run_dir)
    assert record["status"] == "built" and record["sparse_weights"] is sparse_weights
    assert (run_dir / "engines" / record["engine"]).stat().st_size > 0
