"""A synthetic run directory with the export stage's artifacts, made with the project's own code (CPU only).

``make_run`` builds a random BERT classifier, 2:4-prunes every encoder Linear (``nm_project``), adds INT8
fake quantization (``quantize_model_`` + ``calibrate``) and exports, exactly like the export stage does,
``onnx/dense_fp32.onnx`` and ``onnx/sparse_int8_qdq.onnx`` with ``onnx/manifest.json`` (inputs, layer map,
sparse modules, file records), plus the ``recipe.yaml`` / ``dense/config.json`` the engine stage reads for
``auto`` profiles. Used by the CPU engine tests (small shapes) and by the GPU build tests (MiniLM shapes).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

ENCODER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                   "attention.output.dense", "intermediate.dense", "output.dense")


def make_run(run_dir: str | Path, *, hidden: int = 64, layers: int = 1, heads: int = 4, intermediate: int = 256,
             vocab: int = 128, max_seq: int = 32, seed: int = 0, gemm_outputs: bool = True) -> dict:
    """Write the synthetic run into ``run_dir``; returns the export manifest.

    ``gemm_outputs``: INT8 GEMM outputs (the recipe default); False exports the inputs/weights-only graph.
    """
    from transformers import BertConfig, BertForSequenceClassification

    from nxm_deploy.fileio import atomic_write_json
    from nxm_deploy.export.onnx import export_model, file_record, layer_map_for
    from nxm_deploy.run.layout import DENSE_ONNX, SPARSE_ONNX
    from nxm_deploy.quantization import export_mode
    from nxm_deploy.quantization.fake_quant import calibrate, quantize_model_
    from nxm_deploy.quantization.placement import place_quantizers_
    from nxm_deploy.sparsity.mask import nm_project

    import onnx

    run_dir = Path(run_dir)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=max(64, max_seq))
    dense = BertForSequenceClassification(config).eval()
    if hasattr(dense, "set_attn_implementation"):
        dense.set_attn_implementation("eager")
    else:
        dense.config._attn_implementation = "eager"
    targets = [f"bert.encoder.layer.{i}.{name}" for i in range(layers) for name in ENCODER_LINEARS]
    sparse = copy.deepcopy(dense)
    with torch.no_grad():
        for name in targets:
            weight = sparse.get_submodule(name).weight
            weight.copy_(nm_project(weight, "2:4"))
    quantize_model_(sparse, targets, learn_amax=False)
    place_quantizers_(sparse, targets, gemm_outputs=gemm_outputs, attention=True, learn_amax=False)
    gen = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": torch.randint(0, vocab, (4, 16), generator=gen),
                "attention_mask": torch.ones(4, 16, dtype=torch.long),
                "token_type_ids": torch.zeros(4, 16, dtype=torch.long)} for _ in range(2)]

    def loop(model):
        with torch.no_grad():
            for batch in batches:
                model(**batch)

    calibrate(sparse, loop)
    sparse.eval()
    sample = {k: v[:2] for k, v in batches[0].items()}
    out = run_dir / "onnx"
    dense_path = export_model(dense, sample, out / DENSE_ONNX)
    with export_mode(sparse):
        sparse_path = export_model(sparse, sample, out / SPARSE_ONNX)
    layer_map = layer_map_for(onnx.load(str(sparse_path)), sparse, targets)
    manifest = {
        "stage": "export", "inputs": list(sample), "outputs": ["logits"], "pattern": "2:4",
        "dense": file_record(dense_path), "sparse_int8": file_record(sparse_path),
        "layer_map": layer_map, "sparse_modules": targets, "synthetic": True,
    }
    atomic_write_json(out / "manifest.json", manifest)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"name": run_dir.name, "task": {"name": "rte", "max_seq_length": max_seq}}))
    (run_dir / "dense").mkdir(parents=True, exist_ok=True)
    (run_dir / "dense" / "config.json").write_text(config.to_json_string())
    return manifest
