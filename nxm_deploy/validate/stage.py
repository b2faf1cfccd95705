"""Validation stage: every model of a run on the same dev set, latency grid and diff inputs, in one process.

Runners: every runtime of :data:`nxm_deploy.runtimes.RUNTIMES` that validates gives its runners on the run (all
Polygraphy runners, each with the label the report shows), in registration order:

* ONNX Runtime CPU: ``dense_fp32``, ``sparse_int8`` (Q/DQ) and, when the export wrote it, ``cpu_int8``
  (``onnx/manifest.json`` key ``cpu_int8``); the peers ``dense_fp32_opt`` and ``dense_int8_dynamic`` (ONNX Runtime's
  optimizer and ``quantize_dynamic`` on the dense model, key ``ort_peers``): scored and timed, never gated, and every
  CPU runner's speedup is also given against each of them (``speedup_vs_dense_fp32_opt``, ...);
* ONNX Runtime CUDA / TensorRT execution providers when ``onnxruntime-gpu`` is installed and a GPU is visible
  (``<model>_cuda``, ``<model>_trtep``);
* TensorRT engines recorded as built in ``engines/status.json`` (``trt_<engine name>``), checked against this
  machine from their manifests before loading;
* PyTorch CUDA when a GPU is visible (``torch_cuda_dense_fp16``, ``torch_cuda_sparse_fp16``,
  ``torch_cuda_sparse_int8``);
* PyTorch on the CPU (``torch_dense_fp32``, ``torch_int8_fakequant``, ``torch_qat_fp32`` and
  ``torch_int8_fakequant_fp64``, :func:`nxm_deploy.runtimes.pytorch.diff_runners`): output diff only.

Steps: task metric on the full dev set per runner (deltas against ``dense_fp32``); output diff with Polygraphy
(:mod:`nxm_deploy.validate.diff`); interleaved latency on the recipe's (batch, seq) grid
(:mod:`nxm_deploy.timing`); CI gates (:mod:`nxm_deploy.validate.gates`). Writes ``validation.json`` and
``diff/``; on a failed gate it also writes the report, then raises.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from nxm_deploy.fileio import atomic_write_json
from nxm_deploy.config.recipe import Recipe
from nxm_deploy.data import load_task_split, make_dataloader, resolve_glue_dir
from nxm_deploy.data.loader import encode_fixed
from nxm_deploy.data.metrics import compute_metrics, lm_nll_sums
from nxm_deploy.errors import ConfigError, ValidationError
from nxm_deploy.run.layout import RunLayout
from nxm_deploy.run.reader import CPU_INT8_MODEL, DENSE_MODEL, SPARSE_MODEL, export_models, read_export_manifest
from nxm_deploy.export.ort_peer import PEERS
from nxm_deploy.validate.diff import DEFAULT_TOLERANCE_FACTOR, make_feeds, run_diff
from nxm_deploy.validate.gates import delta_pt, evaluate_gates, gate_settings, raise_for_gates
from nxm_deploy.machine import machine_line
from nxm_deploy.timing import measure_ab
from nxm_deploy.runtimes import get_runtime
from nxm_deploy.validate.runners import check_io

log = logging.getLogger("nxm_deploy.validate")

DENSE, SPARSE, CPU_INT8 = DENSE_MODEL, SPARSE_MODEL, CPU_INT8_MODEL
#: validate-section settings read with getattr (recipes that predate them get these defaults)
SETTING_DEFAULTS = {"diff_examples": 32, "diff_batch_size": 8, "diff_tolerance_factor": DEFAULT_TOLERANCE_FACTOR,
                    "polygraphy_cli_checks": 1}
MIN_TIMED_RUNS = 20





def settings_of(recipe: Recipe) -> dict:
    vcfg = recipe.validate_
    return {k: getattr(vcfg, k, default) for k, default in SETTING_DEFAULTS.items()}


def make_runners(run_dir: Path, manifest: dict, grid: list[tuple[int, int]], threads: int | None) -> tuple[dict, list[dict]]:
    """Every runtime's runners on the run (inactive), in registration order (:data:`nxm_deploy.runtimes.RUNTIMES`),
    and the ``skipped`` list (name, reason).

    Raises:
        RunDirError: an ONNX model the export manifest names is missing or altered.
        ValidationError: a built engine that cannot run here (another TensorRT / GPU, profile vs grid).
    """
    from nxm_deploy.runtimes import RUNTIMES
    from nxm_deploy.runtimes.base import RuntimeInputs

    inputs = RuntimeInputs(run_dir=run_dir, export_manifest=manifest, onnx_models=export_models(run_dir, manifest),
                           grid=grid, intra_op_threads=threads, input_names=list(manifest["inputs"]),
                           pattern=str(manifest["pattern"]))
    runners, skipped = {}, []
    for runtime in RUNTIMES.values():
        if runtime.validation:
            found, skips = runtime.function("validation_runners")(inputs, runtime)
            runners.update(found)
            skipped += skips
    return runners, skipped


def fit_to_profile(feed: dict[str, np.ndarray], lo: tuple[int, int] | None, hi: tuple[int, int] | None) -> list[tuple[dict, int]]:
    """Split/pad a ``[B, L]`` feed into pieces an engine profile ``lo..hi`` accepts: ``[(feed, rows to keep)]``.

    Sequences shorter than ``lo[1]`` are right-padded with 0 (pad token, attention mask 0); batches larger than
    ``hi[0]`` are split; a piece smaller than ``lo[0]`` is padded by repeating its last row (dropped afterwards).

    Raises:
        ValidationError: sequences longer than the profile allows.
    """
    if lo is None or hi is None:
        return [(feed, int(next(iter(feed.values())).shape[0]))]
    B, L = next(iter(feed.values())).shape
    if L > hi[1]:
        raise ValidationError(f"Inputs of {L} tokens exceed the engine profile's sequence maximum {hi[1]}.",
                              hint="Build the engine with sequence_length max >= the recipe's task.max_seq_length.")
    if L < lo[1]:
        feed = {k: np.pad(v, ((0, 0), (0, lo[1] - L))) for k, v in feed.items()}
    pieces = []
    for start in range(0, B, hi[0]):
        part = {k: v[start:start + hi[0]] for k, v in feed.items()}
        keep = next(iter(part.values())).shape[0]
        if keep < lo[0]:
            part = {k: np.concatenate([v, np.repeat(v[-1:], lo[0] - keep, axis=0)]) for k, v in part.items()}
        pieces.append((part, keep))
    return pieces


def predict(runner, batches: list[dict[str, np.ndarray]], reduce=None) -> np.ndarray:
    """Logits of ``runner`` over ``batches`` (fitted to an engine's profile where the runner has one).

    ``reduce(i, logits)``, when given, turns batch ``i``'s logits into what is kept (a causal LM's ``[B, 2]`` NLL
    sums instead of its ``[B, L, vocab]`` logits)."""
    lo, hi = getattr(runner, "min_shape", None), getattr(runner, "max_shape", None)
    out = []
    for i, feed in enumerate(tqdm(batches, desc=f"dev set {runner.name}", unit="batch", leave=False)):
        parts = [np.asarray(runner.infer(part)["logits"])[:keep] for part, keep in fit_to_profile(feed, lo, hi)]
        logits = np.concatenate(parts)
        if lo is not None and logits.ndim == 3:  # a causal LM's positions padded up to the profile's minimum
            logits = logits[:, :next(iter(feed.values())).shape[1]]
        out.append(logits if reduce is None else reduce(i, logits))
    return np.concatenate(out)


def latency_baselines(runners: dict) -> dict[str, str | None]:
    """Each runner's baseline: the first dense runner of its backend (None when the backend has none)."""
    dense_of: dict[str, str] = {}
    for name, r in runners.items():
        if not r.sparse and r.backend not in dense_of:
            dense_of[r.backend] = name
    return {name: dense_of.get(r.backend) for name, r in runners.items()}


