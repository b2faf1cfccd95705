"""Accuracy benchmark of n:m sparse fine-tuning: dense vs one-shot magnitude (ASP baseline) vs ADMM, on GLUE tasks.

Protocol (the same for every method, only ``train.admm.method`` and ``sparsity.pattern`` differ between sparse cells):

* for each (task, seed): one dense fine-tune (``train_dense``) into ``<work-dir>/<task>/seed<k>/dense_run/dense``;
  it is the ``dense`` result and the shared starting point (and KD teacher) of both sparse methods;
* for each (method, pattern): its own run dir ``<work-dir>/<task>/seed<k>/<method>_<n>of<m>/`` whose ``dense`` is a
  symlink to that dense model, then ``train_admm`` with ``train.admm.method`` = ``admm`` (ADMM for ``--epochs-sparse``
  epochs, hard projection, masked fine-tune for ``--masked-finetune-epochs``) or ``magnitude`` (one-shot magnitude
  mask, masked fine-tune for ``--epochs-sparse + --masked-finetune-epochs`` epochs: the same budget), the same
  learning rate, KD from the dense model on by default for both (``--no-kd``).

Every other training setting comes from a built-in base recipe that mirrors ``recipes/minilm_rte_2of4_int8.yaml``
(batch 32, max_seq_length 128; ADMM: proximal W-step with rho 50, constant, Z/U update once per epoch, U0 = 0 --
chosen by tools/study_admm.py, see benchmarks/admm_study.md; ``--penalty-mode gradient --rho 0.004`` is the authors'
gradient form; KD
alpha 1 / beta 10 / gamma 1 / T 2), or from ``--recipe`` (a YAML recipe whose train/sparsity/model/task sections
are the base; its task name is replaced per cell).

Resumable: each (task, method, pattern, seed) cell is written, atomically, to ``<out>_cells/<cell>.json`` as soon as
it finishes, with a fingerprint of its settings. A rerun with the same settings skips finished cells; a cell file
written with other settings stops the run (``--redo-mismatched`` retrains those cells). ``--time-budget-min`` stops
starting new cells after N minutes. ``<out>.json`` / ``<out>.md`` are rewritten after every cell and list the cells
still missing; ``--report-only`` rebuilds them from the cell files without training.

Score (0-100): STS-B mean of Pearson and Spearman, MRPC mean of F1 and accuracy, other tasks the primary metric,
times 100 (an undefined correlation of a constant predictor counts as 0 and is flagged). Averages over tasks are
reported only when every (task, seed) cell of that variant finished. Targets (printed as PASS/MISS/INCOMPLETE):
2:4: ADMM avg >= magnitude avg + 0.5 and ADMM avg >= dense avg - 0.5; 1:4: ADMM avg >= magnitude avg + 1.5.

Also measured (once, stored in ``<out>_cells/step_cost.json``): the cost of an ADMM W-step (task loss + rho/2
||W - Z + U||^2 via ``ADMMSparsifier`` on the real model and real batches) against a plain fine-tuning step,
interleaved in the same process; target ratio <= 1.05.

Usage:
    .venv/bin/python tools/bench_sparsity.py                      # full table (long: run it in several sittings)
    .venv/bin/python tools/bench_sparsity.py --time-budget-min 120
    .venv/bin/python tools/bench_sparsity.py --report-only
    .venv/bin/python tools/bench_sparsity.py --tasks rte --patterns 2:4 --seeds 0 --max-train-examples 64 \\
        --epochs-dense 0.25 --epochs-sparse 0.25 --masked-finetune-epochs 0 --work-dir /tmp/b --out /tmp/b/out
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from nxm_deploy.fileio import atomic_write_json, atomic_write_text, read_json  # noqa: E402  (no torch import)
from nxm_deploy.machine import machine  # noqa: E402

log = logging.getLogger("bench_sparsity")

DEFAULT_TASKS = ("rte", "mrpc", "stsb")
DEFAULT_PATTERNS = ("2:4", "1:4")
DEFAULT_SEEDS = (0, 1, 2)
METHODS = ("dense", "magnitude", "admm")
SPARSE_METHODS = ("magnitude", "admm")
STANDARD_VARIANTS = ("dense", "magnitude", "admm", "magnitude_1:4", "admm_1:4")
STEP_COST_TARGET = 1.05
STEP_COST_FILE = "step_cost.json"
CELL_SCHEMA = 1

#: Base recipe: the training settings of recipes/minilm_rte_2of4_int8.yaml (kept here so that edits of that file do
#: not silently change the benchmark protocol between sittings). ``--recipe`` replaces it.
BASE_RECIPE: dict = {
    "name": "bench_sparsity",
    "model": {"source": "minilm"},
    "task": {"name": "rte", "max_seq_length": 128},
    "sparsity": {"pattern": "2:4", "include": ["*.layer.*"], "exclude": []},
    "train": {
        "seed": 0,
        "batch_size": 32,
        "eval_batch_size": 64,
        "weight_decay": 0.01,
        "warmup_ratio": 0.1,
        "max_grad_norm": 1.0,
        "precision": "bf16",
        "dense": {"epochs": 3, "learning_rate": 5.0e-5},
        "admm": {
            "method": "admm", "epochs": 3, "learning_rate": 1.0e-4, "rho": 50.0, "rho_factor": 1.0, "rho_max": None,
            "update_interval": "epoch", "u_init": "zero", "masked_finetune_epochs": 1, "distill": True,
            "penalty_mode": "proximal",
        },
        "distillation": {"alpha": 1.0, "beta": 10.0, "gamma": 1.0, "temperature": 2.0},
    },
}

TARGETS = (
    {"name": "2:4 ADMM >= magnitude + 0.5", "a": "admm", "b": "magnitude", "min_diff": 0.5},
    {"name": "2:4 ADMM within 0.5 of dense (ADMM >= dense - 0.5)", "a": "admm", "b": "dense", "min_diff": -0.5},
    {"name": "1:4 ADMM >= magnitude + 1.5", "a": "admm_1:4", "b": "magnitude_1:4", "min_diff": 1.5},
)


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (no torch): cells, scores, aggregation, targets, resumability.
# ---------------------------------------------------------------------------------------------------------------
def canonical_task(name: str) -> str:
    """Registry name of a task (``"STS-B"`` -> ``"stsb"``)."""
    from nxm_deploy.data.tasks import get_task  # no torch

    return get_task(name).name


def variant_name(method: str, pattern: str | None) -> str:
    """Column name of a (method, pattern): ``dense``; 2:4 -> ``magnitude`` / ``admm``; else ``admm_1:4`` etc."""
    if method == "dense":
        return "dense"
    return method if pattern == "2:4" else f"{method}_{pattern}"


def pattern_slug(pattern: str) -> str:
    return pattern.replace(":", "of")


@dataclass(frozen=True)
class Cell:
    """One result of the table: (task, method, pattern, seed); ``pattern`` is None for dense."""

    task: str
    method: str
    pattern: str | None
    seed: int

    @property
    def variant(self) -> str:
        return variant_name(self.method, self.pattern)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.variant}/seed{self.seed}"

    @property
    def filename(self) -> str:
        pat = f"__{pattern_slug(self.pattern)}" if self.pattern else ""
        return f"{self.task}__{self.method}{pat}__seed{self.seed}.json"

    def to_dict(self) -> dict:
        return {"task": self.task, "method": self.method, "pattern": self.pattern, "seed": self.seed,
                "variant": self.variant}


def plan_variants(methods, patterns) -> list[tuple[str, str | None]]:
    """(method, pattern) columns in table order; dense is always there (it is the start of every sparse cell)."""
    out = [("dense", None)]
    for pattern in patterns:
        out += [(m, pattern) for m in SPARSE_METHODS if m in methods]
    return out


def plan_cells(tasks, methods, patterns, seeds) -> list[Cell]:
    """Every cell, in run order: per task, per seed, dense first, then each pattern's magnitude and ADMM."""
    variants = plan_variants(methods, patterns)
    return [Cell(task, m, p, int(seed)) for task in tasks for seed in seeds for m, p in variants]


