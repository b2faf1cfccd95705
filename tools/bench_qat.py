"""QAT ablation benchmark (GPUSQ-TLM workflow 2, Table 5) on GLUE tasks: sparse FP vs PTQ vs QAT +/- KD vs peers.

Every quantization variant starts from the same 2:4 sparse FP model that ``tools/bench_sparsity.py`` trained
(``<sparsity-work-dir>/<task>/seed<k>/<method>_2of4/sparse``, ``--sparse-method magnitude`` by default), and is
evaluated on the full dev set:

* ``dense``, ``sparse_fp``: the evaluated scores of bench_sparsity's dense and sparse models (their manifests);
* ``ptq``: INT8 fake quantization of the sparse targets (weights per output channel, activations per tensor,
  static), calibrated on the first ``--calib-batches`` train batches (``--calib-method``), no training;
* ``qat_kd``: ``train_qat`` -- the same PTQ init, then QAT (weights + LSQ scales) for ``--qat-epochs`` at
  ``--qat-lr`` with KD from the sparse FP model, alpha/beta/gamma = 1/10/1, T 2, masks re-applied after every step;
* ``qat_no_kd``: the same with the task loss only; ``qat_kd_no_feature``: gamma = 0; ``qat_kd_no_soft``: beta = 0;
* ``ort_dynamic``: ONNX Runtime ``quantize_dynamic`` (INT8 weights per channel, *dynamic* per-batch activation
  scales) of the sparse FP model's FP32 ONNX, run with ORT (a reference with the activation problem removed);
* ``modelopt``: NVIDIA ModelOpt's documented flow as the peer: ``mts.sparsify(model, "sparse_magnitude")`` on the
  same sparse model (mask recomputed by magnitude; compared with the stored mask), ``mtq.quantize(model,
  mtq.INT8_DEFAULT_CFG, forward_loop)`` (max calibration, same batches), then QAT for the same epochs/lr without KD;
  mask violations of the effective (``mts.export``) and the raw weights are counted. Missing ModelOpt: the cell
  fails with the reason (no number).

Diagnostic variants (only when named in ``--variants``; not part of the default table, best with their own
``--out``): ``fp_finetune``: the sparse FP model trained for the same QAT epochs/lr on the task loss, masks
enforced, *without* quantization (the control that separates "more training" from "quantization" in
``qat_no_kd``); ``qat_kd_dense_teacher``: ``qat_kd`` with the dense FP model as KD teacher
(``train.qat.teacher: dense``).

Mask check after QAT (``check_masks``: pruned weights 0, groups within 2:4, INT8 codes of pruned weights 0) is
part of every quantized cell; a violation fails the cell.

Resumable like bench_sparsity: each (task, variant, seed) cell is written atomically to ``<out>_cells/`` with a
fingerprint of its settings and of the sparse model it started from; reruns skip finished cells. Cells whose
sparse model does not exist yet are reported as missing ("waiting on bench_sparsity"), not run.
``--report-only`` rebuilds ``<out>.json``/``<out>.md``; ``--time-budget-min`` stops starting new cells.

``--investigate``: PTQ sensitivity study (which quantizers cause a static-INT8 collapse): PTQ score with all
quantizers, weights only, activations only, each layer type's / layer index's activation quantizers left in FP
or alone quantized, the pooler/classifier quantized too (as ModelOpt's default config does), for max and
percentile calibration; writes ``--investigate-out`` (.json/.md).

Usage:
    .venv/bin/python tools/bench_qat.py --tasks rte --seeds 0 1 2 --threads 1
    .venv/bin/python tools/bench_qat.py --report-only
    .venv/bin/python tools/bench_qat.py --investigate --tasks rte --seeds 0 --threads 1
    .venv/bin/python tools/bench_qat.py --tasks rte --seeds 0 --variants ptq qat_kd --max-train-examples 64 \\
        --max-eval-examples 64 --qat-epochs 0.1 --work-dir /tmp/bq --out /tmp/bq/out
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from nxm_deploy.fileio import atomic_write_json, atomic_write_text, read_json  # noqa: E402  (no torch import)
from nxm_deploy.machine import machine  # noqa: E402


def _load_bench_sparsity():
    """tools/bench_sparsity.py as a module (its pure helpers: scores, mean/std, paths, versions)."""
    name = "bench_sparsity"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "bench_sparsity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_bs = _load_bench_sparsity()
task_score, score_definition, mean_std, fmt_mean_std = _bs.task_score, _bs.score_definition, _bs.mean_std, _bs.fmt_mean_std
out_paths, resolve_glue, command_line, now_utc, canonical_task, _f = (
    _bs.out_paths, _bs.resolve_glue, _bs.command_line, _bs.now_utc, _bs.canonical_task, _bs._f)

log = logging.getLogger("bench_qat")

DEFAULT_TASKS = ("rte", "mrpc", "stsb")
DEFAULT_SEEDS = (0, 1, 2)
SOURCE_VARIANTS = ("dense", "sparse_fp")  # read from bench_sparsity, not trained here
QAT_VARIANTS = ("qat_kd", "qat_no_kd", "qat_kd_no_feature", "qat_kd_no_soft")
VARIANTS = ("dense", "sparse_fp", "ptq", *QAT_VARIANTS, "ort_dynamic", "modelopt")
#: selectable with --variants, never in the default plan (see the module docstring)
DIAGNOSTIC_VARIANTS = ("fp_finetune", "qat_kd_dense_teacher")
ALL_VARIANTS = (*VARIANTS, *DIAGNOSTIC_VARIANTS)
#: variants trained by ``train_qat``
TRAIN_QAT_VARIANTS = (*QAT_VARIANTS, "qat_kd_dense_teacher")
#: keys of the top-level "average" object (always present, None when incomplete)
AVERAGE_KEYS = ("dense", "sparse_fp", "ptq", "qat_no_kd", "qat_kd", "qat_kd_no_feature", "qat_kd_no_soft",
                "modelopt", "ort_dynamic")
VARIANT_LABELS = {
    "dense": "dense FP (bench_sparsity)", "sparse_fp": "2:4 sparse FP (bench_sparsity, QAT teacher)",
    "ptq": "PTQ INT8 (static, no training)", "qat_kd": "QAT + KD (a,b,g = 1,10,1)", "qat_no_kd": "QAT, no KD (task loss)",
    "qat_kd_no_feature": "QAT + KD, gamma = 0 (no feature loss)", "qat_kd_no_soft": "QAT + KD, beta = 0 (no soft loss)",
    "ort_dynamic": "ORT quantize_dynamic per-channel (dynamic act. scales)",
    "modelopt": "ModelOpt sparse_magnitude + INT8_DEFAULT_CFG + QAT (no KD)",
    "fp_finetune": "sparse FP + the QAT budget on the task loss, no quantization (control)",
    "qat_kd_dense_teacher": "QAT + KD (a,b,g = 1,10,1), dense FP teacher",
}
CELL_SCHEMA = 1
DISTILL = {"alpha": 1.0, "beta": 10.0, "gamma": 1.0, "temperature": 2.0}

#: (name, a, b, min_diff): a_avg - b_avg >= min_diff (score points; "beats" = higher by at least 0.01)
TARGETS = (
    ("QAT + KD within 0.5 of sparse FP", "qat_kd", "sparse_fp", -0.5),
    ("QAT + KD within 1.5 of dense", "qat_kd", "dense", -1.5),
    ("QAT + KD beats QAT without KD", "qat_kd", "qat_no_kd", 0.01),
    ("QAT + KD beats the ModelOpt peer", "qat_kd", "modelopt", 0.01),
    ("QAT + KD (static scales) no worse than ORT quantize_dynamic", "qat_kd", "ort_dynamic", 0.0),
)


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (no torch)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    task: str
    variant: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.variant}/seed{self.seed}"

    @property
    def filename(self) -> str:
        return f"{self.task}__{self.variant}__seed{self.seed}.json"


def plan_cells(tasks, variants, seeds) -> list[Cell]:
    """Cells in run order: per task, per seed, variants in :data:`ALL_VARIANTS` order (cheap ones first)."""
    order = [v for v in ALL_VARIANTS if v in variants]
    return [Cell(t, v, int(s)) for t in tasks for s in seeds for v in order]


def parse_variants(names) -> list[str]:
    """Validated variant list; ``dense`` and ``sparse_fp`` are always included (they are the references).

    Raises:
        ValueError: an unknown variant name.
    """
    bad = [n for n in names if n not in ALL_VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(ALL_VARIANTS)}")
    return [v for v in ALL_VARIANTS if v in set(names) | set(SOURCE_VARIANTS)]


def sparse_source(sparsity_work_dir: Path, task: str, seed: int, method: str) -> dict:
    """Paths of the bench_sparsity models of (task, seed): ``dense``, ``sparse`` and whether each is finished."""
    base = Path(sparsity_work_dir) / task / f"seed{seed}"
    dense, sparse = base / "dense_run" / "dense", base / f"{method}_2of4" / "sparse"
    return {"dense": dense, "sparse": sparse, "sparse_run": sparse.parent,
            "dense_ready": (dense / "manifest.json").is_file(),
            "sparse_ready": (sparse / "manifest.json").is_file() and (sparse / "masks.safetensors").is_file()}


def source_fingerprint(run_dir: Path) -> str | None:
    """bench_sparsity's settings fingerprint of a run dir (``bench_fingerprint.json``), or None."""
    path = Path(run_dir) / "bench_fingerprint.json"
    try:
        return read_json(path).get("fingerprint") if path.is_file() else None
    except (OSError, ValueError):
        return None


