"""The tiny recipe trained on CUDA end to end (``train.device: cuda``): exact masks, INT8 codes, ONNX parity.

Marked ``gpu``: skipped, with the reason, where ``torch.cuda.is_available()`` is false. Run on a GPU machine with
``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False"),
]


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, tiny_recipe_dict_module, glue_dir):
    from nxm_deploy.cli.main import main

    tmp = tmp_path_factory.mktemp("cuda_run")
    data = json.loads(json.dumps(tiny_recipe_dict_module))
    data["train"].update(device="cuda", precision="auto")
    if os.environ.get("NXM_TINY_MODEL_SOURCE"):  # a machine without the embedded package: MiniLM's config + tokenizer
        data["model"]["source"] = os.environ["NXM_TINY_MODEL_SOURCE"]
    data["engine"] = {"specs": []}
    recipe = tmp / "tiny_cuda.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    rc = main(["-q", "run", str(recipe), "--glue-dir", str(glue_dir), "--runs-root", str(tmp / "runs")])
    return rc, tmp / "runs" / data["name"]


def test_every_stage_trained_on_cuda(cuda_run):
    rc, run = cuda_run
    assert rc == 0
    for sub in ("dense", "sparse", "qat"):
        assert json.loads((run / sub / "manifest.json").read_text())["device"].startswith("cuda"), sub


def test_masks_and_int8_codes_exact_after_cuda_training(cuda_run):
    from nxm_deploy.sparsity import count_nm_violations

    _, run = cuda_run
    masks = load_file(str(run / "sparse" / "masks.safetensors"))
    qat = load_file(str(run / "qat" / "model.safetensors"))
    assert masks
    for fqn, mask in masks.items():
        weight = qat[fqn]
        assert torch.count_nonzero(weight[~mask]) == 0, fqn
        assert count_nm_violations(weight.float().numpy(), "2:4", axis=1)[1] == 0, fqn


def test_onnx_parity_and_verified_sparsity(cuda_run):
    _, run = cuda_run
    manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    assert manifest["parity"]["ok"] is True
    assert manifest["sparsity_check"]["ok"] and manifest["sparsity_check"]["sparse_layers"] == len(
        json.loads((run / "sparse" / "manifest.json").read_text())["targets"])


def test_validate_runs_the_pytorch_cuda_runners(cuda_run):
    """On CUDA, `validate` measures the run's models through PyTorch: dev metric, output diff and latency, with
    the dense FP16 model as the latency baseline of the 2:4 ones."""
    _, run = cuda_run
    validation = json.loads((run / "validation.json").read_text())
    targets = json.loads((run / "sparse" / "manifest.json").read_text())["targets"]
    for name in ("torch_cuda_dense_fp16", "torch_cuda_sparse_fp16", "torch_cuda_sparse_int8"):
        assert name in validation["metrics"], name
        assert validation["runners"][name]["backend"] == "pytorch-cuda"
        assert validation["latency_method"]["baselines"][name] == "torch_cuda_dense_fp16"
    int8 = validation["runners"]["torch_cuda_sparse_int8"]
    assert int8["kernels"] == {"cusparselt-int8": len(targets)}, int8
    assert validation["runners"]["torch_cuda_sparse_fp16"]["kernels"] == {"cusparselt-fp16": len(targets)}
    assert int8["execution"] == "cuda-graphs" and int8["capture_error"] is None and int8["graphs"] >= 1
    rows = [r for r in validation["diff"]["comparisons"] if r["candidate"] == "torch_cuda_sparse_int8"]
    assert rows and rows[0]["reference"] == "sparse_int8"
    print("torch_cuda_sparse_int8 vs sparse_int8:", {k: rows[0].get(k) for k in ("passed", "max_abs_diff")},
          "metrics:", validation["metrics"]["torch_cuda_sparse_int8"], validation["metrics"]["sparse_int8"])