def task_score(task: str, metrics: dict) -> tuple[float, str | None]:
    """Task score 0-100 and a note (None, or why a NaN metric was counted as 0).

    STS-B: mean of Pearson and Spearman; MRPC: mean of F1 and accuracy; other tasks: the primary metric; x 100.
    """
    from nxm_deploy.data.tasks import get_task

    spec = get_task(task)
    keys = {"stsb": ("pearson", "spearman"), "mrpc": ("f1", "accuracy")}.get(spec.name, (spec.primary_metric,))
    values, undefined = [], []
    for key in keys:
        value = float(metrics[key])
        if math.isnan(value):
            value = 0.0
            undefined.append(key)
        values.append(value)
    note = f"{', '.join(undefined)} undefined (constant predictions), counted as 0" if undefined else None
    return 100.0 * sum(values) / len(values), note


def score_definition(task: str) -> str:
    from nxm_deploy.data.tasks import get_task

    name = get_task(task).name
    return {"stsb": "mean(Pearson, Spearman) x 100", "mrpc": "mean(F1, accuracy) x 100"}.get(
        name, f"{get_task(task).primary_metric} x 100")


def mean_std(values) -> dict:
    """``{"mean", "std", "n"}``; std is the sample standard deviation (ddof=1), None below two values."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def fmt_mean_std(stats: dict, digits: int = 2) -> str:
    if stats.get("mean") is None:
        return "-"
    std = stats.get("std")
    return f"{stats['mean']:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{stats['mean']:.{digits}f} (n=1)"


def aggregate(records: dict[str, dict], tasks, seeds, variants) -> dict:
    """Per-task tables, per-variant averages over tasks, and the missing cells.

    Args:
        records: finished cell records by :attr:`Cell.key`; each holds ``score`` and optionally ``minutes`` and
            ``relative_residual_last``.
        tasks, seeds: the planned tasks and seeds.
        variants: the planned variant names (``dense``, ``admm``, ``magnitude_1:4``, ...).

    Returns:
        dict with ``per_task`` (task -> variant -> scores by seed, mean/std/n, complete, minutes),
        ``average`` (variant -> mean over tasks of the per-task seed means, or None unless every (task, seed)
        cell of the variant finished; the five standard variants are always present), ``average_detail``
        (variant -> tasks used, missing cells, partial mean over complete tasks) and ``missing`` (all keys).
    """
    per_task, missing_all = {}, []
    for task in tasks:
        per_task[task] = {}
        for variant in variants:
            scores, minutes, residuals, missing = {}, {}, {}, []
            for seed in seeds:
                key = f"{task}/{variant}/seed{seed}"
                rec = records.get(key)
                if rec is None:
                    scores[str(seed)] = None
                    missing.append(key)
                    continue
                scores[str(seed)] = rec["score"]
                minutes[str(seed)] = rec.get("minutes")
                if rec.get("relative_residual_last") is not None:
                    residuals[str(seed)] = rec["relative_residual_last"]
            done = [s for s in scores.values() if s is not None]
            mins = [m for m in minutes.values() if m is not None]
            per_task[task][variant] = {
                "scores": scores, **mean_std(done), "complete": not missing, "missing": missing,
                "minutes": minutes, "minutes_mean": statistics.fmean(mins) if mins else None,
                "relative_residual_last": residuals or None,
            }
            missing_all += missing
    average, detail = {}, {}
    for variant in list(dict.fromkeys([*STANDARD_VARIANTS, *variants])):
        if variant not in variants:
            average[variant] = None
            detail[variant] = {"tasks": {}, "missing": [], "note": "not in this run's plan", "partial_mean": None,
                               "partial_tasks": []}
            continue
        task_means = {t: per_task[t][variant]["mean"] for t in tasks if per_task[t][variant]["complete"]}
        missing = [k for t in tasks for k in per_task[t][variant]["missing"]]
        complete = bool(tasks) and not missing
        average[variant] = statistics.fmean(task_means.values()) if complete else None
        detail[variant] = {
            "tasks": task_means, "missing": missing,
            "partial_mean": statistics.fmean(task_means.values()) if task_means else None,
            "partial_tasks": sorted(task_means),
        }
    return {"per_task": per_task, "average": average, "average_detail": detail, "missing": missing_all}


def targets_check(average: dict) -> list[dict]:
    """Each target with its difference and PASS / MISS / INCOMPLETE (an average is missing)."""
    out = []
    for target in TARGETS:
        a, b = average.get(target["a"]), average.get(target["b"])
        if a is None or b is None:
            diff, result = None, "INCOMPLETE"
        else:
            diff = a - b
            result = "PASS" if diff >= target["min_diff"] - 1e-9 else "MISS"
        out.append({"target": target["name"], "a": target["a"], "b": target["b"], "a_avg": a, "b_avg": b,
                    "difference": diff, "required_difference": target["min_diff"], "result": result})
    return out


def cell_status(results_dir: Path, cell: Cell, fingerprint: str) -> str:
    """``done`` (a cell file with this fingerprint), ``mismatch`` (written with other settings) or ``missing``."""
    path = Path(results_dir) / cell.filename
    if not path.is_file():
        return "missing"
    try:
        rec = read_json(path)
    except (OSError, ValueError):
        return "missing"  # unreadable: treated as not finished (cell files are written atomically)
    if not isinstance(rec, dict) or "score" not in rec:
        return "missing"
    return "done" if rec.get("fingerprint") == fingerprint else "mismatch"


def split_cells(results_dir: Path, cells, fingerprints: dict[str, str]) -> dict[str, list[Cell]]:
    """Cells grouped by :func:`cell_status`: ``{"done": [...], "missing": [...], "mismatch": [...]}``."""
    groups = {"done": [], "missing": [], "mismatch": []}
    for cell in cells:
        groups[cell_status(results_dir, cell, fingerprints[cell.key])].append(cell)
    return groups


def cells_to_run(results_dir: Path, plan, fingerprints: dict[str, str], redo_mismatched: bool = False
                 ) -> tuple[list[Cell], list[Cell]]:
    """``(todo, mismatched)``: cells without a finished file, plus (``redo_mismatched``) those written with other
    settings, in plan order. Finished cells (a file with the same fingerprint) are skipped."""
    groups = split_cells(results_dir, plan, fingerprints)
    rerun = {c.key for c in groups["missing"]} | ({c.key for c in groups["mismatch"]} if redo_mismatched else set())
    return [c for c in plan if c.key in rerun], groups["mismatch"]


def planned_steps(cell: Cell, recipe: dict, train_examples: int) -> int:
    """Optimizer steps of a cell (the Trainer: ceil(epochs x batches per epoch) per training phase)."""
    spe = math.ceil(train_examples / recipe["train"].get("batch_size", 32))
    if cell.method == "dense":
        return max(1, math.ceil(recipe["train"]["dense"]["epochs"] * spe))
    admm = recipe["train"]["admm"]
    epochs, mft = float(admm["epochs"]), float(admm.get("masked_finetune_epochs", 1.0))
    if cell.method == "magnitude":
        return max(1, math.ceil((epochs + mft) * spe))
    return max(1, math.ceil(epochs * spe)) + (math.ceil(mft * spe) if mft > 0 else 0)


def load_records(results_dir: Path, cells, fingerprints: dict[str, str]) -> dict[str, dict]:
    """Finished cell records (fingerprint matching) by cell key."""
    out = {}
    for cell in cells:
        if cell_status(results_dir, cell, fingerprints[cell.key]) == "done":
            out[cell.key] = read_json(Path(results_dir) / cell.filename)
    return out


def build_recipe_dict(base: dict, settings: dict, task: str, seed: int, method: str | None = None,
                      pattern: str | None = None) -> dict:
    """The recipe mapping of one cell: ``base`` with the benchmark settings applied (None = keep the base value).

    ``method``/``pattern`` None builds the dense recipe (sparse fields left at the base values).
    """
    r = copy.deepcopy(base)
    r["name"] = "bench_sparsity"
    for key in ("export", "engine", "validate", "description"):
        r.pop(key, None)
    model, tk, train = r.setdefault("model", {}), r.setdefault("task", {}), r.setdefault("train", {})
    dense, admm = train.setdefault("dense", {}), train.setdefault("admm", {})

    def put(section: dict, key: str, value):
        if value is not None:
            section[key] = value

    put(model, "source", settings.get("model"))
    tk["name"] = task
    tk.pop("glue_dir", None)
    put(tk, "max_train_examples", settings.get("max_train_examples"))
    put(tk, "max_eval_examples", settings.get("max_eval_examples"))
    train["seed"] = int(seed)
    if settings.get("bf16") is not None:
        train["precision"] = "bf16" if settings["bf16"] else "fp32"
    put(train, "num_threads", settings.get("threads"))
    put(dense, "epochs", settings.get("epochs_dense"))
    put(dense, "learning_rate", settings.get("lr_dense"))
    if method is not None:
        admm["method"] = method
        r.setdefault("sparsity", {})["pattern"] = pattern
        put(admm, "epochs", settings.get("epochs_sparse"))
        put(admm, "learning_rate", settings.get("lr"))
        put(admm, "rho", settings.get("rho"))
        put(admm, "masked_finetune_epochs", settings.get("masked_finetune_epochs"))
        put(admm, "distill", settings.get("kd"))
        put(admm, "penalty_mode", settings.get("penalty_mode"))
        put(admm, "update_interval", settings.get("update_interval"))
        put(admm, "u_init", settings.get("u_init"))
    return r


#: ``train.admm`` fields that only the ADMM method reads (left out of a magnitude cell's fingerprint).
ADMM_ONLY_FIELDS = ("rho", "rho_factor", "rho_max", "update_interval", "u_init", "penalty_mode")


def fingerprint(recipe: dict, dense: bool) -> str:
    """sha256 of the recipe parts that decide a cell's result (dense: model, task, train without the sparse parts).

    Computed from the raw mapping, not the validated recipe, so that a new library default does not invalidate
    finished cells. ``num_threads`` is excluded (it changes speed, not results).
    """
    train = {k: v for k, v in recipe.get("train", {}).items() if k not in ("qat", "num_threads")}
    if dense:
        train = {k: v for k, v in train.items() if k not in ("admm", "distillation")}
    elif train.get("admm", {}).get("method") == "magnitude":  # the ADMM-only fields do not touch a magnitude cell
        train["admm"] = {k: v for k, v in train["admm"].items() if k not in ADMM_ONLY_FIELDS}
    parts = {"model": recipe.get("model"), "task": recipe.get("task"), "train": train}
    if not dense:
        parts["sparsity"] = recipe.get("sparsity")
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cell_recipes(base: dict, settings: dict, cells) -> tuple[dict[str, dict], dict[str, str]]:
    """Recipe mapping and fingerprint of every cell, by key."""
    recipes, fps = {}, {}
    for cell in cells:
        recipe = build_recipe_dict(base, settings, cell.task, cell.seed,
                                   None if cell.method == "dense" else cell.method, cell.pattern)
        recipes[cell.key] = recipe
        fps[cell.key] = fingerprint(recipe, dense=cell.method == "dense")
    return recipes, fps


# ---------------------------------------------------------------------------------------------------------------
# Environment description
# ---------------------------------------------------------------------------------------------------------------






def versions() -> dict:
    import torch
    import transformers

    import nxm_deploy

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "nxm_deploy": getattr(nxm_deploy, "__version__", None)}


def command_line() -> str:
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return shlex.join(argv)


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------------------
# Training cells
# ---------------------------------------------------------------------------------------------------------------
FINGERPRINT_FILE = "bench_fingerprint.json"


def seed_dir(work_dir: Path, task: str, seed: int) -> Path:
    return work_dir / task / f"seed{seed}"


def dense_run_dir(work_dir: Path, task: str, seed: int) -> Path:
    return seed_dir(work_dir, task, seed) / "dense_run"


def sparse_run_dir(work_dir: Path, cell: Cell) -> Path:
    return seed_dir(work_dir, cell.task, cell.seed) / f"{cell.method}_{pattern_slug(cell.pattern)}"


def _dir_fingerprint(run_dir: Path) -> str | None:
    path = run_dir / FINGERPRINT_FILE
    try:
        return read_json(path).get("fingerprint") if path.is_file() else None
    except (OSError, ValueError):
        return None


def _stage_done(run_dir: Path, stage_subdir: str, fp: str) -> dict | None:
    """The stage manifest when ``run_dir/stage_subdir`` finished with fingerprint ``fp``, else None."""
    manifest = run_dir / stage_subdir / "manifest.json"
    if manifest.is_file() and _dir_fingerprint(run_dir) == fp:
        return read_json(manifest)
    return None


def _link_dense(run_dir: Path, dense_dir: Path) -> str:
    """Make ``run_dir/dense`` point at the shared dense model (relative symlink; copy when links fail)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    link = run_dir / "dense"
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    try:
        link.symlink_to(os.path.relpath(dense_dir, run_dir), target_is_directory=True)
        return "symlink"
    except OSError:
        shutil.copytree(dense_dir, link)
        return "copy"