def cell_settings(settings: dict, variant: str) -> dict:
    """The settings that decide a cell's result (threads excluded)."""
    common = {k: settings.get(k) for k in ("sparse_method", "max_train_examples", "max_eval_examples")}
    if variant in SOURCE_VARIANTS or variant == "ort_dynamic":
        return common
    calib = {k: settings.get(k) for k in ("calib_method", "calib_batches", "percentile")}
    if variant == "ptq":
        return {**common, **calib}
    train = {k: settings.get(k) for k in ("qat_epochs", "qat_lr")}
    if variant == "modelopt":
        return {**common, "calib_batches": settings.get("calib_batches"), **train, "cfg": "INT8_DEFAULT_CFG"}
    if variant == "fp_finetune":
        return {**common, **train, "quantized": False}
    out = {**common, **calib, **train, **variant_distill(variant)}
    if variant == "qat_kd_dense_teacher":
        out["teacher"] = "dense"
    return out


def variant_distill(variant: str) -> dict:
    """``{"distill": bool, "distillation": {...}}`` of a QAT variant."""
    if variant == "qat_no_kd":
        return {"distill": False, "distillation": dict(DISTILL)}
    d = dict(DISTILL)
    if variant == "qat_kd_no_feature":
        d["gamma"] = 0.0
    elif variant == "qat_kd_no_soft":
        d["beta"] = 0.0
    return {"distill": True, "distillation": d}


def cell_fingerprint(settings: dict, variant: str, source_fp: str | None) -> str:
    parts = {"variant": variant, "settings": cell_settings(settings, variant), "source": source_fp}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cell_status(results_dir: Path, cell: Cell, fingerprint: str | None) -> str:
    """``done``, ``mismatch`` (written with other settings or from another sparse model), or ``missing``."""
    path = Path(results_dir) / cell.filename
    if not path.is_file():
        return "missing"
    try:
        rec = read_json(path)
    except (OSError, ValueError):
        return "missing"
    if not isinstance(rec, dict) or "score" not in rec:
        return "missing"
    if fingerprint is None:  # the source model is gone: trust the stored record
        return "done"
    return "done" if rec.get("fingerprint") == fingerprint else "mismatch"


def load_records(results_dir: Path, cells, fps: dict) -> dict:
    out = {}
    for cell in cells:
        if cell_status(results_dir, cell, fps.get(cell.key)) == "done":
            out[cell.key] = read_json(Path(results_dir) / cell.filename)
    return out


def aggregate(records: dict, tasks, seeds, variants) -> dict:
    """Per-task scores/mean/std per variant and averages over tasks (None unless every (task, seed) finished).

    Returns ``{"per_task", "average", "average_detail", "missing"}``; ``average`` always holds every key of
    :data:`AVERAGE_KEYS`.
    """
    per_task, missing_all = {}, []
    for task in tasks:
        per_task[task] = {}
        for variant in variants:
            scores, missing = {}, []
            for seed in seeds:
                key = f"{task}/{variant}/seed{seed}"
                rec = records.get(key)
                scores[str(seed)] = None if rec is None else rec["score"]
                if rec is None:
                    missing.append(key)
            done = [s for s in scores.values() if s is not None]
            per_task[task][variant] = {"scores": scores, **mean_std(done), "complete": not missing, "missing": missing}
            missing_all += missing
    average, detail = {}, {}
    for variant in dict.fromkeys([*AVERAGE_KEYS, *variants]):
        if variant not in variants:
            average[variant] = None
            detail[variant] = {"note": "not in this run's plan", "tasks": {}, "missing": [], "partial_mean": None}
            continue
        task_means = {t: per_task[t][variant]["mean"] for t in tasks if per_task[t][variant]["complete"]}
        missing = [k for t in tasks for k in per_task[t][variant]["missing"]]
        average[variant] = statistics.fmean(task_means.values()) if tasks and not missing else None
        detail[variant] = {"tasks": task_means, "missing": missing,
                           "partial_mean": statistics.fmean(task_means.values()) if task_means else None}
    return {"per_task": per_task, "average": average, "average_detail": detail, "missing": missing_all}


def paired_average(per_task: dict, a: str, b: str) -> tuple[float | None, list[str]]:
    """Mean over the tasks where both variants are complete of (a mean - b mean), and those tasks."""
    tasks = [t for t, row in per_task.items() if row.get(a, {}).get("complete") and row.get(b, {}).get("complete")]
    if not tasks:
        return None, []
    return statistics.fmean(per_task[t][a]["mean"] - per_task[t][b]["mean"] for t in tasks), tasks


def targets_check(agg: dict, records: dict | None = None) -> list[dict]:
    """Targets with PASS / MISS / INCOMPLETE (on full averages) plus the difference over the complete tasks."""
    out = []
    for name, a, b, min_diff in TARGETS:
        av, bv = agg["average"].get(a), agg["average"].get(b)
        if av is None or bv is None:
            diff, result = None, "INCOMPLETE"
        else:
            diff = av - bv
            result = "PASS" if diff >= min_diff - 1e-9 else "MISS"
        pdiff, ptasks = paired_average(agg["per_task"], a, b)
        partial = None if pdiff is None else ("PASS" if pdiff >= min_diff - 1e-9 else "MISS")
        out.append({"target": name, "a": a, "b": b, "a_avg": av, "b_avg": bv, "difference": diff,
                    "required_difference": min_diff, "result": result,
                    "difference_complete_tasks": pdiff, "complete_tasks": ptasks, "result_complete_tasks": partial})
    if records is not None:
        checked = [r for r in records.values() if r.get("mask_violations") is not None]
        bad = [r for r in checked if r["mask_violations"] != 0 and r["cell"]["variant"] != "modelopt"]
        mo = [r for r in checked if r["cell"]["variant"] == "modelopt"]
        out.append({"target": "zero mask violations after QAT, every run (ours)", "a": None, "b": None,
                    "a_avg": None, "b_avg": None, "difference": None, "required_difference": 0,
                    "result": "INCOMPLETE" if not checked else ("MISS" if bad else "PASS"),
                    "runs_checked": len(checked) - len(mo), "runs_with_violations": len(bad),
                    "modelopt_runs_with_violations": sum(1 for r in mo if r["mask_violations"])})
    return out


