"""Accuracy table (protocol v2, ``benchmarks/PROTOCOL.md``): dense vs every 2:4 mask method, each + INT8 QAT, on GLUE
tasks and seeds.

A thin driver of the public CLI. Every cell is one command, printed in the table as the command that reproduces it.
The dense cell of a (task, seed) trains the dense model alone; every method's cell adopts it (``--from-run``: copied
and checked by hash), so all methods start from the same dense model:

    nxm-deploy train recipes/bench_accuracy.yaml --stage dense --run-dir <work>/<task>/seed<k>/dense \
        --set name=acc2_<task>_s<k>_dense --set task.name=<task> --set train.seed=<k>
    nxm-deploy run recipes/bench_accuracy.yaml --run-dir <work>/<task>/seed<k>/<method> \
        --set name=acc2_<task>_s<k>_<method> --set task.name=<task> --set train.seed=<k> \
        --set sparsity.method=<method> --from-run <work>/<task>/seed<k>/dense

A seed-0 magnitude or ADMM cell adopts instead the stages of the pilot cell picked for its method (protocol v2's P2 /
P3, ``benchmarks/pilots_v2.json``) once it has finished: ``--from-run`` adopts only stages whose keys (every recipe
value they read, their inputs, the seed) equal the cell's, so the numbers are the ones the cell would train, without
training them twice.

A method cell gives three numbers: the dense FP32 ONNX model and the deployed 2:4 INT8 ONNX model under ONNX Runtime
(``validation.json``), and the sparse FP PyTorch model (``sparse/manifest.json``); its manifest also says how far its
mask is from the magnitude mask. Resumable: a finished cell is up to date and costs seconds; a killed one resumes from
its training checkpoints. The methods are the registry's (:mod:`nxm_deploy.sparsity.methods`).

Tasks: GLUE names, plus ``sst2_8k``: SST-2 on a seeded 8,000-example training subset (full dev set), reported beside
the average of the main tasks (RTE, MRPC, STS-B: comparable with the table of protocol v1).

Score (0-100): MRPC mean of F1 and accuracy, STS-B mean of Pearson and Spearman, other tasks the primary metric.
Writes ``<out>.json`` (top-level ``average``: ``dense``, every method and ``<method>_int8`` -> mean over the main tasks
of the mean over seeds, only where every cell finished; ``best_int8``: the method with the best deployed average) and
``<out>.md``.

Usage:
    .venv/bin/python tools/bench_accuracy.py [--tasks rte mrpc stsb sst2_8k] [--seeds 0 1 2] [--methods ...]
    .venv/bin/python tools/bench_accuracy.py --report-only
    # two lanes, one per core, sharing the cells (tools/lanes.py; each cell at one thread):
    .venv/bin/python tools/bench_accuracy.py --threads 1 & .venv/bin/python tools/bench_accuracy.py --threads 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nxm_deploy.data.tasks import get_task
from nxm_deploy.fileio import atomic_write_json, atomic_write_text
from nxm_deploy.config.recipe import load_recipe
from nxm_deploy.run.layout import RunLayout
from nxm_deploy.machine import machine_line
from nxm_deploy.sparsity.methods import METHODS as MASK_METHODS
from nxm_deploy.stages import StageContext, get_stage, is_up_to_date

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lanes  # noqa: E402  (tools/lanes.py: cells shared by several drivers)

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/bench_accuracy.yaml"
WORK_DIR = "runs/acc2"
#: protocol v1's work dir (benchmarks/accuracy_glue.md before protocol v2; tools/pilot_admm_report.py reads it)
WORK_DIR_V1 = "runs/bench_accuracy"
#: the main tasks: their average is the table's (comparable with protocol v1)
TASKS = ("rte", "mrpc", "stsb")
#: table task -> (GLUE task, the overrides that make it): SST-2 on a seeded 8k training subset (PROTOCOL.md)
TASK_SETS = {"sst2_8k": ("sst2", ("task.max_train_examples=8000", "task.train_subset_seed=0"))}
METHODS = tuple(MASK_METHODS)
DENSE = "dense"
#: README block the table is written into (between these markers)
README_MARKERS = ("<!-- accuracy_glue:begin (tools/bench_accuracy.py writes this block) -->", "<!-- accuracy_glue:end -->")
#: task -> the metrics averaged into its score
SCORE = {"mrpc": ("f1", "accuracy"), "stsb": ("pearson", "spearman")}


def variants(methods) -> tuple[str, ...]:
    """The table's rows: dense, each method's sparse FP model, each method's deployed INT8 model."""
    return (DENSE, *methods, *(f"{m}_int8" for m in methods))