def _manifest_seconds(stats) -> float:
    return float(stats.get("seconds", 0.0)) if isinstance(stats, dict) else 0.0


class Runner:
    """Runs cells and writes their records."""

    def __init__(self, args, base: dict, settings: dict, recipes: dict, fps: dict, results_dir: Path):
        self.args, self.base, self.settings = args, base, settings
        self.recipes, self.fps, self.results_dir = recipes, fps, results_dir
        self.work_dir = Path(args.work_dir)
        self.glue_dir = args.glue_dir
        self.machine = machine()["line"]
        self.command = command_line()

    def _dense_cell(self, task: str, seed: int) -> Cell:
        return Cell(task, "dense", None, seed)

    def _write(self, cell: Cell, rec: dict) -> dict:
        rec = {"schema": CELL_SCHEMA, "cell": cell.to_dict(), "fingerprint": self.fps[cell.key], **rec,
               "recipe": self.recipes[cell.key], "command": self.command, "machine": self.machine,
               "finished_utc": now_utc()}
        atomic_write_json(self.results_dir / cell.filename, rec)
        return rec

    def ensure_dense(self, task: str, seed: int, rewrite_cell: bool) -> dict:
        """The dense model of (task, seed): reused when its dir holds the same fingerprint, else trained.

        Writes the dense cell when it trains, or when ``rewrite_cell`` (the cell file is missing).
        """
        from nxm_deploy.config.recipe import recipe_from_dict
        from nxm_deploy.training.stage import train_dense

        cell = self._dense_cell(task, seed)
        fp, run_dir = self.fps[cell.key], dense_run_dir(self.work_dir, task, seed)
        manifest = _stage_done(run_dir, "dense", fp)
        if manifest is not None:
            if rewrite_cell:
                score, note = task_score(task, manifest["metrics"])
                self._write(cell, {"score": score, "score_note": note, "metrics": manifest["metrics"],
                                   "minutes": round(_manifest_seconds(manifest) / 60, 3),
                                   "minutes_note": "train loop only (dense dir reused)", "train_steps": manifest.get("steps"),
                                   "run_dir": str(run_dir)})
            return manifest
        if (self.results_dir / cell.filename).is_file() and not rewrite_cell:
            log.warning("dense model of %s seed %d is missing from %s: retraining it (its cell is rewritten)",
                        task, seed, run_dir)
        recipe = recipe_from_dict(self.recipes[cell.key], f"bench {cell.key}")
        (run_dir / FINGERPRINT_FILE).unlink(missing_ok=True)
        t0 = time.perf_counter()
        manifest = train_dense(recipe, run_dir, self.glue_dir)
        minutes = (time.perf_counter() - t0) / 60
        atomic_write_json(run_dir / FINGERPRINT_FILE, {"fingerprint": fp, "recipe": self.recipes[cell.key]})
        score, note = task_score(task, manifest["metrics"])
        self._write(cell, {"score": score, "score_note": note, "metrics": manifest["metrics"],
                           "minutes": round(minutes, 3), "train_steps": manifest.get("steps"),
                           "train_seconds": manifest.get("seconds"), "train_examples": manifest.get("train_examples"),
                           "dev_examples": manifest.get("dev_examples"), "run_dir": str(run_dir)})
        return manifest

    def run_sparse(self, cell: Cell) -> dict:
        from nxm_deploy.config.recipe import recipe_from_dict
        from nxm_deploy.training.stage import train_admm

        dense_dir = dense_run_dir(self.work_dir, cell.task, cell.seed) / "dense"
        fp, run_dir = self.fps[cell.key], sparse_run_dir(self.work_dir, cell)
        manifest, minutes, minutes_note = _stage_done(run_dir, "sparse", fp), None, None
        linked = None
        if manifest is None:
            linked = _link_dense(run_dir, dense_dir)
            (run_dir / FINGERPRINT_FILE).unlink(missing_ok=True)
            recipe = recipe_from_dict(self.recipes[cell.key], f"bench {cell.key}")
            t0 = time.perf_counter()
            manifest = train_admm(recipe, run_dir, self.glue_dir)
            minutes = (time.perf_counter() - t0) / 60
            atomic_write_json(run_dir / FINGERPRINT_FILE, {"fingerprint": fp, "recipe": self.recipes[cell.key]})
        else:
            minutes = (_manifest_seconds(manifest.get("train")) + _manifest_seconds(manifest.get("masked_finetune"))) / 60
            minutes_note = "train loops only (sparse dir reused)"
        history = manifest.get("admm_history") or []
        score, note = task_score(cell.task, manifest["metrics"])
        proj = manifest.get("metrics_after_projection")
        steps = sum(int(s.get("steps", 0)) for s in (manifest.get("train"), manifest.get("masked_finetune"))
                    if isinstance(s, dict))
        return self._write(cell, {
            "score": score, "score_note": note, "metrics": manifest["metrics"],
            "score_after_projection": task_score(cell.task, proj)[0] if proj else None,
            "metrics_after_projection": proj, "epoch_metrics": manifest.get("epoch_metrics"),
            "minutes": round(minutes, 3), "minutes_note": minutes_note, "train_steps": steps,
            "admm_updates": len(history),
            "relative_residual_last": history[-1].get("relative_residual") if history else None,
            "rho_last": history[-1].get("rho") if history else None,
            "mask_check": manifest.get("mask_check"), "dense_link": linked, "run_dir": str(run_dir),
        })