# -- quantizer groups (investigation) ----------------------------------------------------------------------------
_LAYER_RE = re.compile(r"\.layer\.(\d+)\.")
LAYER_TYPES = ("query", "key", "value", "attn_out", "ffn1", "ffn2")


def layer_type(fqn: str) -> str | None:
    """BERT-style Linear fqn -> ``query|key|value|attn_out|ffn1|ffn2`` (None for anything else)."""
    if fqn.endswith("attention.self.query"):
        return "query"
    if fqn.endswith("attention.self.key"):
        return "key"
    if fqn.endswith("attention.self.value"):
        return "value"
    if fqn.endswith("attention.output.dense"):
        return "attn_out"
    if fqn.endswith("intermediate.dense"):
        return "ffn1"
    if fqn.endswith(".output.dense") and _LAYER_RE.search(fqn):
        return "ffn2"
    return None


def layer_index(fqn: str) -> int | None:
    m = _LAYER_RE.search(fqn)
    return int(m.group(1)) if m else None


def sensitivity_configs(targets: list[str], heads: list[str]) -> list[dict]:
    """The PTQ configurations of the investigation.

    Each: ``name``, ``group`` and ``fp_inputs`` / ``fp_weights`` (module fqns whose input / weight quantizer is
    disabled, i.e. left in FP). Head modules (pooler, classifier) are FP unless the config quantizes them.
    """
    types = {t: [m for m in targets if layer_type(m) == t] for t in LAYER_TYPES}
    idx = sorted({layer_index(m) for m in targets if layer_index(m) is not None})
    heads = list(heads)
    cfgs = [
        {"name": "all quantized (W + A)", "group": "baseline", "fp_inputs": heads, "fp_weights": heads},
        {"name": "weights only (all activations FP)", "group": "baseline", "fp_inputs": targets + heads, "fp_weights": heads},
        {"name": "activations only (all weights FP)", "group": "baseline", "fp_inputs": heads, "fp_weights": targets + heads},
        {"name": "all + pooler/classifier quantized", "group": "baseline", "fp_inputs": [], "fp_weights": []},
    ]
    for t, mods in types.items():
        if mods:
            cfgs.append({"name": f"{t} inputs FP", "group": "type: leave FP", "fp_inputs": mods + heads, "fp_weights": heads})
    for t, mods in types.items():
        if mods:
            others = [m for m in targets if m not in mods]
            cfgs.append({"name": f"only {t} inputs quantized", "group": "type: alone",
                         "fp_inputs": others + heads, "fp_weights": heads})
    for i in idx:
        mods = [m for m in targets if layer_index(m) == i]
        cfgs.append({"name": f"layer {i} inputs FP", "group": "layer: leave FP", "fp_inputs": mods + heads, "fp_weights": heads})
    for i in idx:
        mods = [m for m in targets if layer_index(m) == i]
        others = [m for m in targets if m not in mods]
        cfgs.append({"name": f"only layer {i} inputs quantized", "group": "layer: alone",
                     "fp_inputs": others + heads, "fp_weights": heads})
    ffn2 = types.get("ffn2", [])
    if ffn2:
        cfgs.append({"name": "ffn2 + attn_out inputs FP", "group": "combination",
                     "fp_inputs": ffn2 + types.get("attn_out", []) + heads, "fp_weights": heads})
    return cfgs


# ---------------------------------------------------------------------------------------------------------------
# Cells (torch)
# ---------------------------------------------------------------------------------------------------------------
BASE_RECIPE: dict = {
    "name": "bench_qat",
    "model": {"source": "minilm"},
    "task": {"name": "rte", "max_seq_length": 128},
    "sparsity": {"pattern": "2:4", "include": ["*.layer.*"], "exclude": []},
    "train": {"seed": 0, "batch_size": 32, "eval_batch_size": 64, "weight_decay": 0.01, "warmup_ratio": 0.1,
              "max_grad_norm": 1.0, "precision": "fp32", "distillation": dict(DISTILL)},
}


def build_recipe_dict(settings: dict, task: str, seed: int, variant: str) -> dict:
    r = copy.deepcopy(BASE_RECIPE)
    r["task"]["name"] = task
    for k in ("max_train_examples", "max_eval_examples"):
        if settings.get(k) is not None:
            r["task"][k] = settings[k]
    r["train"]["seed"] = int(seed)
    if settings.get("threads"):
        r["train"]["num_threads"] = settings["threads"]
    qat = {"epochs": settings["qat_epochs"], "learning_rate": settings["qat_lr"],
           "calibration_batches": settings["calib_batches"], "calibration_method": settings["calib_method"],
           "percentile": settings["percentile"], "learn_amax": True, "distill": True}
    if variant in TRAIN_QAT_VARIANTS:
        d = variant_distill(variant)
        qat["distill"] = d["distill"]
        r["train"]["distillation"] = d["distillation"]
    if variant == "qat_kd_dense_teacher":
        qat["teacher"] = "dense"
    r["train"]["qat"] = qat
    return r


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.is_file():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def _setup_threads(settings: dict) -> None:
    import torch

    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])


def _task_data(settings, task, seed, tokenizer, glue_dir):
    from nxm_deploy.config.recipe import recipe_from_dict
    from nxm_deploy.data import TaskData

    recipe = recipe_from_dict(build_recipe_dict(settings, task, seed, "ptq"), "bench_qat data")
    return recipe, TaskData.from_recipe(recipe, tokenizer, glue_dir)


def _calib_batches(data, recipe, count: int) -> list[dict]:
    """The first ``count`` training batches of epoch 0 (the Trainer's order), labels removed."""
    loader = data.train_loader(recipe.train.batch_size, recipe.train.seed)
    return [{k: v for k, v in b.items() if k != "labels"} for _, b in zip(range(count), loader)]


def _forward_loop(loader, batches: int):
    def loop(model):
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            model(**inputs)
    return loop


def run_ptq(settings: dict, task: str, seed: int, src: dict, glue_dir) -> dict:
    """PTQ of the sparse model (our quantizers, static scales); mask/INT8-code check."""
    import torch

    from nxm_deploy.models import load_saved_model
    from nxm_deploy.quantization import calibrate, quantize_model_
    from nxm_deploy.sparsity.pattern import NMPattern
    from nxm_deploy.training.stage import check_masks, load_masks
    from nxm_deploy.training.trainer import evaluate_model

    _setup_threads(settings)
    torch.manual_seed(seed)
    model, tok = load_saved_model(src["sparse"])
    targets = read_json(src["sparse"] / "manifest.json")["targets"]
    recipe, data = _task_data(settings, task, seed, tok, glue_dir)
    quantize_model_(model, targets, learn_amax=False)
    calib = _calib_batches(data, recipe, settings["calib_batches"])
    calibrate(model, _forward_loop(calib, settings["calib_batches"]), settings["calib_method"], settings["percentile"])
    metrics = evaluate_model(model, data, recipe.train)
    masks = load_masks(src["sparse_run"])
    mc = check_masks(model, masks, NMPattern.parse("2:4"))
    return {"metrics": metrics, "mask_check": mc, "mask_violations": 0, "dev_examples": len(data.dev_examples)}