def last_epoch_variants(methods) -> tuple[str, ...]:
    """The PyTorch models' last epochs (the table's rows are the kept candidates, protocol v2's selection)."""
    return (f"{DENSE}_last", *(f"{m}_last" for m in methods))


def label(variant: str) -> str:
    """A row's label, from the method registry."""
    if variant == DENSE:
        return "dense FP32 (ONNX)"
    if variant == f"{DENSE}_last":
        return "dense, last epoch (PyTorch)"
    method, _, kind = variant.partition("_")
    name = MASK_METHODS[method].label
    return {"": f"2:4 {name} (PyTorch)", "int8": f"2:4 {name} + INT8 QAT (ONNX Runtime)",
            "last": f"2:4 {name}, last epoch (PyTorch)"}[kind]


def glue_task(task: str) -> str:
    """The GLUE task of a table task (``sst2_8k`` -> ``sst2``)."""
    return TASK_SETS.get(task, (task, ()))[0]


def run_dir(work: Path, task: str, seed: int, method: str) -> Path:
    return work / task / f"seed{seed}" / method


def nxm_argv(head: list[str], run_dir: Path, sets, from_run: Path | None = None) -> list[str]:
    """``nxm-deploy`` arguments of a benchmark cell: ``head`` (``["run", RECIPE]`` or a ``train`` command), the run
    directory, ``--set`` overrides, and the run whose finished stages it adopts. The table's and the pilots' cells."""
    argv = [*head, "--run-dir", str(run_dir)]
    for item in sets:
        argv += ["--set", item]
    return argv + (["--from-run", str(from_run)] if from_run is not None else [])


def cell_command(argv: list[str], glue_dir: str | None, threads: int | None) -> list[str]:
    """The process that runs a cell's ``argv`` quietly (this interpreter's ``nxm-deploy``), on ``glue_dir`` and at
    ``threads`` torch threads (``train.num_threads``: speed only, no stage reads it)."""
    cmd = [sys.executable, "-m", "nxm_deploy.cli", "-q", *argv]
    if glue_dir:
        cmd += ["--glue-dir", glue_dir]
    if threads:
        cmd += ["--set", f"train.num_threads={threads}"]
    return cmd


#: the pilots' report (tools/pilot_v2.py): its picks name the seed-0 pilot cells a table cell may adopt stages from
PILOTS_JSON = REPO / "benchmarks" / "pilots_v2.json"
#: method -> the pilot (key of PILOTS_JSON and folder under ``<work>/<task>/seed0/``) whose picked cell ran the
#: method's seed-0 table cell, and the last stage that cell finished: P2 ran magnitude through validation, P3 ADMM's
#: sparse stage
PILOT_CELLS = {"magnitude": ("p2", "validate"), "admm": ("p3", "admm")}


def pilot_source(work: Path, task: str, seed: int, method: str, pilots: Path | None = None) -> Path | None:
    """The finished seed-0 pilot cell that the pilots picked for ``method`` (:data:`PILOT_CELLS`), or None.

    A table cell adopts its training stages from there (``--from-run``) instead of retraining them: ``--from-run``
    adopts only the stages whose every recipe value, input and seed equal the cell's own (the stage keys), so the
    numbers are those the cell would compute, and any stage that differs (a pick not yet in the recipe) runs."""
    pilots = PILOTS_JSON if pilots is None else Path(pilots)
    if seed != 0 or method not in PILOT_CELLS or task not in TASKS or not pilots.is_file():
        return None
    pilot, last_stage = PILOT_CELLS[method]
    pick = (json.loads(pilots.read_text()).get(pilot) or {}).get("pick")
    if not pick:
        return None
    cell = Path(work) / task / "seed0" / pilot / pick
    layout = RunLayout(cell)
    done = layout.validation if last_stage == "validate" else layout.stage_manifest(last_stage)
    return cell if done.is_file() else None


def cell_argv(work: Path, task: str, seed: int, method: str, recipe: str = RECIPE, sets=()) -> list[str]:
    """The ``nxm-deploy`` arguments of one cell (what the table prints as its reproduce command): the dense cell
    (``method`` ``dense``) trains the dense stage alone; a method cell adopts it, or a seed-0 cell the stages of the
    pilot cell picked for its method (:func:`pilot_source`)."""
    head = ["train", recipe, "--stage", "dense"] if method == DENSE else ["run", recipe]
    source = None if method == DENSE else pilot_source(work, task, seed, method) or run_dir(work, task, seed, DENSE)
    return nxm_argv(head, run_dir(work, task, seed, method), cell_sets(task, seed, method, sets), source)