# ---------------------------------------------------------------------------------------------------------------
# ADMM step cost
# ---------------------------------------------------------------------------------------------------------------
def measure_step_cost(recipe_dict: dict, glue_dir: str | None, steps: int, warmup: int = 3) -> dict:
    """Median seconds of plain fine-tuning steps vs ADMM W-steps (loss + penalty), interleaved, same batches.

    Both: forward (bf16 autocast as in training), backward, grad clipping, AdamW step, zero_grad, on two copies of
    the real model (same weights) with their own optimizers; round i uses the same real batch for both and the
    order alternates each round. Also times the Z/U update (``ADMMSparsifier.step``) and reports the ratio
    amortised over the update interval.
    """
    import torch

    from nxm_deploy.config.recipe import recipe_from_dict
    from nxm_deploy.data import get_task, load_task_split, make_dataloader, resolve_glue_dir
    from nxm_deploy.models import load_base_model
    from nxm_deploy.sparsity.admm import ADMMSparsifier
    from nxm_deploy.sparsity.targets import select_targets, target_names
    from nxm_deploy.training.trainer import decay_parameter_names

    recipe = recipe_from_dict(recipe_dict, "bench step cost")
    cfg, acfg = recipe.train, recipe.train.admm
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = get_task(recipe.task.name)
    plain, tokenizer = load_base_model(recipe.model.source, task.num_labels, recipe.model.random_init, cfg.seed)
    admm_model = copy.deepcopy(plain)
    train = load_task_split(task, "train", resolve_glue_dir(glue_dir), recipe.task.max_train_examples)
    loader = make_dataloader(tokenizer, train, batch_size=cfg.batch_size, max_seq_length=recipe.task.max_seq_length,
                             shuffle=True, seed=cfg.seed, group_by_length=True)
    batches = []
    while len(batches) < warmup + steps:
        batches += list(loader)
    batches = batches[: warmup + steps]

    sparsifier = ADMMSparsifier(recipe.pattern, rho=acfg.rho, rho_factor=acfg.rho_factor, rho_max=acfg.rho_max,
                                u_init=acfg.u_init, penalty_mode=acfg.penalty_mode)
    proximal = acfg.penalty_mode == "proximal"
    targets = target_names(select_targets(admm_model, recipe.pattern, recipe.sparsity.include, recipe.sparsity.exclude))
    sparsifier.prepare(admm_model, [{"tensor_fqn": f"{name}.weight"} for name in targets])
    def param_groups(model):  # the Trainer's weight-decay rule (decay_parameter_names), as in training
        decay = set(decay_parameter_names(model))
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in params if n in decay], "weight_decay": cfg.weight_decay},
                {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0}]

    opts = {"plain": torch.optim.AdamW(param_groups(plain), lr=acfg.learning_rate),
            "admm": torch.optim.AdamW(param_groups(admm_model), lr=acfg.learning_rate)}
    bf16 = cfg.precision == "bf16"
    models = {"plain": plain, "admm": admm_model}
    for model in models.values():
        model.train()

    def one_step(kind: str, batch: dict) -> float:
        model, opt = models[kind], opts[kind]
        t0 = time.perf_counter()
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
            if kind == "admm" and not proximal:
                loss = loss + sparsifier.penalty()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if kind == "admm" and proximal:
            sparsifier.proximal_step(acfg.learning_rate)
        return time.perf_counter() - t0

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    times = {"plain": [], "admm": []}
    for i, batch in enumerate(batches):
        order = ("plain", "admm") if i % 2 == 0 else ("admm", "plain")
        for kind in order:
            seconds = one_step(kind, batch)
            if i >= warmup:
                times[kind].append(seconds)
    zu = []
    for _ in range(3):
        t0 = time.perf_counter()
        sparsifier.step()
        zu.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    interval = acfg.update_interval if isinstance(acfg.update_interval, int) else len(loader)
    # headline: median of the per-round ratios (both steps of a round share the batch and the machine's state)
    paired = [a / p for a, p in zip(times["admm"], times["plain"])]
    ratio = statistics.median(paired)
    zu_per_step = statistics.median(zu) / interval
    amortised = statistics.median([(a + zu_per_step) / p for a, p in zip(times["admm"], times["plain"])])
    return {
        "task": task.name, "model": recipe.model.source, "pattern": str(recipe.pattern), "bf16": bf16,
        "batch_size": cfg.batch_size, "max_seq_length": recipe.task.max_seq_length, "targets": len(targets),
        "torch_threads": torch.get_num_threads(), "warmup_rounds": warmup, "timed_rounds": steps,
        "plain_step_s": times["plain"], "admm_step_s": times["admm"],
        "plain_median_s": med["plain"], "admm_median_s": med["admm"], "paired_ratios": paired, "ratio": ratio,
        "ratio_of_medians": med["admm"] / med["plain"],
        "zu_update_s": zu, "zu_update_median_s": statistics.median(zu), "update_interval_steps": interval,
        "ratio_amortised_with_zu": amortised, "target": STEP_COST_TARGET,
        "loadavg_1min_before": load_before, "cpu_count": os.cpu_count(),
        "busy_machine_warning": (load_before is not None and load_before > 0.5 * (os.cpu_count() or 1)),
        "result": "PASS" if ratio <= STEP_COST_TARGET else "MISS",
        "penalty_mode": acfg.penalty_mode,
        "note": ("W-step = task-loss step + ADMMSparsifier.proximal_step(lr)" if proximal else
                 "W-step = task loss + ADMMSparsifier.penalty()") + " vs task loss only; same batch in a round, interleaved, "
                "alternating order; ratio = median over rounds of admm/plain. KD (teacher forward) is excluded "
                "from both sides.",
    }


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def _f(value, digits: int = 2, empty: str = "-") -> str:
    return empty if value is None else f"{value:.{digits}f}"