def run_qat(settings: dict, cell: Cell, src: dict, run_dir: Path, glue_dir) -> dict:
    from nxm_deploy.config.recipe import recipe_from_dict
    from nxm_deploy.errors import SparsityVerificationError
    from nxm_deploy.training.stage import train_qat

    _link(run_dir / "sparse", src["sparse"])
    if cell.variant == "qat_kd_dense_teacher":
        _link(run_dir / "dense", src["dense"])
    recipe = recipe_from_dict(build_recipe_dict(settings, cell.task, cell.seed, cell.variant), f"bench_qat {cell.key}")
    try:
        manifest = train_qat(recipe, run_dir, glue_dir)
    except SparsityVerificationError as exc:
        raise RuntimeError(f"mask violations after QAT: {exc}") from exc
    model_file = run_dir / "qat" / "model.safetensors"
    if settings.get("drop_models") and model_file.is_file():
        model_file.unlink()
    ptq_score = task_score(cell.task, manifest["ptq_metrics"])[0]
    return {"metrics": manifest["metrics"], "ptq_metrics": manifest["ptq_metrics"], "ptq_score": ptq_score,
            "mask_check": manifest["mask_check"], "mask_violations": 0 if manifest["mask_check"].get("ok") else None,
            "train": manifest.get("train"), "qat_recipe": build_recipe_dict(settings, cell.task, cell.seed, cell.variant)["train"]}


def run_fp_finetune(settings: dict, cell: Cell, src: dict, glue_dir) -> dict:
    """Control: the sparse FP model trained for the QAT budget (epochs, lr, fp32) on the task loss, masks enforced
    after every step, no quantizer; then the mask check and a dev evaluation."""
    import torch

    from nxm_deploy.config.recipe import recipe_from_dict
    from nxm_deploy.data import TaskData
    from nxm_deploy.models import load_saved_model
    from nxm_deploy.sparsity.pattern import NMPattern
    from nxm_deploy.training.stage import check_masks, load_masks
    from nxm_deploy.training.trainer import MaskedFinetuneCallback, build_trainer, dev_metrics, train_resumable

    recipe = recipe_from_dict(build_recipe_dict(settings, cell.task, cell.seed, cell.variant), f"bench_qat {cell.key}")
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    torch.manual_seed(recipe.train.seed)
    model, tok = load_saved_model(src["sparse"])
    masks = load_masks(src["sparse_run"])
    data = TaskData.from_recipe(recipe, tok, glue_dir)
    with tempfile.TemporaryDirectory(prefix="bench_qat_fp_") as tmp:
        trainer = build_trainer(model, data, recipe.train, output_dir=tmp, epochs=settings["qat_epochs"],
                                learning_rate=settings["qat_lr"], callbacks=[MaskedFinetuneCallback(masks)])
        stats = train_resumable(trainer, f"bench_qat fp_finetune {cell.key}")
        metrics = dev_metrics(trainer)
    mc = check_masks(model, masks, NMPattern.parse("2:4"))
    return {"metrics": metrics, "mask_check": mc, "mask_violations": 0, "train": stats}


def run_ort_dynamic(settings: dict, task: str, seed: int, src: dict, run_dir: Path, glue_dir) -> dict:
    """FP32 ONNX of the sparse model -> ORT quantize_dynamic (per channel, QInt8 weights) -> ORT dev eval."""
    import numpy as np
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from nxm_deploy.data.metrics import compute_metrics
    from nxm_deploy.export.onnx import export_model, model_input_names
    from nxm_deploy.models import load_saved_model
    from nxm_deploy.ort import make_session

    _setup_threads(settings)
    model, tok = load_saved_model(src["sparse"])
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    model.eval()
    _, data = _task_data(settings, task, seed, tok, glue_dir)
    names = model_input_names(tok)
    dev = data.dev_loader(64)
    first = next(iter(dev))
    run_dir.mkdir(parents=True, exist_ok=True)
    fp32, int8 = run_dir / "sparse_fp32.onnx", run_dir / "sparse_dynamic_int8.onnx"
    export_model(model, {n: first[n] for n in names}, fp32)
    quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8)
    sess = make_session(int8, intra_op_threads=settings.get("threads"))
    feed_names = {i.name for i in sess.get_inputs()}
    logits, labels = [], []
    for batch in dev:
        logits.append(sess.run(["logits"], {n: batch[n].numpy() for n in names if n in feed_names})[0])
        labels.append(batch["labels"].numpy())
    metrics = compute_metrics(data.task, np.concatenate(logits), np.concatenate(labels))
    fp32.unlink(missing_ok=True)
    return {"metrics": metrics, "onnx": str(int8), "note": "weights INT8 per channel, activations quantized "
            "dynamically per batch (uint8, scale from each batch's min/max): not static scales"}


def run_modelopt(settings: dict, task: str, seed: int, src: dict, glue_dir) -> dict:
    """ModelOpt's documented path: sparse_magnitude -> INT8_DEFAULT_CFG PTQ -> QAT (task loss), mask audit."""
    import torch

    try:
        import modelopt
        import modelopt.torch.quantization as mtq
        import modelopt.torch.sparsity as mts
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"ModelOpt is not usable here: {type(exc).__name__}: {exc} "
                           "(pip install nvidia-modelopt requests)") from exc
    from nxm_deploy.models import load_saved_model
    from nxm_deploy.training.stage import load_masks
    from nxm_deploy.training.trainer import build_trainer, evaluate_model, train_resumable

    _setup_threads(settings)
    torch.manual_seed(seed)
    model, tok = load_saved_model(src["sparse"])
    recipe, data = _task_data(settings, task, seed, tok, glue_dir)
    masks = {k: v.bool() for k, v in load_masks(src["sparse_run"]).items()}
    calib = _calib_batches(data, recipe, settings["calib_batches"])
    mts.sparsify(model, "sparse_magnitude", config={"data_loader": calib, "collect_func": lambda b: b})
    mo_masks_equal, mo_masked = {}, 0
    for fqn, mask in masks.items():
        mod = model.get_submodule(fqn.rpartition(".")[0])
        mo_mask = getattr(mod, "_weight_mask", None)
        if mo_mask is not None:
            mo_masked += 1
            mo_masks_equal[fqn] = bool(torch.equal(mo_mask.bool(), mask))
    sparse_metrics = evaluate_model(model, data, recipe.train)

    def forward_loop(m):
        for b in calib:
            m(**b)

    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop)
    ptq_metrics = evaluate_model(model, data, recipe.train)
    with tempfile.TemporaryDirectory(prefix="bench_qat_modelopt_") as tmp:
        trainer = build_trainer(model, data, recipe.train, output_dir=tmp, epochs=settings["qat_epochs"],
                                learning_rate=settings["qat_lr"])
        stats = train_resumable(trainer, f"bench_qat modelopt {task} {seed}")
    metrics = evaluate_model(model, data, recipe.train)

    def violations(raw: bool) -> tuple[int, int]:
        """Nonzero pruned weights and 2:4 groups over budget; ``raw``: the stored parameter, else the weight the
        module computes with (ModelOpt's SparseModule multiplies the parameter by its mask in ``weight``)."""
        bad_w, bad_groups = 0, 0
        for fqn, mask in masks.items():
            mod = model.get_submodule(fqn.rpartition(".")[0])
            w = (mod._parameters["weight"] if raw and "weight" in mod._parameters else mod.weight).detach()
            bad_w += int((w[~mask] != 0).sum())
            g = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
            bad_groups += int((g > 2).sum())
        return bad_w, bad_groups

    raw_w, raw_g = violations(raw=True)  # stored parameters (ModelOpt masks them in forward only)
    eff_w, eff_g = violations(raw=False)  # the weight used in forward / exported by mts.export
    return {"metrics": metrics, "ptq_metrics": ptq_metrics, "ptq_score": task_score(task, ptq_metrics)[0],
            "sparse_metrics_after_sparsify": sparse_metrics, "modelopt_version": modelopt.__version__,
            "modelopt_masked_layers": mo_masked, "modelopt_mask_equals_stored": all(mo_masks_equal.values()) if mo_masks_equal else None,
            "modelopt_mask_mismatch_layers": [k for k, v in mo_masks_equal.items() if not v],
            "mask_violations": eff_w, "mask_violations_groups": eff_g,
            "raw_weight_violations": raw_w, "raw_group_violations": raw_g, "train": stats,
            "note": "activations: per-tensor static max calibration (INT8_DEFAULT_CFG); QAT trains weights only "
                    "(amax fixed); pooler and classifier quantized too (ModelOpt default scope)"}