def cell_sets(task: str, seed: int, method: str, sets=()) -> list[str]:
    """The ``--set`` overrides of one cell: its name, GLUE task, seed, the task's subset and the mask method, then
    ``sets``."""
    return [f"name=acc2_{task}_s{seed}_{method}", f"task.name={glue_task(task)}", f"train.seed={seed}",
            *TASK_SETS.get(task, (task, ()))[1], *([f"sparsity.method={method}"] if method != DENSE else []), *sets]


def dense_up_to_date(work: Path, task: str, seed: int, recipe: str = RECIPE, sets=(), glue_dir: str | None = None) -> bool:
    """Whether the dense cell of (task, seed) has its dense stage up to date for the cell's recipe now, by the
    executor's rule (:func:`nxm_deploy.stages.is_up_to_date`). The cell's command (``train --stage dense``) trains
    the stage even when it is up to date, as a stage command does, so the table runs it only when this is False:
    retraining a finished dense model would change the input of every method cell that adopted it."""
    layout = RunLayout(run_dir(work, task, seed, DENSE))
    if not layout.ledger.is_file():
        return False
    ctx = StageContext(load_recipe(recipe, cell_sets(task, seed, DENSE, sets)), layout.root, glue_dir)
    return is_up_to_date(get_stage("dense"), ctx)


def score(task: str, metrics: dict | None) -> float | None:
    """The 0-100 score of one metrics dict (None when missing): MRPC mean of F1 and accuracy, STS-B mean of Pearson
    and Spearman, other tasks the primary metric. An undefined (NaN) correlation -- a constant prediction -- counts
    as 0."""
    if not metrics:
        return None
    task = glue_task(task)
    keys = SCORE.get(task) or (get_task(task).primary_metric,)
    values = [metrics.get(k) for k in keys]
    if any(v is None for v in values):
        return None
    return 100.0 * sum(0.0 if v != v else float(v) for v in values) / len(values)


def score_definition(task: str) -> str:
    """How :func:`score` scores ``task``, in words."""
    return {"stsb": "mean(Pearson, Spearman) x 100", "mrpc": "mean(F1, accuracy) x 100"}.get(
        task, f"{get_task(glue_task(task)).primary_metric} x 100")


def _last_epoch(task: str, epoch_metrics: list | None) -> float | None:
    """The 0-100 score of the last epoch of a phase (its ``epoch_metrics`` in the stage manifest)."""
    if not epoch_metrics:
        return None
    return score(task, {k: v for k, v in epoch_metrics[-1].items() if k not in ("epoch", "step")})