def build_report(*, records: dict, plan: list[Cell], tasks, seeds, variants, settings: dict, base_source: str,
                 step_cost: dict | None, mismatched: list[str], stopped: str | None, command: str,
                 env: dict, failed: dict | None = None) -> dict:
    agg = aggregate(records, tasks, seeds, variants)
    targets = targets_check(agg["average"])
    cells = {}
    for cell in plan:
        rec = records.get(cell.key)
        if rec is not None:
            cells[cell.key] = {k: rec.get(k) for k in (
                "score", "score_note", "metrics", "score_after_projection", "minutes", "minutes_note", "train_steps",
                "admm_updates", "relative_residual_last", "rho_last", "finished_utc", "command")}
    commands = sorted({r.get("command") for r in records.values() if r.get("command")})
    return {
        "benchmark": "n:m sparse fine-tuning accuracy: dense vs one-shot magnitude (ASP) vs ADMM",
        "date_utc": now_utc(),
        "command": command,
        "cell_commands": commands,
        "versions": env["versions"],
        "machine": env["machine"],
        "bf16": settings.get("bf16"),
        "kd": settings.get("kd"),
        "settings": settings,
        "base_recipe": base_source,
        "tasks": list(tasks), "seeds": list(seeds), "variants": list(variants),
        "score_definition": {t: score_definition(t) for t in tasks},
        "average": agg["average"],
        "average_detail": agg["average_detail"],
        "targets": targets,
        "step_cost": step_cost,
        "per_task": agg["per_task"],
        "cells": cells,
        "missing": agg["missing"],
        "mismatched": mismatched,
        "failed": failed or {},
        "stopped": stopped,
        "complete": not agg["missing"],
    }