def source_record(cell: Cell, src: dict) -> dict:
    path = (src["dense"] if cell.variant == "dense" else src["sparse"]) / "manifest.json"
    manifest = read_json(path)
    out = {"metrics": manifest["metrics"], "source": str(path.parent)}
    if cell.variant == "sparse_fp":
        out["mask_check"] = manifest.get("mask_check")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Investigation: which quantizers make static INT8 PTQ collapse
# ---------------------------------------------------------------------------------------------------------------
def investigate(settings: dict, task: str, seed: int, model_dir: Path, glue_dir, methods=("max", "percentile")) -> dict:
    import torch

    from nxm_deploy.models import load_saved_model
    from nxm_deploy.quantization import calibrate, quantize_model_, quantized_modules
    from nxm_deploy.training.trainer import evaluate_model

    _setup_threads(settings)
    torch.manual_seed(seed)
    base, tok = load_saved_model(model_dir)
    targets = read_json(Path(model_dir) / "manifest.json").get("targets") or [
        n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and layer_type(n)]
    heads = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n not in targets]
    recipe, data = _task_data(settings, task, seed, tok, glue_dir)
    fp_metrics = evaluate_model(base, data, recipe.train)
    out = {"task": task, "seed": seed, "model_dir": str(model_dir), "fp_score": task_score(task, fp_metrics)[0],
           "fp_metrics": fp_metrics, "heads": heads, "calib_batches": settings["calib_batches"],
           "percentile": settings["percentile"], "methods": {}}
    cfgs = sensitivity_configs(targets, heads)
    # the same batches for every method: the first pass of the shuffled train loader (as run_ptq / train_qat see it)
    calib = _calib_batches(data, recipe, settings["calib_batches"])
    for method in methods:
        model = copy.deepcopy(base)
        quantize_model_(model, targets + heads, learn_amax=False)
        t0 = time.perf_counter()
        calibrate(model, _forward_loop(calib, settings["calib_batches"]), method, settings["percentile"])
        qmods = quantized_modules(model)
        amax = {n: float(m.input_quantizer.amax) for n, m in qmods.items()}
        rows = []
        for cfg in cfgs:
            fpi, fpw = set(cfg["fp_inputs"]), set(cfg["fp_weights"])
            for n, m in qmods.items():
                m.input_quantizer.enabled = n not in fpi
                m.weight_quantizer.enabled = n not in fpw
            metrics = evaluate_model(model, data, recipe.train)
            score = task_score(task, metrics)[0]
            rows.append({"name": cfg["name"], "group": cfg["group"], "score": score, "metrics": metrics})
            log.info("%s %s seed %d | %-55s %.2f", method, task, seed, cfg["name"], score)
        out["methods"][method] = {"rows": rows, "input_amax": amax, "seconds": round(time.perf_counter() - t0, 1)}
    return out


MODELOPT_GROUPS = ("embeddings LayerNorm input", "attention LayerNorm inputs (residual sum)",
                   "FFN LayerNorm inputs (residual sum)", "query inputs", "key inputs", "value inputs",
                   "attn_out inputs", "ffn1 inputs", "ffn2 inputs", "pooler + classifier (W + A)", "encoder Linear weights")


def modelopt_group(name: str) -> str | None:
    """The group of an (enabled) ModelOpt quantizer of a BERT model, by its fqn (None: not grouped)."""
    mod, _, qname = name.rpartition(".")
    if mod.endswith("embeddings.LayerNorm"):
        return "embeddings LayerNorm input"
    if mod.endswith("attention.output.LayerNorm"):
        return "attention LayerNorm inputs (residual sum)"
    if mod.endswith("output.LayerNorm"):
        return "FFN LayerNorm inputs (residual sum)"
    if mod.endswith("pooler.dense") or mod == "classifier" or mod.endswith(".classifier"):
        return "pooler + classifier (W + A)"
    lt = layer_type(mod)
    if lt is None:
        return None
    return "encoder Linear weights" if qname == "weight_quantizer" else f"{lt} inputs"


def investigate_modelopt(settings: dict, task: str, seed: int, model_dir: Path, glue_dir) -> dict:
    """ModelOpt INT8_DEFAULT_CFG PTQ (max, same batches) with each quantizer group disabled / alone."""
    import torch
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer

    from nxm_deploy.models import load_saved_model
    from nxm_deploy.training.trainer import evaluate_model

    _setup_threads(settings)
    torch.manual_seed(seed)
    model, tok = load_saved_model(model_dir)
    recipe, data = _task_data(settings, task, seed, tok, glue_dir)
    calib = _calib_batches(data, recipe, settings["calib_batches"])
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: [m(**b) for b in calib])
    enabled = {n: q for n, q in model.named_modules() if isinstance(q, TensorQuantizer) and q.is_enabled}
    groups = {n: modelopt_group(n) for n in enabled}
    amax = {n: float(q.amax.abs().max()) for n, q in enabled.items() if "input" in n and q.amax is not None}
    cfgs = [("all enabled (INT8_DEFAULT_CFG as is)", "baseline", set())]
    present = [g for g in MODELOPT_GROUPS if g in groups.values()]
    ln = {g for g in present if "LayerNorm" in g}
    cfgs.append(("all LayerNorm inputs FP (Linear quantizers only)", "baseline", ln))
    cfgs.append(("only LayerNorm inputs quantized", "baseline", set(present) - ln))
    cfgs += [(f"{g} FP", "group: leave FP", {g}) for g in present]
    cfgs += [(f"only {g} quantized", "group: alone", set(present) - {g}) for g in present]
    rows = []
    for name, group, off in cfgs:
        for n, q in enabled.items():
            q.disable() if groups[n] in off else q.enable()
        metrics = evaluate_model(model, data, recipe.train)
        score = task_score(task, metrics)[0]
        rows.append({"name": name, "group": group, "score": score, "metrics": metrics})
        log.info("modelopt %s seed %d | %-55s %.2f", task, seed, name, score)
    return {"rows": rows, "input_amax": amax, "enabled_quantizers": len(enabled),
            "enabled_by_group": {g: sum(1 for v in groups.values() if v == g) for g in present},
            "ungrouped": [n for n, g in groups.items() if g is None]}