def read_cell(work: Path, task: str, seed: int, method: str) -> dict | None:
    """The numbers of one finished method cell, or None: the kept models' scores, last-epoch scores of the PyTorch
    phases, the final ADMM residual, how the mask differs from magnitude's, and the machine that ran the cell."""
    layout = RunLayout(run_dir(work, task, seed, method))
    if not layout.validation.is_file() or not layout.stage_manifest("admm").is_file():
        return None
    validation = json.loads(layout.validation.read_text())
    sparse = json.loads(layout.stage_manifest("admm").read_text())
    dense = json.loads(layout.stage_manifest("dense").read_text())
    metrics = validation.get("metrics") or {}
    return {DENSE: score(task, metrics.get("dense_fp32")), method: score(task, sparse.get("metrics")),
            f"{method}_int8": score(task, metrics.get("sparse_int8")),
            f"{DENSE}_last": _last_epoch(task, dense.get("epoch_metrics")),
            f"{method}_last": _last_epoch(task, (sparse.get("masked_finetune") or {}).get("epoch_metrics")),
            "admm_residual": (sparse.get("admm_history") or [{}])[-1].get("relative_residual"),
            "mask_differing": (sparse.get("mask_vs_magnitude") or {}).get("kept_positions_differing"),
            "kept": sparse.get("kept"), "machine": validation.get("machine")}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def build_table(work: Path, tasks, seeds, methods, argv_of) -> dict:
    """Cells, per-task mean ± std, the average over the main tasks of every variant (complete variants only) and the
    best deployed method."""
    rows, lasts = variants(methods), last_epoch_variants(methods)
    cells, per_task = [], {}
    for task in tasks:
        values = {v: [] for v in rows + lasts}
        for seed in seeds:
            cells.append({"task": task, "seed": seed, "method": DENSE, "finished": RunLayout(
                run_dir(work, task, seed, DENSE)).stage_manifest("dense").is_file(),
                "command": "nxm-deploy " + shlex.join(argv_of(task, seed, DENSE))})
            dense_taken = False
            for method in methods:
                cell = read_cell(work, task, seed, method)
                command = "nxm-deploy " + shlex.join(argv_of(task, seed, method))
                cells.append({"task": task, "seed": seed, "method": method, "command": command,
                              "finished": cell is not None, **(cell or {})})
                if cell is None:
                    continue
                own = (method, f"{method}_int8", f"{method}_last")
                if not dense_taken:  # one dense model per (task, seed): every method cell adopted it
                    own += (DENSE, f"{DENSE}_last")
                    dense_taken = True
                for variant in own:
                    if cell.get(variant) is not None:
                        values[variant].append(cell[variant])
        per_task[task] = {v: _mean_std(vals) for v, vals in values.items() if vals}
    main = [t for t in tasks if t in TASKS]

    def complete_means(names) -> dict:
        out = {}
        for variant in names:
            found = [per_task[t].get(variant) for t in main]
            if main and all(r is not None and r["n"] == len(seeds) for r in found):
                out[variant] = statistics.fmean(r["mean"] for r in found)
        return out

    average = complete_means(rows)
    deployed = {m: average[f"{m}_int8"] for m in methods if f"{m}_int8" in average}
    best = max(deployed, key=deployed.get) if deployed else None
    if best is not None:
        average["best_int8"] = {"method": best, "value": deployed[best]}
    return {"cells": cells, "per_task": per_task, "main_tasks": main, "average": average,
            "average_last_epoch": complete_means(lasts)}


def _row(result: dict, variant: str) -> str:
    cells = []
    for task in result["tasks"]:
        s = result["per_task"].get(task, {}).get(variant)
        cells.append("–" if s is None else f"{s['mean']:.2f} ± {s['std']:.2f} (n={s['n']})")
    avg = result["average_last_epoch" if variant.endswith("_last") else "average"].get(variant)
    return f"| {label(variant)} | " + " | ".join(cells) + f" | {'incomplete' if avg is None else f'{avg:.2f}'} |"


def _header(result: dict) -> list[str]:
    main = "average of " + ", ".join(result["main_tasks"]) if result["main_tasks"] else "average"
    return ["| | " + " | ".join(result["tasks"]) + f" | {main} |", "|---|" + "---|" * (len(result["tasks"]) + 1)]


def _mean_over(result: dict, tasks, variant: str) -> float | None:
    found = [result["per_task"].get(t, {}).get(variant) for t in tasks]
    return None if not tasks or any(f is None for f in found) else statistics.fmean(f["mean"] for f in found)


def targets(result: dict) -> list[dict]:
    """Issue 30's targets: ``{"label", "value", "bound", "met"}`` each; ``met`` None until the cells it needs finished
    (the value is then the partial one, on the tasks that have them, or None)."""
    out = []
    main, avg = result["main_tasks"], result["average"]
    complete = all(len(result["seeds"]) == (result["per_task"].get(t, {}).get(DENSE) or {}).get("n") for t in main)
    best = avg.get("best_int8")
    if best is not None and DENSE in avg:
        value = best["value"] - avg[DENSE]
        out.append({"label": f"best deployed method ({best['method']}) within 0.5 of dense", "value": value,
                    "bound": -0.5, "met": value >= -0.5})
    else:
        out.append({"label": "best deployed method within 0.5 of dense", "value": None, "bound": -0.5, "met": None})
    for kind in ("", "_int8"):
        a, m = _mean_over(result, main, f"admm{kind}"), _mean_over(result, main, f"magnitude{kind}")
        value = None if a is None or m is None else a - m
        done = f"admm{kind}" in avg and f"magnitude{kind}" in avg
        out.append({"label": f"ADMM - magnitude >= -0.2 ({'deployed INT8' if kind else 'sparse FP'})", "value": value,
                    "bound": -0.2, "met": (value >= -0.2) if done else None})
    aware = [m for m in ("wanda", "sparsegpt") if f"{m}_int8" in avg]
    if aware and complete:
        best_aware = max(aware, key=lambda m: avg[f"{m}_int8"])
        diffs = [c["mask_differing"] for c in result["cells"] if c["method"] == best_aware and c["task"] in main
                 and c.get("mask_differing") is not None]
        value = statistics.fmean(diffs) if diffs else None
        out.append({"label": f"best data-aware method's mask ({best_aware}) differs from magnitude's in >= 5 % of kept "
                             "positions", "value": value, "bound": 0.05, "met": None if value is None else value >= 0.05})
    else:
        out.append({"label": "best data-aware method's mask differs from magnitude's in >= 5 % of kept positions",
                    "value": None, "bound": 0.05, "met": None})
    if "sst2_8k" in result["tasks"]:
        rows = result["per_task"].get("sst2_8k", {})
        a, m = rows.get("admm_int8"), rows.get("magnitude_int8")
        value = None if a is None or m is None else a["mean"] - m["mean"]
        done = a is not None and m is not None and a["n"] == m["n"] == len(result["seeds"])
        out.append({"label": "SST-2-8k: ADMM - magnitude deployed >= +0.5", "value": value, "bound": 0.5,
                    "met": (value >= 0.5) if done else None})
    return out