def validate_stage(recipe: Recipe, run_dir: str | Path, glue_dir: str | None = None) -> dict:
    """Validate every model of a run; writes ``validation.json`` (and ``diff/``) and returns its content.

    Raises:
        RunDirError: the export stage has not run, or a file of the run differs from the sha256 its stage
            manifest records. DataError: the task's dev data is missing.
        ValidationError: models with different input names / label counts, an engine for another GPU or
            TensorRT version, a latency grid point outside an engine's profile.
        AccuracyRegressionError / LatencyRegressionError / OutputMismatchError: a gate of the recipe failed
            (``validation.json`` and the report are written first).
    """
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from nxm_deploy.run.reader import verify_finished_stages

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    manifest = read_export_manifest(run_dir)
    verify_finished_stages(run_dir)  # the training artifacts behind the models (tokenizer, PyTorch rows) as written
    names = list(manifest["inputs"])
    task = recipe.task.spec()
    vcfg = recipe.validate_
    settings = settings_of(recipe)
    grid = [(int(b), int(s)) for b, s in vcfg.latency_shapes]
    if vcfg.timed_runs < MIN_TIMED_RUNS:
        log.warning("validate.timed_runs=%d: fewer than %d timed runs give unstable p90/p99", vcfg.timed_runs, MIN_TIMED_RUNS)
    glue_root = resolve_glue_dir(glue_dir or recipe.task.glue_dir)
    dev = load_task_split(task, "dev", glue_root, recipe.task.max_eval_examples)
    dev_total = len(load_task_split(task, "dev", glue_root)) if recipe.task.max_eval_examples else len(dev)
    tokenizer = AutoTokenizer.from_pretrained(str(layout.stage_dir("dense")))
    max_len = recipe.task.max_seq_length
    loader = make_dataloader(tokenizer, dev, batch_size=32, max_seq_length=max_len, shuffle=False, group_by_length=True,
                             causal_lm=task.is_causal_lm)
    batches, batch_labels = [], []
    for batch in loader:
        batch_labels.append(batch["labels"].numpy())
        batches.append({k: batch[k].numpy() for k in names if k in batch})
    labels = np.concatenate(batch_labels)

    def nll_sums(i, batch_logits):  # a causal LM keeps each batch's NLL sums, not its [B, L, vocab] logits
        return lm_nll_sums(batch_logits, batch_labels[i])

    reduce = nll_sums if task.is_causal_lm else None

    runners, skipped = make_runners(run_dir, manifest, grid, vcfg.intra_op_threads)
    probe = {k: v for k, v in encode_fixed(tokenizer, dev, max_len, 1).items() if k in names}
    with contextlib.ExitStack() as stack:
        active = {}
        for name, runner in runners.items():
            try:
                runner.activate()
            except (RuntimeError, ConfigError) as exc:  # ConfigError covers ValidationError
                if not get_runtime(runner.backend).optional:
                    raise
                # a GPU provider or kernel this machine refuses: the rest still runs
                reason = exc.message if isinstance(exc, ConfigError) else \
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                log.error("%s not run: %s", name, reason)
                skipped.append({"name": name, "reason": reason})
                continue
            stack.callback(runner.deactivate)
            check_io(runner, names, task.num_labels, probe)
            active[name] = runner
        for name, runner in active.items():
            if getattr(runner, "max_shape", None) is not None:  # engine: the profile as deserialized
                from nxm_deploy.runtimes.tensorrt import check_grid_in_profile

                check_grid_in_profile(grid, runner.min_shape, runner.max_shape, name)

        # 1. task metric on the full dev set
        accuracy, logits = {}, {}
        for name, runner in active.items():
            logits[name] = predict(runner, batches, reduce)
            accuracy[name] = compute_metrics(task, logits[name], labels)
            log.info("%-24s dev %s", name, accuracy[name])
        agreement = None if task.is_regression or task.is_causal_lm else {
            name: float(np.mean(logits[DENSE].argmax(-1) == value.argmax(-1))) for name, value in logits.items()}

        # 2. output diff (PyTorch joins here only)
        diff_len, diff_batch = max_len, int(settings["diff_batch_size"])
        for runner in active.values():
            if getattr(runner, "max_shape", None) is not None:
                diff_batch = max(min(diff_batch, runner.max_shape[0]), runner.min_shape[0])
                diff_len = min(max(diff_len, runner.min_shape[1]), runner.max_shape[1])
        feeds = make_feeds(tokenizer, dev, names, int(settings["diff_examples"]), diff_batch, diff_len)
        from nxm_deploy.runtimes.pytorch import diff_runners

        torch_runners = diff_runners(run_dir, names, recipe.sparsity.pattern)
        with contextlib.ExitStack() as torch_stack:
            for runner in torch_runners.values():
                runner.activate()
                torch_stack.callback(runner.deactivate)
            diff = run_diff({**torch_runners, **active}, feeds, layout.diff_dir, run_dir,
                            factor=float(settings["diff_tolerance_factor"]),
                            verify_cli=int(settings["polygraphy_cli_checks"]))
        del torch_runners
        for row in diff["comparisons"]:
            if row.get("command"):
                log.info("re-check %s vs %s by hand: %s", row["candidate"], row["reference"], row["command"])

        # 3. latency: every runner interleaved, per grid point
        baselines = latency_baselines(active)
        # every CPU runner's speed also against ONNX Runtime's own best (optimized FP32, quantize_dynamic)
        references = {name: [p for p in PEERS if p in active and p != name] for name, r in active.items()
                      if r.device == "cpu"}
        latency = []
        for batch, seq in tqdm(grid, desc="latency A/B", unit="shape"):
            feed = {k: v for k, v in encode_fixed(tokenizer, dev, seq, batch).items() if k in names}
            stats = measure_ab(active, feed, vcfg.warmup_runs, vcfg.timed_runs, baseline=DENSE, baselines=baselines,
                               references=references)
            latency.append({"batch_size": batch, "sequence_length": seq, **stats})

    primary = task.primary_metric
    described = {name: {**r.describe(), **({"source": str(Path(r.source).relative_to(run_dir))}
                                           if r.source and Path(r.source).is_relative_to(run_dir) else {})}
                 for name, r in {**active}.items()}
    result = {
        "stage": "validate", "recipe_sha256": recipe.sha256(), "task": task.name, "primary_metric": primary,
        "dev_examples": len(dev), "dev_examples_total": dev_total, "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "machine": machine_line(), "intra_op_threads": active[DENSE].intra_op_threads, "baseline": DENSE,
        "runners": described, "skipped": skipped, "metrics": accuracy,
        "metric_deltas_pt": {name: delta_pt(m, accuracy[DENSE], primary) for name, m in accuracy.items()},
        "prediction_agreement": None if agreement is None else agreement.get(SPARSE),
        "agreement_with_dense": agreement,
        "latency_method": {"warmup_runs": vcfg.warmup_runs, "timed_runs": vcfg.timed_runs, "interleaved": True,
                           "percentiles": "numpy linear", "baselines": baselines,
                           "timer": "host wall clock per infer(); GPU runners include their device synchronization"},
        "latency": latency, "diff": diff,
    }
    ours = {name: m for name, m in accuracy.items() if not described.get(name, {}).get("peer")}  # peers: never gated
    result["gates"] = evaluate_gates(gate_settings(vcfg), metrics=ours, baseline=DENSE, primary=primary,
                                     latency=latency, runners=described, diff=diff)
    atomic_write_json(layout.validation, result)
    if not result["gates"]["passed"]:
        from nxm_deploy.validate.report import build_report

        build_report(recipe, run_dir)
        raise_for_gates(result["gates"], report=str(layout.report_md))
    return result


def run_validate(ctx) -> dict:
    """Stage ``validate`` of the chain (:data:`nxm_deploy.stages.STAGES`): :func:`validate_stage`."""
    return validate_stage(ctx.recipe, ctx.run_dir, ctx.glue_dir)