def render_investigation(runs: list[dict], command: str, env: dict) -> str:
    lines = ["# Static INT8 PTQ sensitivity of the 2:4 sparse MiniLM models: which quantizers cause the collapse", "",
             f"Command: `{command}`  ", f"Date (UTC): {now_utc()}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + "  ",
             f"Machine: {env['machine']['line']}", "",
             "Quantizers: ours (`nxm_deploy.quantization`): INT8 symmetric, weights per output channel (max), "
             "activations per tensor at each Linear input, static scales from the first "
             f"{runs[0]['calib_batches'] if runs else '?'} train batches (batch 32); `max` = max |x|, `percentile` = "
             f"{runs[0]['percentile'] if runs else '?'}th percentile of |x|. Targets: the 36 encoder Linears "
             "(Q, K, V, attn-out, FFN1, FFN2 x 6 layers); pooler and classifier FP unless the row says otherwise. \"X inputs FP\" = the input "
             "(activation) quantizers of X disabled, every weight still INT8. Score = task score 0-100 on the full dev set.", ""]
    for run in runs:
        cmds = list(dict.fromkeys(c for c in (run.get("command"), (run.get("modelopt") or {}).get("command")) if c))
        head = [f"## {run['task']} seed {run['seed']}, {run.get('model', 'sparse')} FP model (FP score {run['fp_score']:.2f})",
                "", f"Model: `{run.get('model_dir') or run.get('sparse_model')}`  ",
                "Produced by: " + ", ".join(f"`{c}`" for c in cmds), ""]
        if not run["methods"]:
            lines += head[:-1] + [""]
            lines += _render_modelopt(run)
            continue
        lines += head + ["### Our quantizers (QuantLinear), max vs percentile calibration", "",
                  "| configuration | group | " + " | ".join(run["methods"]) + " |",
                  "|---|---|" + "---|" * len(run["methods"])]
        names = [r["name"] for r in next(iter(run["methods"].values()))["rows"]]
        for i, name in enumerate(names):
            group = next(iter(run["methods"].values()))["rows"][i]["group"]
            lines.append(f"| {name} | {group} | " + " | ".join(f"{m['rows'][i]['score']:.2f}" for m in run["methods"].values()) + " |")
        lines += ["", "Largest per-tensor input amax (calibrated):", "",
                  "| Linear input | " + " | ".join(f"amax ({m})" for m in run["methods"]) + " |",
                  "|---|" + "---|" * len(run["methods"])]
        first = next(iter(run["methods"].values()))["input_amax"]
        for n in sorted(first, key=first.get, reverse=True)[:10]:
            lines.append(f"| {n} | " + " | ".join(f"{m['input_amax'][n]:.2f}" for m in run["methods"].values()) + " |")
        by_type = {}
        for n, v in first.items():
            by_type.setdefault(layer_type(n) or "head", []).append(v)
        lines += ["", "Max input amax per layer type (" + next(iter(run["methods"])) + "): "
                  + ", ".join(f"{t} {max(v):.1f}" for t, v in by_type.items()), ""]
        lines += _render_modelopt(run)
    lines += ["## Finding", "", "(see the summary written by the benchmark author below, derived from the rows above)", ""]
    return "\n".join(lines) + "\n"


def _render_modelopt(run: dict) -> list[str]:
    lines = []
    mo = run.get("modelopt")
    if mo:
        lines += [f"### ModelOpt INT8_DEFAULT_CFG PTQ ({mo['enabled_quantizers']} enabled quantizers: "
                  + ", ".join(f"{g} {k}" for g, k in mo["enabled_by_group"].items()) + ")", "",
                  "| configuration | group | score |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['group']} | {r['score']:.2f} |" for r in mo["rows"]]
        top = sorted(mo["input_amax"], key=mo["input_amax"].get, reverse=True)[:8]
        lines += ["", "Largest ModelOpt input amax (max calibration): "
                  + ", ".join(f"`{n}` {mo['input_amax'][n]:.1f}" for n in top), ""]
    elif run.get("modelopt_error"):
        lines += [f"ModelOpt investigation: not run ({run['modelopt_error']})", ""]
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def build_report(*, records, plan, tasks, seeds, variants, settings, waiting, failed, stopped, env, command) -> dict:
    agg = aggregate(records, tasks, seeds, variants)
    cells = {}
    for cell in plan:
        rec = records.get(cell.key)
        if rec is not None:
            cells[cell.key] = {k: rec.get(k) for k in (
                "score", "score_note", "metrics", "ptq_score", "mask_violations", "raw_weight_violations",
                "modelopt_mask_equals_stored", "minutes", "note", "finished_utc")}
    return {
        "benchmark": "INT8 QAT ablation on 2:4 sparse models (GPUSQ-TLM workflow 2, Table 5) + peers",
        "date_utc": now_utc(), "command": command,
        "cell_commands": sorted({r.get("command") for r in records.values() if r.get("command")}),
        "versions": env["versions"], "machine": env["machine"], "settings": settings,
        "tasks": list(tasks), "seeds": list(seeds), "variants": list(variants),
        "score_definition": {t: score_definition(t) for t in tasks},
        "average": {k: agg["average"][k] for k in dict.fromkeys([*AVERAGE_KEYS, *variants])},
        "average_detail": agg["average_detail"],
        "targets": [t for t in targets_check(agg, records)
                    if t["a"] is None or (t["a"] in variants and t["b"] in variants)],
        "per_task": agg["per_task"], "cells": cells, "missing": agg["missing"],
        "waiting_on_bench_sparsity": waiting, "failed": failed, "stopped": stopped,
        "complete": not agg["missing"],
    }