def target_lines(result: dict) -> list[str]:
    """One line per target (:func:`targets`): its value and a verdict."""
    lines = []
    for t in targets(result):
        shown = "not measured yet" if t["value"] is None else (
            f"{100 * t['value']:.1f} %" if "kept positions" in t["label"] else f"{t['value']:+.2f}")
        verdict = {True: "met", False: "**missed**", None: "not decided until every cell ran"}[t["met"]]
        lines.append(f"- {t['label']}: {shown}: {verdict}")
    return lines


def render_markdown(result: dict) -> str:
    methods = result["methods"]
    lines = ["# Accuracy: dense vs 2:4 mask methods, each + INT8 QAT (MiniLM-L6, GLUE dev; protocol v2)", "",
             f"Command: `{result['command']}`  ", f"Date (UTC): {result['date']}  ", f"Versions: {result['versions']}  ",
             f"Machine of the report: {result['machine']}", "",
             "Protocol v2: `benchmarks/PROTOCOL.md`; base recipe `recipes/bench_accuracy.yaml`. Score 0-100 (MRPC: mean "
             "of F1 and accuracy; STS-B: mean of Pearson and Spearman), mean ± std over seeds. INT8 rows: the exported "
             "2:4 INT8 ONNX model under ONNX Runtime; dense: the dense FP32 ONNX model of the same run; sparse FP rows: "
             "the kept candidate (PyTorch). The average is over the main tasks only (sst2_8k beside it) and is given "
             "only where every cell finished.", "",
             *_header(result), *(_row(result, v) for v in variants(methods)), "", "Targets (issue 30):", "",
             *target_lines(result), "", "Last epoch instead of the kept candidate:", "",
             *_header(result), *(_row(result, v) for v in last_epoch_variants(methods))]
    done = [c for c in result["cells"] if c["finished"]]
    lines += ["", f"{len(done)} of {len(result['cells'])} cells finished. Each cell, the command that reproduces it "
              "and the machine that ran it:", "",
              "| task | seed | method | dense | sparse FP | sparse INT8 | kept | mask vs magnitude | ADMM residual | "
              "machine | command |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v, spec=".2f"):
        return "–" if v is None else format(v, spec)

    for c in result["cells"]:
        m = c["method"]
        if m == DENSE:
            lines.append(f"| {c['task']} | {c['seed']} | dense | | | | | | | {'finished' if c['finished'] else 'not run yet'}"
                         f" | `{c['command']}` |")
            continue
        differing = c.get("mask_differing")
        lines.append(f"| {c['task']} | {c['seed']} | {m} | {fmt(c.get(DENSE))} | {fmt(c.get(m))} | "
                     f"{fmt(c.get(m + '_int8'))} | {c.get('kept') or '–'} | "
                     f"{'–' if differing is None else f'{100 * differing:.1f} %'} | "
                     f"{fmt(c.get('admm_residual') if m == 'admm' else None, '.3f')} | "
                     f"{c.get('machine') or 'not run yet'} | `{c['command']}` |")
    return "\n".join(lines) + "\n"


def render_readme_block(result: dict, out: Path) -> str:
    """The README's results table: the kept candidates' rows, each with the command of its seed-0 cell on the first
    task (and the dense cell's command that the method cells adopt)."""
    task = result["tasks"][0]
    cmd = {c["method"]: c["command"] for c in result["cells"] if c["task"] == task and c["seed"] == result["seeds"][0]}
    lines = [f"From `{out.with_suffix('.md')}` (`{result['command']}`, {result['date'][:10]}, {result['machine']}).",
             "", *_header(result), *(_row(result, v) for v in variants(result["methods"])), "",
             "Targets (issue 30):", "", *target_lines(result), "",
             f"Reproduce one cell of a row ({task}, seed {result['seeds'][0]}; other tasks and seeds: `--set task.name=`, "
             "`--set train.seed=`, and the run directory). First the dense model, which every method cell adopts:", "",
             f"- dense: `{cmd.get(DENSE, '')}`"]
    for variant in variants(result["methods"]):
        method = variant.partition("_")[0]
        if method != DENSE:
            lines.append(f"- {label(variant)}: `{cmd.get(method, '')}`")
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> bool:
    """Replace the text between :data:`README_MARKERS` in ``readme`` by ``block``; False when a marker is missing."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    begin, end = README_MARKERS
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    atomic_write_text(readme, head + begin + "\n" + block + "\n" + end + rest.split(end, 1)[1])
    return True


def write_outputs(out: Path, args, work: Path) -> dict:
    import nxm_deploy
    import torch
    import transformers

    def argv_of(task, seed, method):
        return cell_argv(work, task, seed, method, args.recipe, args.set)

    table = build_table(work, args.tasks, args.seeds, args.methods, argv_of)
    # the command that runs (or resumes) every cell of this table, whichever invocation wrote the report
    command = ["python", "tools/bench_accuracy.py", "--tasks", *args.tasks, "--seeds", *map(str, args.seeds),
               "--methods", *args.methods]
    if args.recipe != RECIPE:
        command += ["--recipe", args.recipe]
    for item in args.set:
        command += ["--set", item]
    if args.work_dir != WORK_DIR:
        command += ["--work-dir", args.work_dir]
    result = {"command": shlex.join(command),
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, python "
                          f"{platform.python_version()}, nxm_deploy {nxm_deploy.__version__}",
              "machine": machine_line(), "tasks": list(args.tasks), "seeds": list(args.seeds),
              "methods": list(args.methods), "protocol": 2, **table}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), render_markdown(result))
    if args.readme:
        update_readme(Path(args.readme), render_readme_block(result, out))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides for every cell")
    p.add_argument("--work-dir", default=WORK_DIR)
    p.add_argument("--out", default="benchmarks/accuracy_glue")
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--time-budget-min", type=float, default=None, help="start no new cell after this many minutes")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--readme", default="README.md", help="README whose accuracy_glue block is rewritten ('' for none)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each cell (train.num_threads)")
    args = p.parse_args(argv)
    work, out, start = Path(args.work_dir), Path(args.out), time.monotonic()
    cells = [] if args.report_only else list(itertools.product(args.seeds, args.tasks, (DENSE, *args.methods)))

    def cell_dir(cell) -> Path:
        seed, task, method = cell
        return run_dir(work, task, seed, method)

    # a method cell runs once in each driver: a finished one is up to date in seconds (``nxm-deploy run`` skips
    # up-to-date stages), and one whose recipe keys changed since it ran trains again; a dense cell runs only when
    # its stage is not up to date (its command trains it in any case)
    done: set = set()

    def finished(cell) -> bool:
        seed, task, method = cell
        if cell not in done and method == DENSE and dense_up_to_date(work, task, seed, args.recipe, args.set,
                                                                      args.glue_dir):
            done.add(cell)
        return cell in done

    def ready(cell) -> bool:  # a method cell adopts its (task, seed)'s dense model, maybe trained by another lane
        seed, task, method = cell
        return method == DENSE or finished((seed, task, DENSE))

    def run(cell) -> int:
        seed, task, method = cell
        cmd = cell_command(cell_argv(work, task, seed, method, args.recipe, args.set), args.glue_dir, args.threads)
        print(f"cell {task} seed {seed} {method}: nxm-deploy {shlex.join(cmd[3:])}", flush=True)
        rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
        if rc != 0:
            print(f"  exit {rc}", flush=True)
        else:
            done.add(cell)
        write_outputs(out, args, work)
        return rc

    def stop() -> bool:
        spent = args.time_budget_min is not None and time.monotonic() - start > 60 * args.time_budget_min
        if spent:
            print("time budget spent: stopping before the next cell", flush=True)
        return spent

    failed = lanes.run_lane(lambda: cells, run_dir=cell_dir, finished=finished, ready=ready, run=run, stop=stop)
    result = write_outputs(out, args, work)
    print(f"average: {result['average']}; wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
