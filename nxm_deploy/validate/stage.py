"""Validation stage: dev-set metric and A/B latency of the dense FP32 and sparse INT8 ONNX models with ONNX Runtime."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from nxm_deploy._io import atomic_write_json, read_json
from nxm_deploy.client.onnxruntime import OrtRunner
from nxm_deploy.config.recipe import Recipe
from nxm_deploy.data import get_task, load_task_split, make_dataloader, resolve_glue_dir
from nxm_deploy.data.loader import encode_fixed
from nxm_deploy.data.metrics import compute_metrics
from nxm_deploy.errors import RunDirError
from nxm_deploy.export.onnx import DENSE_ONNX, SPARSE_ONNX
from nxm_deploy.models import load_saved_model
from nxm_deploy.validate.latency import measure_ab

log = logging.getLogger("nxm_deploy.validate")

DENSE, SPARSE = "dense_fp32", "sparse_int8"


def machine_line() -> str:
    """One line naming the machine: OS, CPU, cores."""
    return f"{platform.system()} {platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _dev_metric(runner: OrtRunner, loader, task, names) -> tuple[dict, np.ndarray]:
    logits, labels = [], []
    for batch in tqdm(loader, desc=f"dev set {runner.name}", unit="batch", leave=False):
        labels.append(batch["labels"].numpy())
        logits.append(runner.infer({k: batch[k].numpy() for k in names})["logits"])
    logits = np.concatenate(logits)
    return compute_metrics(task, logits, np.concatenate(labels)), logits


def validate_stage(recipe: Recipe, run_dir: str | Path, glue_dir: str | None = None) -> dict:
    """Measure both ONNX models in one process; writes ``validation.json``.

    Raises:
        RunDirError: the export stage has not run.
    """
    import onnxruntime as ort

    run_dir = Path(run_dir)
    onnx_dir = run_dir / "onnx"
    if not (onnx_dir / "manifest.json").is_file():
        raise RunDirError(f"No exported models in {onnx_dir}.", hint=f"Run `nxm-deploy export {run_dir}` first.")
    export_manifest = read_json(onnx_dir / "manifest.json")
    names = export_manifest["inputs"]
    task = get_task(recipe.task.name)
    _, tokenizer = load_saved_model(run_dir / "dense")
    dev = load_task_split(task, "dev", resolve_glue_dir(glue_dir or recipe.task.glue_dir), recipe.task.max_eval_examples)
    loader = make_dataloader(tokenizer, dev, batch_size=32, max_seq_length=recipe.task.max_seq_length, shuffle=False,
                             group_by_length=True)
    vcfg = recipe.validate_
    runners = {
        DENSE: OrtRunner(onnx_dir / DENSE_ONNX, intra_op_threads=vcfg.intra_op_threads, name=DENSE),
        SPARSE: OrtRunner(onnx_dir / SPARSE_ONNX, intra_op_threads=vcfg.intra_op_threads, name=SPARSE),
    }
    for runner in runners.values():
        runner.activate()
    try:
        accuracy, logits = {}, {}
        for name, runner in runners.items():
            accuracy[name], logits[name] = _dev_metric(runner, loader, task, names)
            log.info("%-12s dev %s", name, accuracy[name])
        agreement = float(np.mean(logits[DENSE].argmax(-1) == logits[SPARSE].argmax(-1))) if not task.is_regression else None
        latency = []
        for batch, seq in tqdm(vcfg.latency_shapes, desc="latency A/B", unit="shape"):
            feeds = {k: v for k, v in encode_fixed(tokenizer, dev, seq, batch).items() if k in names}
            stats = measure_ab(runners, feeds, vcfg.warmup_runs, vcfg.timed_runs, baseline=DENSE)
            latency.append({"batch_size": batch, "sequence_length": seq, **stats})
    finally:
        for runner in runners.values():
            runner.deactivate()
    result = {
        "stage": "validate", "recipe_sha256": recipe.sha256(), "task": task.name, "dev_examples": len(dev),
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider", "machine": machine_line(),
        "intra_op_threads": runners[DENSE].intra_op_threads, "metrics": accuracy,
        "prediction_agreement": agreement, "latency": latency,
    }
    atomic_write_json(run_dir / "validation.json", result)
    return result