def _admm_desc(admm: dict) -> str:
    """``rho 0.004, gradient penalty, Z/U update every epoch, U0 zero`` from the effective ``train.admm``."""
    every = admm.get("update_interval", "epoch")
    return (f"rho {admm.get('rho')}, {admm.get('penalty_mode', 'gradient')} penalty, Z/U update every "
            f"{every if every == 'epoch' else f'{every} steps'}, U0 {admm.get('u_init', 'zero')}"
            + (f", rho x{admm['rho_factor']} per update" if admm.get("rho_factor", 1.0) != 1.0 else ""))


def render_markdown(report: dict) -> str:
    tasks, seeds, variants = report["tasks"], report["seeds"], report["variants"]
    s = report["settings"]
    lines = [
        "# n:m sparse fine-tuning accuracy: dense vs magnitude (ASP) vs ADMM",
        "",
        f"Command (latest sitting): `{report['command']}`  ",
        f"Date (UTC): {report['date_utc']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + "  ",
        f"Machine: {report['machine']['line']}  ",
        f"bf16 autocast: {'yes' if report['bf16'] else 'no'}; KD from the dense model: {'yes' if report['kd'] else 'no'}",
        "",
        f"Protocol: model `{s.get('model')}`, base recipe {report['base_recipe']}; dense {s.get('epochs_dense')} epochs "
        f"at lr {s.get('lr_dense')}; sparse (both methods, from the same dense model): lr {s.get('lr')}, ADMM "
        f"{s.get('epochs_sparse')} epochs ({_admm_desc(s.get('admm') or {})}) + {s.get('masked_finetune_epochs')} masked fine-tune "
        f"epochs, magnitude {s.get('epochs_sparse')} + {s.get('masked_finetune_epochs')} masked fine-tune epochs; "
        f"max train examples {s.get('max_train_examples') or 'all'}.",
        "Score (0-100): " + "; ".join(f"{t}: {d}" for t, d in report["score_definition"].items()) + ".",
        "",
        *([report["notes"].rstrip(), ""] if report.get("notes") else []),
        "## Targets",
        "",
        "| target | ADMM avg | baseline avg | difference | required | result |",
        "|---|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {_f(t['a_avg'])} | {_f(t['b_avg'])} | {_f(t['difference'], 2)} | "
                     f"{t['required_difference']:+.1f} | **{t['result']}** |")
    sc = report.get("step_cost")
    lines.append("")
    if sc:
        lines.append(f"ADMM training step costs <= {STEP_COST_TARGET}x a plain fine-tuning step: "
                     f"W-step median {sc['admm_median_s'] * 1000:.1f} ms vs plain {sc['plain_median_s'] * 1000:.1f} ms "
                     f"-> ratio {sc['ratio']:.3f} (median of per-round ratios; ratio of medians "
                     f"{sc.get('ratio_of_medians', sc['ratio']):.3f}): **{sc['result']}** ({sc['timed_rounds']} interleaved rounds after "
                     f"{sc['warmup_rounds']} warm-up, {sc['task']}, {sc.get('penalty_mode', 'gradient')} W-step, batch {sc['batch_size']}, {sc['targets']} target "
                     f"weights, bf16 {sc['bf16']}); with the Z/U update ({sc['zu_update_median_s'] * 1000:.0f} ms) "
                     f"amortised over {sc['update_interval_steps']} steps: {sc['ratio_amortised_with_zu']:.3f}.")
        if sc.get("busy_machine_warning"):
            lines.append(f"Warning: 1-min load average {sc['loadavg_1min_before']:.2f} on {sc['cpu_count']} CPUs before "
                         "the measurement: other processes were running; rerun with --redo-step-cost on a quiet machine.")
    else:
        lines.append("ADMM step cost: not measured.")
    lines += ["", "## Average over tasks", "",
              "| variant | average | complete tasks | partial mean (complete tasks) | missing cells |", "|---|---|---|---|---|"]
    for variant, avg in report["average"].items():
        d = report["average_detail"][variant]
        if d.get("note"):
            lines.append(f"| {variant} | - | - | - | {d['note']} |")
            continue
        lines.append(f"| {variant} | {_f(avg)} | {', '.join(d['partial_tasks']) or '-'} | {_f(d['partial_mean'])} | "
                     f"{len(d['missing'])} |")
    lines += ["", "## Per task (score per seed, mean ± sample std over seeds, minutes per run)", ""]
    for task in tasks:
        lines += [f"### {task} ({report['score_definition'][task]})", "",
                  "| variant | " + " | ".join(f"seed {x}" for x in seeds) + " | mean ± std | min/run | ADMM last rel. residual |",
                  "|---|" + "---|" * (len(seeds) + 3)]
        for variant in variants:
            row = report["per_task"][task][variant]
            scores = [_f(row["scores"][str(x)], empty="missing") for x in seeds]
            res = row.get("relative_residual_last") or {}
            res_txt = ", ".join(f"{v:.3g}" for v in res.values()) if res else "-"
            lines.append(f"| {variant} | " + " | ".join(scores) + f" | {fmt_mean_std(row)} | "
                         f"{_f(row['minutes_mean'], 1)} | {res_txt} |")
        lines.append("")
    lines += ["## Cells", "", "| cell | score | metrics | before masked fine-tune (after projection / one-shot mask) | minutes | steps | Z/U updates | last rel. residual | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key, c in report["cells"].items():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in (c.get("metrics") or {}).items())
        note = "; ".join(x for x in (c.get("score_note"), c.get("minutes_note")) if x)
        lines.append(f"| {key} | {_f(c['score'])} | {metrics} | {_f(c.get('score_after_projection'))} | "
                     f"{_f(c.get('minutes'), 2)} | {c.get('train_steps') or '-'} | {c.get('admm_updates') if c.get('admm_updates') is not None else '-'} | "
                     f"{_f(c.get('relative_residual_last'), 4)} | {note} |")
    lines += ["", f"## Missing cells ({len(report['missing'])})", ""]
    lines += [f"- {k}" for k in report["missing"]] or ["none: the table is complete"]
    if report.get("mismatched"):
        lines += ["", "Cell files written with other settings (not counted): " + ", ".join(report["mismatched"])]
    if report.get("failed"):
        lines += ["", "Failed in the latest sitting (see its log): "
                  + "; ".join(f"{k}: {v}" for k, v in report["failed"].items())]
    if report.get("stopped"):
        lines += ["", f"Stopped: {report['stopped']}"]
    if len(report.get("cell_commands", [])) > 1:
        lines += ["", "Cells were produced by these commands (same settings fingerprint):", ""]
        lines += [f"- `{c}`" for c in report["cell_commands"]]
    return "\n".join(lines) + "\n"


def summary_lines(report: dict) -> list[str]:
    out = ["average over tasks: " + ", ".join(f"{k} {_f(v)}" for k, v in report["average"].items())]
    for t in report["targets"]:
        diff = "" if t["difference"] is None else f" (difference {t['difference']:+.2f})"
        out.append(f"target {t['target']}: {t['result']}{diff}")
    sc = report.get("step_cost")
    if sc:
        out.append(f"ADMM training step costs <= {STEP_COST_TARGET}x a plain fine-tuning step: ratio {sc['ratio']:.3f} "
                   f"(median of {sc['timed_rounds']} interleaved per-round ratios; step medians "
                   f"{sc['admm_median_s'] * 1000:.1f} ms vs {sc['plain_median_s'] * 1000:.1f} ms): {sc['result']} "
                   f"(amortised with Z/U update: {sc['ratio_amortised_with_zu']:.3f})"
                   + (f" [machine busy: load {sc['loadavg_1min_before']:.2f} before]" if sc.get("busy_machine_warning") else ""))
    out.append(f"missing cells: {len(report['missing'])}" + (f" ({', '.join(report['missing'][:8])}"
                                                              f"{', ...' if len(report['missing']) > 8 else ''})"
                                                              if report["missing"] else ""))
    return out


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="GLUE tasks (default: rte mrpc stsb)")
    p.add_argument("--patterns", nargs="+", default=list(DEFAULT_PATTERNS), help="n:m patterns of the sparse cells (default: 2:4 1:4)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="(default: 0 1 2)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="default: all three; dense is always trained (the start of both sparse methods) and reported")
    p.add_argument("--epochs-dense", type=float, default=None, help="dense fine-tune epochs (base recipe: 3)")
    p.add_argument("--epochs-sparse", type=float, default=None,
                   help="ADMM epochs; magnitude fine-tunes epochs-sparse + masked-finetune-epochs (base: 3)")
    p.add_argument("--masked-finetune-epochs", type=float, default=None, help="after the hard projection (base: 1)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of both sparse methods (base: 1e-4)")
    p.add_argument("--lr-dense", type=float, default=None, help="dense fine-tune learning rate (base: 5e-5)")
    p.add_argument("--rho", type=float, default=None, help="ADMM rho (base: 50 with the proximal W-step; the gradient form used 4e-3)")
    p.add_argument("--penalty-mode", choices=("gradient", "proximal"), default=None,
                   help="ADMM W-step: penalty in the loss (gradient, the authors' code) or exact prox step (proximal)")
    p.add_argument("--update-interval", default=None,
                   help="ADMM Z/U update: 'epoch' or every k steps (base: epoch)")
    p.add_argument("--u-init", choices=("zero", "residual"), default=None, help="ADMM U0 (base: zero)")
    p.add_argument("--kd", action=argparse.BooleanOptionalAction, default=True,
                   help="KD from the dense model for both sparse methods (default: on; --no-kd: task loss only)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast in the dense and sparse training loops (default: on)")
    p.add_argument("--max-train-examples", type=int, default=None, help="first N train examples (smoke runs only)")
    p.add_argument("--max-eval-examples", type=int, default=None, help="first N dev examples (smoke runs only)")
    p.add_argument("--model", default="minilm", help="model.source: 'minilm' (default), a local HF dir or a hub id")
    p.add_argument("--recipe", default=None, help="YAML recipe used as the base instead of the built-in one")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--glue-dir", default=None, help="GLUE TSV root (default: NXM_GLUE_DIR, else ../shared/data/glue)")
    p.add_argument("--work-dir", default="runs/bench_sparsity", help="run dirs of every cell (default: runs/bench_sparsity)")
    p.add_argument("--out", default="benchmarks/sparsity_glue",
                   help="writes <out>.json, <out>.md and one JSON per cell in <out>_cells/ (default: benchmarks/sparsity_glue)")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="stop starting new cells after N minutes (finished cells are kept)")
    p.add_argument("--step-cost-steps", type=int, default=10, help="timed steps per side of the step-cost check (default 10; 0: skip)")
    p.add_argument("--redo-step-cost", action="store_true", help="measure the step cost again even if stored")
    p.add_argument("--redo-mismatched", action="store_true", help="retrain cells whose file has other settings")
    p.add_argument("--report-only", action="store_true", help="only rebuild <out>.json/.md from the cell files")
    p.add_argument("-v", "--verbose", action="store_true", help="INFO logs of the training stages")
    return p.parse_args(argv)


