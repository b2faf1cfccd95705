"""Export stage: ``dense/`` -> ``onnx/dense_fp32.onnx``, ``qat/`` -> ``onnx/sparse_int8_qdq.onnx``, checked; the CPU
INT8 artifact ``onnx/sparse_int8_cpu.onnx``; ONNX Runtime's own CPU path for the dense model (the peer:
``onnx/dense_fp32_opt.onnx``, ``onnx/dense_int8_dynamic.onnx``, :mod:`nxm_deploy.export.ort_peer`)."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from nxm_deploy import __version__
from nxm_deploy.fileio import atomic_write_json, sha256_file
from nxm_deploy.config.recipe import Recipe
from nxm_deploy.run.layout import CPU_INT8_ONNX, DENSE_ONNX, SPARSE_ONNX, SPARSITY_REPORT, RunLayout
from nxm_deploy.data import load_task_split, resolve_glue_dir
from nxm_deploy.data.loader import encode_fixed, make_dataloader
from nxm_deploy.errors import ExportError
from nxm_deploy.export.onnx import (
    export_model, file_record, guard_qdq, layer_map_for, model_input_names, onnx_parity,
    save_model,
)
from nxm_deploy.export.int8_weights import store_int8_weights
from nxm_deploy.export.cpu_int8 import compare_logits, make_cpu_int8
from nxm_deploy.export.ort_peer import make_ort_peers
from nxm_deploy.export.parity import INT8_MIN_AGREEMENT, INT8_TIE_MARGIN
from nxm_deploy.export.qdq_lint import sparse_int8_summary, verify_qdq
from nxm_deploy.export.verify import verify_onnx_sparsity, write_sparsity_metadata
from nxm_deploy.quantization import export_mode
from nxm_deploy.quantization.placement import use_eager_attention
from nxm_deploy.run.reader import check_masks, load_masks, load_qat_model, load_stage_model, read_stage_manifest

log = logging.getLogger("nxm_deploy.export")

#: dense parity limit, ORT vs PyTorch on real dev inputs: max |logit difference| (INT8: export/parity.py).
DENSE_PARITY_ATOL = 1e-3
PARITY_EXAMPLES = 256
CPU_INT8_PARITY_ATOL = 1e-3


def export_stage(recipe: Recipe, run_dir: str | Path, glue_dir: str | None = None) -> dict:
    """Export both models of a run, guard the Q/DQ graph, verify n:m per layer, check ORT parity.

    Writes ``onnx/{dense_fp32,sparse_int8_qdq,sparse_int8_cpu}.onnx``, the peers ``onnx/dense_fp32_opt.onnx`` and
    ``onnx/dense_int8_dynamic.onnx``, ``onnx/sparsity_report.json`` and ``onnx/manifest.json``.

    Raises:
        RunDirError: training stages missing, or a file of theirs changed after it was written.
        ExportError: export or Q/DQ guard failed.
        SparsityVerificationError: the saved masks do not hold on the QAT weights, or a layer trained n:m is
            not n:m in the exported graph.
    """
    run_dir = Path(run_dir)
    out = RunLayout(run_dir).onnx_dir
    # every input file as its stage wrote it (read_stage_manifest checks the sha256 its manifest records; qat/ is
    # checked by load_qat_model below)
    read_stage_manifest(run_dir, "dense")
    sparse_manifest = read_stage_manifest(run_dir, "admm")
    targets = sparse_manifest["targets"]
    pattern = recipe.pattern

    dense, tokenizer = load_stage_model(run_dir, "dense")
    qat, _, quant_info = load_qat_model(run_dir)
    check_masks(qat, load_masks(run_dir), pattern)  # the saved masks hold on the weights about to be exported
    for model in (dense, qat):
        use_eager_attention(model)
        model.eval()
    names = model_input_names(tokenizer, dense)

    task = recipe.task.spec()
    dev = load_task_split(task, "dev", resolve_glue_dir(glue_dir or recipe.task.glue_dir), PARITY_EXAMPLES)
    sample = {k: v for k, v in encode_fixed(tokenizer, dev, recipe.task.max_seq_length, 2).items() if k in names}
    sample_t = {k: torch.from_numpy(sample[k][:, :32]) for k in names}
    loader = make_dataloader(tokenizer, dev, batch_size=32, max_seq_length=recipe.task.max_seq_length, shuffle=False,
                             causal_lm=task.is_causal_lm)

    dense_path = export_model(dense, sample_t, out / DENSE_ONNX, opset=recipe.export.opset)
    producer = f"nxm-deploy {__version__}"
    with export_mode(qat):
        sparse_path = export_model(qat, sample_t, out / SPARSE_ONNX, opset=recipe.export.opset)
        exported_bytes = sparse_path.stat().st_size
        sparse_proto = onnx.load(str(sparse_path))
        layer_map = layer_map_for(sparse_proto, qat, targets)  # by float weight contents, before the INT8 rewrite
        # INT8 weights stored as INT8 (dq_only form), coded as the PyTorch twin codes them (parity below)
        int8_store = store_int8_weights(sparse_proto, arithmetic="torch")
        write_sparsity_metadata(sparse_proto, pattern, layer_map, targets, producer)
        save_model(sparse_proto, sparse_path)
        int8_parity = onnx_parity(sparse_path, qat, loader, names, task, tie_margin=INT8_TIE_MARGIN, noise_floor=True)
    dense_parity = onnx_parity(dense_path, dense, loader, names, task)
    embedding_bytes = sum(numpy_helper.to_array(t).nbytes for t in sparse_proto.graph.initializer
                          if "embeddings" in t.name and t.data_type == onnx.TensorProto.FLOAT)
    file_bytes = sparse_path.stat().st_size
    int8_store.update(exported_bytes_qdq_float_weights=exported_bytes, file_bytes=file_bytes,
                      float_embedding_bytes=embedding_bytes,
                      # goal: the file within 1.3x of what INT8 weights plus FP32 embeddings must take
                      bytes_vs_int8_weights_plus_embeddings=round(file_bytes / max(
                          1, int8_store["int8_weight_bytes"] + embedding_bytes), 3))

    qdq = guard_qdq(sparse_proto, expected_quantized=len(quant_info["quantized_modules"]))
    # ExportError naming every node that breaks a TensorRT rule; an n:m layer that is not eligible for sparse INT8
    # kernels (quantizer groups off) is reported, not fatal
    qdq_lint = verify_qdq(sparse_proto, allowed_rules=("sparse-int8",))
    eligibility = sparse_int8_summary(qdq_lint.gemms or [])
    if eligibility["not_eligible"]:
        log.warning("%d of %d n:m layers are not eligible for TensorRT's sparse INT8 kernels (first: %s); "
                    "`nxm-deploy inspect qdq %s` names the missing Q/DQ", len(eligibility["not_eligible"]),
                    eligibility["nm_layers"], eligibility["not_eligible"][0], sparse_path)
    report = verify_onnx_sparsity(sparse_proto, pattern, layer_map=layer_map, expected=set(targets))
    report.path = str(sparse_path)
    report_dict = report.to_dict()
    atomic_write_json(out / SPARSITY_REPORT, report_dict)

    # the same learned scales as an ONNX Runtime CPU artifact (u8 activations, int8 weight codes, integer MatMul)
    cpu_path = out / CPU_INT8_ONNX
    cpu = make_cpu_int8(sparse_proto, cpu_path)
    cpu_layer_map = {c: layer_map[w] for c, w in cpu["weight_codes"].items() if w in layer_map}
    cpu_proto = onnx.load(str(cpu_path))
    write_sparsity_metadata(cpu_proto, pattern, cpu_layer_map, targets, producer)
    save_model(cpu_proto, cpu_path)
    cpu_report = verify_onnx_sparsity(cpu_path, pattern, layer_map=cpu_layer_map, expected=set(targets))
    cpu_parity = compare_logits(sparse_path, cpu_path, sample)
    agree = cpu_parity["argmax_agreement"]
    if (agree is not None and agree < 1.0) or cpu_parity["max_abs_diff"] > CPU_INT8_PARITY_ATOL:
        log.warning("CPU INT8 vs Q/DQ parity outside tolerance: %s", cpu_parity)

    # ONNX Runtime's own best CPU path for the dense model (optimizer + quantize_dynamic): the CPU peer in validation
    peers = make_ort_peers(dense_path, out, dense.config)
    for record in peers.values():
        if "file" in record:
            record["parity_vs_dense"] = compare_logits(dense_path, out / record["file"], sample)

    decisive = int8_parity.get("argmax_agreement_decisive")
    int8_ok = decisive is None or decisive >= INT8_MIN_AGREEMENT
    parity = {
        "inputs": f"first {len(dev)} dev examples", "dense": dense_parity, "int8": int8_parity,
        "dense_atol": DENSE_PARITY_ATOL, "int8_min_agreement": INT8_MIN_AGREEMENT, "int8_tie_margin": int8_parity.get("tie_margin"),
        "ok": dense_parity["max_abs_diff"] <= DENSE_PARITY_ATOL and int8_ok,
    }
    if not parity["ok"]:
        raise ExportError(
            f"ONNX Runtime disagrees with PyTorch: dense max |Δlogit| {dense_parity['max_abs_diff']:.2e} "
            f"(limit {DENSE_PARITY_ATOL}), INT8 argmax agreement {decisive} on the examples that are not ties "
            f"(limit {INT8_MIN_AGREEMENT}; {int8_parity.get('near_ties')} ties within {int8_parity.get('tie_margin'):.3g} "
            f"left out: twice the twin's own FP32-vs-FP64 max |Δlogit|, at least {INT8_TIE_MARGIN}).",
            hint="Check the exporter/opset; the models were written but must not be deployed.",
        )
    manifest = {
        "stage": "export", "recipe_sha256": recipe.sha256(), "nxm_deploy": __version__,
        "torch": torch.__version__, "onnx": onnx.__version__, "opset": recipe.export.opset,
        "exporter": "torch.onnx.export(dynamo=False)", "inputs": names, "outputs": ["logits"],
        "pattern": str(pattern), "dense": file_record(dense_path), "sparse_int8": file_record(sparse_path),
        "int8_weights": int8_store, "qdq": qdq, "qdq_lint": {"ok": qdq_lint.ok, "warnings": len(qdq_lint.warnings), "counts": qdq_lint.counts},
        "sparse_int8_eligibility": eligibility, "quantizer_groups": quant_info.get("quantizer_groups"),
        "cpu_int8": {**file_record(cpu_path), "form": cpu["form"], "converted": cpu["converted"],
                     "activation_quantizers": cpu["activation_quantizers"], "left_float": cpu["left_float"],
                     "layer_map": cpu_layer_map, "sparsity_ok": cpu_report.ok, "parity_vs_qdq": cpu_parity},
        "ort_peers": peers, "layer_map": layer_map, "sparse_modules": targets, "parity": parity,
        "sparsity_check": {
            "ok": report.ok, "layers": len(report.layers),
            "sparse_layers": sum(1 for r in report.layers if r.status == "sparse"),
            "expected_sparse": len(targets),
        },
    }
    peer_paths = [out / r["file"] for r in peers.values() if "file" in r]
    manifest["files"] = {p.name: sha256_file(p) for p in (dense_path, sparse_path, cpu_path, *peer_paths,
                                                           out / SPARSITY_REPORT)}
    atomic_write_json(RunLayout(run_dir).onnx_manifest, manifest)
    log.info("exported %s and %s", dense_path, sparse_path)
    return manifest


def run_export(ctx) -> dict:
    """Stage ``export`` of the chain (:data:`nxm_deploy.stages.STAGES`): :func:`export_stage`."""
    return export_stage(ctx.recipe, ctx.run_dir, ctx.glue_dir)