def render_markdown(report: dict, notes: str = "") -> str:
    s = report["settings"]
    tasks, seeds, variants = report["tasks"], report["seeds"], report["variants"]
    lines = [
        "# INT8 QAT ablation on 2:4 sparse MiniLM (GPUSQ-TLM workflow 2): PTQ vs QAT +/- KD vs ModelOpt vs ORT dynamic",
        "",
        f"Command (latest sitting): `{report['command']}`  ",
        f"Date (UTC): {report['date_utc']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + "  ",
        f"Machine: {report['machine']['line']}",
        "",
        ("**Partial table**: " + f"{len(report['missing'])} cells missing (listed at the end); averages are given "
         "only for variants with every (task, seed) cell.") if report["missing"] else "Complete table.",
        "",
        f"Protocol: every variant starts from bench_sparsity's `{s['sparse_method']}` 2:4 sparse FP model of the same "
        f"(task, seed) (`{s['sparsity_work_dir']}`). Calibration: `{s['calib_method']}`"
        + (f" ({s['percentile']}th percentile of |x|)" if s["calib_method"] == "percentile" else " (max |x|)")
        + f" over the first {s['calib_batches']} train batches of 32, static per-tensor activation scales, per-channel "
        f"weights; QAT {s['qat_epochs']} epoch(s) at lr {s['qat_lr']} (AdamW, linear warm-up 10 %/decay, fp32, "
        "LSQ-learned scales), masks re-applied after every step. KD teacher = the sparse FP model; "
        f"KD loss alpha*CE + beta*KL_T + gamma*sum MSE(hidden states), T = {DISTILL['temperature']}. "
        "ModelOpt: its own quantizers (INT8_DEFAULT_CFG: max calibration, same batches, also quantizes pooler and "
        "classifier), QAT without KD, same epochs/lr. ORT dynamic: not static (per-batch activation scales).",
        "Score (0-100): " + "; ".join(f"{t}: {d}" for t, d in report["score_definition"].items()) + ".",
        "",
        "## Targets",
        "",
        "| target | a avg | b avg | difference | required | result | on complete tasks (diff, tasks) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        if t["a"] is None:
            lines.append(f"| {t['target']} | - | - | - | 0 | **{t['result']}** | {t['runs_checked']} runs checked, "
                         f"{t['runs_with_violations']} with violations; ModelOpt runs with violations: "
                         f"{t['modelopt_runs_with_violations']} |")
            continue
        comp = ("-" if t["difference_complete_tasks"] is None else
                f"{t['difference_complete_tasks']:+.2f} ({', '.join(t['complete_tasks'])}): {t['result_complete_tasks']}")
        lines.append(f"| {t['target']} | {_f(t['a_avg'])} | {_f(t['b_avg'])} | {_f(t['difference'])} | "
                     f"{t['required_difference']:+.2f} | **{t['result']}** | {comp} |")
    lines += ["", "## Average over tasks", "", "| variant | what | average | complete tasks (mean) | missing cells |",
              "|---|---|---|---|---|"]
    for v, avg in report["average"].items():
        d = report["average_detail"][v]
        if d.get("note"):
            lines.append(f"| {v} | {VARIANT_LABELS.get(v, '')} | - | - | {d['note']} |")
            continue
        lines.append(f"| {v} | {VARIANT_LABELS.get(v, '')} | {_f(avg)} | "
                     + (", ".join(f"{t} {m:.2f}" for t, m in d["tasks"].items()) or "-") + f" | {len(d['missing'])} |")
    lines += ["", "## Per task (score per seed, mean ± sample std over seeds)", ""]
    for task in tasks:
        lines += [f"### {task} ({report['score_definition'][task]})", "",
                  "| variant | " + " | ".join(f"seed {x}" for x in seeds) + " | mean ± std |", "|---|" + "---|" * (len(seeds) + 1)]
        for v in variants:
            row = report["per_task"][task][v]
            lines.append(f"| {v} | " + " | ".join(_f(row["scores"][str(x)], empty="missing") for x in seeds)
                         + f" | {fmt_mean_std(row)} |")
        lines.append("")
    lines += ["## Cells", "", "| cell | score | PTQ init score | mask violations | metrics | minutes | note |",
              "|---|---|---|---|---|---|---|"]
    for key, c in report["cells"].items():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in (c.get("metrics") or {}).items())
        mv = c.get("mask_violations")
        if c.get("raw_weight_violations") is not None:
            mv = f"{mv} (raw params before mts.export: {c['raw_weight_violations']})"
        note = c.get("note") or ""
        if c.get("modelopt_mask_equals_stored") is not None:
            note = f"ModelOpt magnitude mask == stored mask: {c['modelopt_mask_equals_stored']}. " + note
        lines.append(f"| {key} | {_f(c['score'])} | {_f(c.get('ptq_score'))} | {'-' if mv is None else mv} | {metrics} | "
                     f"{_f(c.get('minutes'), 1)} | {note} |")
    lines += ["", f"## Missing cells ({len(report['missing'])})", ""]
    waiting = report.get("waiting_on_bench_sparsity") or {}
    lines += [f"- {k}" + (f" (waiting on bench_sparsity: {waiting[k]})" if k in waiting else
                          f" ({report['failed'][k]})" if k in (report.get("failed") or {}) else
                          " (its sparse model exists: not run yet, time budget)")
              for k in report["missing"]] or ["none: the table is complete"]
    if report.get("failed"):
        lines += ["", "Failed in the latest sitting: " + "; ".join(f"{k}: {v}" for k, v in report["failed"].items())]
    if report.get("stopped"):
        lines += ["", f"Stopped: {report['stopped']}"]
    if len(report.get("cell_commands", [])) > 1:
        lines += ["", "Cells were produced by these commands:", ""] + [f"- `{c}`" for c in report["cell_commands"]]
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="GLUE tasks (default: rte mrpc stsb)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="seeds of the bench_sparsity models (default: 0 1 2)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS),
                   help=f"subset of {' '.join(VARIANTS)} (dense and sparse_fp always); diagnostics, only when named: "
                        f"{' '.join(DIAGNOSTIC_VARIANTS)}")
    p.add_argument("--sparse-method", choices=("magnitude", "admm"), default="magnitude",
                   help="which bench_sparsity 2:4 model is the sparse FP start (default: magnitude)")
    p.add_argument("--sparsity-work-dir", default="runs/bench_sparsity", help="bench_sparsity's --work-dir")
    p.add_argument("--qat-epochs", type=float, default=1.0, help="QAT epochs (default 1)")
    p.add_argument("--qat-lr", type=float, default=1e-5, help="QAT learning rate (default 1e-5, the recipe's)")
    p.add_argument("--calib-method", choices=("max", "percentile"), default="percentile",
                   help="activation calibration (default: percentile, see benchmarks/qat_sensitivity.md)")
    p.add_argument("--calib-batches", type=int, default=16, help="calibration batches of 32 (default 16)")
    p.add_argument("--percentile", type=float, default=99.99, help="percentile of |x| (default 99.99)")
    p.add_argument("--max-train-examples", type=int, default=None, help="first N train examples (smoke runs only)")
    p.add_argument("--max-eval-examples", type=int, default=None, help="first N dev examples (smoke runs only)")
    p.add_argument("--threads", type=int, default=None, help="torch / ORT intra-op threads (default: all cores)")
    p.add_argument("--glue-dir", default=None, help="GLUE TSV root (default: NXM_GLUE_DIR, else ../shared/data/glue)")
    p.add_argument("--work-dir", default="runs/bench_qat", help="run dirs of the cells (default: runs/bench_qat)")
    p.add_argument("--out", default="benchmarks/qat_glue", help="<out>.json, <out>.md, <out>_cells/ (default: benchmarks/qat_glue)")
    p.add_argument("--notes", default=None, help="a markdown file appended to <out>.md (findings)")
    p.add_argument("--keep-models", action="store_true", help="keep qat/model.safetensors of every cell (default: deleted)")
    p.add_argument("--time-budget-min", type=float, default=None, help="stop starting new cells after N minutes")
    p.add_argument("--redo-mismatched", action="store_true", help="rerun cells whose file has other settings")
    p.add_argument("--report-only", action="store_true", help="only rebuild <out>.json/.md from the cell files")
    p.add_argument("--investigate", action="store_true", help="run the PTQ sensitivity study instead of the table")
    p.add_argument("--investigate-model", choices=("sparse", "dense"), default="sparse",
                   help="model of the sensitivity study (default: the sparse FP model; dense: bench_sparsity's dense "
                        "model, for tasks whose sparse model is not there yet)")
    p.add_argument("--investigate-peer-only", action="store_true",
                   help="sensitivity study of ModelOpt's INT8_DEFAULT_CFG only (skip our max/percentile rows)")
    p.add_argument("--investigate-out", default="benchmarks/qat_sensitivity", help="(default: benchmarks/qat_sensitivity)")
    p.add_argument("-v", "--verbose", action="store_true", help="INFO logs of the training stages")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s | %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("nxm_deploy").setLevel(logging.INFO if args.verbose else logging.WARNING)
    started = time.perf_counter()
    from nxm_deploy.errors import NxmError

    try:
        tasks = list(dict.fromkeys(canonical_task(t) for t in args.tasks))
        variants = parse_variants(args.variants)
    except (NxmError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seeds = list(dict.fromkeys(args.seeds))
    glue_dir = resolve_glue(args.glue_dir)
    swd = Path(args.sparsity_work_dir)
    if not swd.is_dir():
        print(f"error: --sparsity-work-dir {swd} does not exist\nhint: run tools/bench_sparsity.py first "
              "(its --work-dir holds the sparse models this benchmark starts from)", file=sys.stderr)
        return 2
    settings = {"sparse_method": args.sparse_method, "sparsity_work_dir": str(swd), "qat_epochs": args.qat_epochs,
                "qat_lr": args.qat_lr, "calib_method": args.calib_method, "calib_batches": args.calib_batches,
                "percentile": args.percentile, "max_train_examples": args.max_train_examples,
                "max_eval_examples": args.max_eval_examples, "threads": args.threads,
                "drop_models": not args.keep_models}
    env = {"versions": _bs.versions(), "machine": machine()}

    if args.investigate:
        runs = []
        for task in tasks:
            for seed in seeds:
                src = sparse_source(swd, task, seed, args.sparse_method)
                kind = args.investigate_model
                if not src[f"{kind}_ready"]:
                    log.warning("%s seed %d: no %s model at %s yet (waiting on bench_sparsity): skipped",
                                task, seed, kind, src[kind])
                    continue
                stem = str(args.investigate_out).removesuffix(".json").removesuffix(".md")
                prev = {}
                if Path(stem + ".json").is_file():
                    prev = {(r["task"], r["seed"], r["calib_batches"], r["percentile"], r.get("model", "sparse")): r
                            for r in read_json(Path(stem + ".json")).get("runs", [])}
                run = prev.get((task, seed, settings["calib_batches"], settings["percentile"], kind))
                if run is not None and (run.get("max_eval_examples") != settings["max_eval_examples"]
                                        or run.get("model", "sparse") != kind):
                    run = None
                if run is None:
                    run = investigate(settings, task, seed, src[kind], glue_dir,
                                      () if args.investigate_peer_only else ("max", "percentile"))
                    run["model"], run["command"] = kind, command_line()
                    run["max_eval_examples"] = settings["max_eval_examples"]
                if "modelopt" not in run:
                    try:
                        run["modelopt"] = {**investigate_modelopt(settings, task, seed, src[kind], glue_dir),
                                           "command": command_line()}
                        run.pop("modelopt_error", None)
                    except ImportError as exc:
                        run["modelopt_error"] = f"{type(exc).__name__}: {exc}"
                runs.append(run)
                others = [r for r in prev.values() if (r["task"], r["seed"], r.get("model", "sparse"))
                          not in {(x["task"], x["seed"], x.get("model", "sparse")) for x in runs}]
                atomic_write_json(Path(stem + ".json"), {"command": command_line(), "date_utc": now_utc(), **env,
                                                         "runs": others + runs})
                md = render_investigation(others + runs, command_line(), env)
                if args.notes and Path(args.notes).is_file():
                    md = md.replace("(see the summary written by the benchmark author below, derived from the rows above)\n",
                                    Path(args.notes).read_text())
                atomic_write_text(Path(stem + ".md"), md)
        if not runs:
            print("error: no sparse model found for any (task, seed)", file=sys.stderr)
            return 2
        print(f"wrote {args.investigate_out}.json/.md ({len(runs)} runs)")
        return 0

    plan = plan_cells(tasks, variants, seeds)
    json_path, md_path, results_dir = out_paths(args.out)
    results_dir.mkdir(parents=True, exist_ok=True)
    srcs, fps, waiting = {}, {}, {}
    for cell in plan:
        src = srcs.setdefault((cell.task, cell.seed), sparse_source(swd, cell.task, cell.seed, args.sparse_method))
        ready = src["dense_ready"] if cell.variant == "dense" else src["sparse_ready"]
        if not ready:
            waiting[cell.key] = f"no {'dense' if cell.variant == 'dense' else args.sparse_method + ' 2:4'} model at " \
                                f"{src['dense'] if cell.variant == 'dense' else src['sparse']} yet"
            fps[cell.key] = None
            continue
        sfp = source_fingerprint(src["dense"].parent if cell.variant == "dense" else src["sparse_run"])
        fps[cell.key] = cell_fingerprint(settings, cell.variant, sfp)
    mismatched = [c.key for c in plan if fps[c.key] and cell_status(results_dir, c, fps[c.key]) == "mismatch"]
    if mismatched and not args.redo_mismatched and not args.report_only:
        print("error: these cell files in " + str(results_dir) + " were written with other settings or from another "
              "sparse model: " + ", ".join(mismatched) + "\nhint: same options as before, another --out, or "
              "--redo-mismatched", file=sys.stderr)
        return 2
    failed: dict[str, str] = {}
    stopped = None
    notes = Path(args.notes).read_text() if args.notes and Path(args.notes).is_file() else ""

    def write_report() -> dict:
        records = load_records(results_dir, plan, fps)
        report = build_report(records=records, plan=plan, tasks=tasks, seeds=seeds, variants=variants,
                              settings={k: v for k, v in settings.items() if k != "drop_models"},
                              waiting={k: v for k, v in waiting.items() if k not in records},
                              failed=failed, stopped=stopped, env=env, command=command_line())
        atomic_write_json(json_path, report)
        atomic_write_text(md_path, render_markdown(report, notes))
        return report

    if not args.report_only:
        todo = [c for c in plan if fps[c.key] is not None
                and (cell_status(results_dir, c, fps[c.key]) == "missing"
                     or (args.redo_mismatched and c.key in mismatched))]
        log.info("%d cells planned, %d to run now, %d waiting on bench_sparsity", len(plan), len(todo), len(waiting))
        done_n = 0
        try:
            for cell in todo:
                if args.time_budget_min is not None and time.perf_counter() - started > args.time_budget_min * 60:
                    stopped = f"time budget of {args.time_budget_min} min reached after {done_n} new cells"
                    log.warning(stopped)
                    break
                src = srcs[(cell.task, cell.seed)]
                run_dir = Path(args.work_dir) / cell.task / f"seed{cell.seed}" / cell.variant
                t0 = time.perf_counter()
                try:
                    if cell.variant in SOURCE_VARIANTS:
                        rec = source_record(cell, src)
                    elif cell.variant == "ptq":
                        rec = run_ptq(settings, cell.task, cell.seed, src, glue_dir)
                    elif cell.variant in TRAIN_QAT_VARIANTS:
                        rec = run_qat(settings, cell, src, run_dir, glue_dir)
                    elif cell.variant == "fp_finetune":
                        rec = run_fp_finetune(settings, cell, src, glue_dir)
                    elif cell.variant == "ort_dynamic":
                        rec = run_ort_dynamic(settings, cell.task, cell.seed, src, run_dir, glue_dir)
                    else:
                        rec = run_modelopt(settings, cell.task, cell.seed, src, glue_dir)
                except Exception as exc:  # noqa: BLE001 - one failed cell must not end a long sitting
                    log.exception("cell %s failed", cell.key)
                    failed[cell.key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    write_report()
                    continue
                score, note = task_score(cell.task, rec["metrics"])
                rec = {"schema": CELL_SCHEMA, "cell": {"task": cell.task, "variant": cell.variant, "seed": cell.seed},
                       "fingerprint": fps[cell.key], "score": score, "score_note": note, **rec,
                       "minutes": round((time.perf_counter() - t0) / 60, 3),
                       "settings": cell_settings(settings, cell.variant), "command": command_line(),
                       "machine": env["machine"]["line"], "finished_utc": now_utc()}
                atomic_write_json(results_dir / cell.filename, rec)
                done_n += 1
                log.info("[%d/%d] %s: score %.2f%s, %.1f min", done_n, len(todo), cell.key, score,
                         f" (PTQ init {rec['ptq_score']:.2f})" if rec.get("ptq_score") is not None else "",
                         rec["minutes"])
                write_report()
        except KeyboardInterrupt:
            stopped = f"interrupted after {done_n} new cells"
    report = write_report()
    print("average over tasks: " + ", ".join(f"{k} {_f(v)}" for k, v in report["average"].items()))
    for t in report["targets"]:
        print(f"target {t['target']}: {t['result']}")
    if failed:
        print("failed cells: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    print(f"wrote {json_path} and {md_path} ({len(plan) - len(report['missing'])}/{len(plan)} cells; "
          f"{len(waiting)} waiting on bench_sparsity)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