def out_paths(out: str) -> tuple[Path, Path, Path]:
    """``(<out>.json, <out>.md, <out>_cells/)``; a trailing ``.json``/``.md`` in ``out`` is dropped."""
    stem = str(out)
    for ext in (".json", ".md"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return Path(stem + ".json"), Path(stem + ".md"), Path(stem + "_cells")


def resolve_glue(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    if os.environ.get("NXM_GLUE_DIR", "").strip():
        return None  # resolve_glue_dir reads it
    shared = REPO.parent / "shared" / "data" / "glue"
    return str(shared) if shared.is_dir() else None


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s | %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("nxm_deploy").setLevel(logging.INFO if args.verbose else logging.WARNING)
    started = time.perf_counter()

    from nxm_deploy.errors import NxmError
    from nxm_deploy.sparsity.pattern import NMPattern

    try:
        tasks = list(dict.fromkeys(canonical_task(t) for t in args.tasks))
        patterns = list(dict.fromkeys(str(NMPattern.parse(p)) for p in args.patterns))
    except NxmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seeds = list(dict.fromkeys(args.seeds))
    args.glue_dir = resolve_glue(args.glue_dir)
    if args.recipe:
        import yaml

        base, base_source = yaml.safe_load(Path(args.recipe).read_text()), f"`{args.recipe}`"
    else:
        base, base_source = BASE_RECIPE, "built-in (mirrors recipes/minilm_rte_2of4_int8.yaml)"
    settings = {
        "model": args.model, "epochs_dense": args.epochs_dense, "lr_dense": args.lr_dense,
        "epochs_sparse": args.epochs_sparse, "lr": args.lr, "rho": args.rho,
        "masked_finetune_epochs": args.masked_finetune_epochs, "kd": args.kd, "bf16": args.bf16,
        "max_train_examples": args.max_train_examples, "max_eval_examples": args.max_eval_examples,
        "threads": args.threads, "penalty_mode": args.penalty_mode, "u_init": args.u_init,
        "update_interval": (None if args.update_interval is None else
                            args.update_interval if args.update_interval == "epoch" else int(args.update_interval)),
    }
    plan = plan_cells(tasks, args.methods, patterns, seeds)
    variants = list(dict.fromkeys(variant_name(m, p) for m, p in plan_variants(args.methods, patterns)))
    recipes, fps = cell_recipes(base, settings, plan)
    # effective values (base recipe values where an option was not given), for the report
    probe = build_recipe_dict(base, settings, tasks[0], seeds[0], "admm", patterns[0])
    eff = dict(settings)
    eff.update({"epochs_dense": probe["train"]["dense"].get("epochs"), "lr_dense": probe["train"]["dense"].get("learning_rate"),
                "epochs_sparse": probe["train"]["admm"].get("epochs"), "lr": probe["train"]["admm"].get("learning_rate"),
                "rho": probe["train"]["admm"].get("rho"),
                "masked_finetune_epochs": probe["train"]["admm"].get("masked_finetune_epochs"),
                "admm": {k: v for k, v in probe["train"]["admm"].items() if k not in ("method",)},
                "batch_size": probe["train"].get("batch_size"),
                "max_seq_length": probe["task"].get("max_seq_length")})
    json_path, md_path, results_dir = out_paths(args.out)
    results_dir.mkdir(parents=True, exist_ok=True)
    todo, mismatched_cells = cells_to_run(results_dir, plan, fps, args.redo_mismatched)
    mismatched = [c.key for c in mismatched_cells]
    log.info("%d cells planned: %d finished, %d to run, %d written with other settings",
             len(plan), len(plan) - len(todo) - (0 if args.redo_mismatched else len(mismatched)), len(todo),
             len(mismatched))
    if mismatched and not args.redo_mismatched and not args.report_only:
        print("error: these cell files in " + str(results_dir) + " were written with other settings: "
              + ", ".join(mismatched) + "\nhint: use the same options as before, another --out, or --redo-mismatched "
              "to retrain them", file=sys.stderr)
        return 2

    env = {"versions": versions(), "machine": machine()}
    step_path = results_dir / STEP_COST_FILE
    step_recipe = build_recipe_dict(base, settings, tasks[0], seeds[0], "admm", patterns[0])
    step_fp = fingerprint(step_recipe, dense=False)
    step_cost = read_json(step_path) if step_path.is_file() else None
    stopped = None
    failed: dict[str, str] = {}

    def write_report() -> dict:
        records = load_records(results_dir, plan, fps)
        report = build_report(records=records, plan=plan, tasks=tasks, seeds=seeds, variants=variants, settings=eff,
                              base_source=base_source, step_cost=step_cost, mismatched=mismatched, stopped=stopped,
                              command=command_line(), env=env, failed=failed)
        atomic_write_json(json_path, report)
        notes = md_path.with_name(md_path.stem + "_notes.md")  # hand-written findings kept across regenerations
        if notes.is_file():
            report["notes"] = notes.read_text()
        atomic_write_text(md_path, render_markdown(report))
        return report

    if not args.report_only:
        budget_s = None if args.time_budget_min is None else args.time_budget_min * 60

        def over_budget() -> bool:
            return budget_s is not None and time.perf_counter() - started > budget_s

        if args.step_cost_steps > 0 and (args.redo_step_cost or step_cost is None
                                         or step_cost.get("fingerprint") != step_fp
                                         or step_cost.get("timed_rounds") != args.step_cost_steps):
            log.info("ADMM step cost: %d interleaved rounds of plain vs ADMM W-steps", args.step_cost_steps)
            step_cost = {**measure_step_cost(step_recipe, args.glue_dir, args.step_cost_steps),
                         "fingerprint": step_fp, "command": command_line(), "machine": env["machine"]["line"],
                         "versions": env["versions"], "finished_utc": now_utc()}
            atomic_write_json(step_path, step_cost)
            log.info("ADMM step cost ratio %.3f (%s)", step_cost["ratio"], step_cost["result"])

        try:  # size of the job, so that sittings can be planned
            from nxm_deploy.data import load_task_split, resolve_glue_dir

            n_train = {}
            for task in tasks:
                n = len(load_task_split(task, "train", resolve_glue_dir(args.glue_dir)))
                n_train[task] = min(n, args.max_train_examples) if args.max_train_examples else n
            steps = {m: sum(planned_steps(c, recipes[c.key], n_train[c.task]) for c in todo if c.method == m)
                     for m in METHODS}
            msg = (f"{len(todo)} cells to run: {sum(steps.values())} optimizer steps "
                   f"(dense {steps['dense']}, magnitude {steps['magnitude']}, admm {steps['admm']})")
            if step_cost:
                kd = 1.4 if args.kd else 1.0
                est = step_cost["plain_median_s"] * (steps["dense"] + kd * (steps["magnitude"] + steps["admm"]))
                msg += f"; rough estimate {est / 3600:.1f} h (step-cost median per step, KD steps x{kd}, eval excluded)"
            log.info(msg)
        except Exception as exc:  # noqa: BLE001 - the estimate is informational only
            log.info("no step estimate (%s)", exc)

        from tqdm.auto import tqdm

        runner = Runner(args, base, settings, recipes, fps, results_dir)
        todo_keys = {c.key for c in todo}
        bar = tqdm(total=len(todo), desc="cells", unit="cell", position=0, dynamic_ncols=True, disable=not todo)
        done_n = 0
        try:
            for cell in todo:
                if over_budget():
                    stopped = (f"time budget of {args.time_budget_min} min reached after {done_n} new cells; "
                               f"{len(todo) - done_n - len(failed)} cells not started")
                    log.warning(stopped)
                    break
                t0 = time.perf_counter()
                dense_cell = Cell(cell.task, "dense", None, cell.seed)
                if dense_cell.key in failed:
                    failed[cell.key] = f"skipped: the dense model of {cell.task} seed {cell.seed} failed"
                    bar.update(1)
                    continue
                try:
                    dense_missing = (dense_cell.key in todo_keys
                                     and cell_status(results_dir, dense_cell, fps[dense_cell.key]) != "done")
                    try:
                        runner.ensure_dense(cell.task, cell.seed, rewrite_cell=dense_missing)
                    except Exception:
                        failed[dense_cell.key] = "dense fine-tune failed"
                        raise
                    rec = read_json(results_dir / cell.filename) if cell.method == "dense" else runner.run_sparse(cell)
                except Exception as exc:  # noqa: BLE001 - one failed cell must not end a long sitting
                    log.exception("cell %s failed", cell.key)
                    failed[cell.key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    bar.update(1)
                    write_report()
                    continue
                done_n += 1
                bar.update(1)
                res = rec.get("relative_residual_last")
                tqdm.write(f"[{done_n}/{len(todo)}] {cell.key}: score {rec['score']:.2f} "
                           f"({', '.join(f'{k} {v:.4f}' for k, v in rec['metrics'].items())}), "
                           f"{(time.perf_counter() - t0) / 60:.1f} min"
                           + (f", last relative residual {res:.4g}" if res is not None else ""))
                write_report()
        except KeyboardInterrupt:
            stopped = f"interrupted after {done_n} new cells"
            log.warning(stopped)
        finally:
            bar.close()

    report = write_report()
    for line in summary_lines(report):
        print(line)
    if failed:
        print("failed cells: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    print(f"wrote {json_path} and {md_path} "
          f"({len(plan) - len(report['missing'])}/{len(plan)} cells; cell files in {results_dir})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
