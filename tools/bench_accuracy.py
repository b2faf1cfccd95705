"""Accuracy table: dense vs 2:4 magnitude (ASP) vs 2:4 ADMM, each followed by INT8 QAT, on GLUE tasks and seeds.

A thin driver of the public CLI. Every cell is one command, printed in the table as the command that reproduces it:

    nxm-deploy run recipes/bench_accuracy.yaml --run-dir <work>/<task>/seed<k>/<method> \\
        --set name=acc_<task>_s<k>_<method> --set task.name=<task> --set train.seed=<k> \\
        --set train.admm.method=<method> [--from-run <work>/<task>/seed<k>/magnitude]

The magnitude cell of a (task, seed) trains the dense model; the ADMM cell adopts it (``--from-run``: copied and
checked by hash), so both sparse methods start from the same dense model. A cell gives four numbers: the dense
FP32 ONNX model and the deployed 2:4 INT8 ONNX model under ONNX Runtime (``validation.json``), and the sparse FP
PyTorch model (``sparse/manifest.json``). Resumable: a cell that finished is up to date for ``nxm-deploy run`` and
costs seconds; a killed one resumes from its training checkpoints.

Score (0-100): MRPC mean of F1 and accuracy, STS-B mean of Pearson and Spearman, other tasks the primary metric.
Writes ``<out>.json`` (top-level ``average``: ``dense``, ``magnitude``, ``admm``, ``magnitude_int8``,
``admm_int8`` -> mean over tasks of the mean over seeds, only where every cell finished) and ``<out>.md``.

Usage:
    .venv/bin/python tools/bench_accuracy.py [--tasks rte mrpc stsb] [--seeds 0 1 2] [--time-budget-min 120]
    .venv/bin/python tools/bench_accuracy.py --report-only
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
from nxm_deploy.layout import RunLayout
from nxm_deploy.machine import machine_line

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/bench_accuracy.yaml"
WORK_DIR = "runs/bench_accuracy"
TASKS = ("rte", "mrpc", "stsb")
METHODS = ("magnitude", "admm")
VARIANTS = ("dense", "magnitude", "admm", "magnitude_int8", "admm_int8")
#: the PyTorch models' last epochs (the table's rows are the best dev epochs, the protocol's model selection)
LAST_EPOCH = ("dense_last", "magnitude_last", "admm_last")
LABELS = {"dense": "dense FP32 (ONNX)", "magnitude": "2:4 magnitude (PyTorch)", "admm": "2:4 ADMM (PyTorch)",
          "magnitude_int8": "2:4 magnitude + INT8 QAT (ONNX Runtime)", "admm_int8": "2:4 ADMM + INT8 QAT (ONNX Runtime)",
          "dense_last": "dense, last epoch (PyTorch)", "magnitude_last": "2:4 magnitude, last epoch (PyTorch)",
          "admm_last": "2:4 ADMM, last epoch (PyTorch)"}
#: README block the table is written into (between these markers)
README_MARKERS = ("<!-- accuracy_glue:begin (tools/bench_accuracy.py writes this block) -->", "<!-- accuracy_glue:end -->")
#: task -> the metrics averaged into its score
SCORE = {"mrpc": ("f1", "accuracy"), "stsb": ("pearson", "spearman")}


def run_dir(work: Path, task: str, seed: int, method: str) -> Path:
    return work / task / f"seed{seed}" / method


def cell_argv(work: Path, task: str, seed: int, method: str, recipe: str = RECIPE, sets=()) -> list[str]:
    """The ``nxm-deploy`` arguments of one cell (what the table prints as its reproduce command)."""
    argv = ["run", recipe, "--run-dir", str(run_dir(work, task, seed, method)),
            "--set", f"name=acc_{task}_s{seed}_{method}", "--set", f"task.name={task}", "--set", f"train.seed={seed}",
            "--set", f"train.admm.method={method}"]
    for item in sets:
        argv += ["--set", item]
    if method != METHODS[0]:
        argv += ["--from-run", str(run_dir(work, task, seed, METHODS[0]))]
    return argv


def score(task: str, metrics: dict | None) -> float | None:
    """The 0-100 score of one metrics dict (None when missing): MRPC mean of F1 and accuracy, STS-B mean of Pearson
    and Spearman, other tasks the primary metric. An undefined (NaN) correlation -- a constant prediction -- counts
    as 0."""
    if not metrics:
        return None
    keys = SCORE.get(task) or (get_task(task).primary_metric,)
    values = [metrics.get(k) for k in keys]
    if any(v is None for v in values):
        return None
    return 100.0 * sum(0.0 if v != v else float(v) for v in values) / len(values)


def score_definition(task: str) -> str:
    """How :func:`score` scores ``task``, in words."""
    return {"stsb": "mean(Pearson, Spearman) x 100", "mrpc": "mean(F1, accuracy) x 100"}.get(
        task, f"{get_task(task).primary_metric} x 100")


def _last_epoch(task: str, epoch_metrics: list | None) -> float | None:
    """The 0-100 score of the last epoch of a phase (its ``epoch_metrics`` in the stage manifest)."""
    if not epoch_metrics:
        return None
    return score(task, {k: v for k, v in epoch_metrics[-1].items() if k not in ("epoch", "step")})


def read_cell(work: Path, task: str, seed: int, method: str) -> dict | None:
    """The numbers of one finished cell, or None: best-epoch scores (the kept models), last-epoch scores of the
    PyTorch phases, the final ADMM residual and the machine that ran the cell."""
    layout = RunLayout(run_dir(work, task, seed, method))
    if not layout.validation.is_file() or not layout.stage_manifest("admm").is_file():
        return None
    validation = json.loads(layout.validation.read_text())
    sparse = json.loads(layout.stage_manifest("admm").read_text())
    dense = json.loads(layout.stage_manifest("dense").read_text())
    metrics = validation.get("metrics") or {}
    return {"dense": score(task, metrics.get("dense_fp32")), method: score(task, sparse.get("metrics")),
            f"{method}_int8": score(task, metrics.get("sparse_int8")),
            "dense_last": _last_epoch(task, dense.get("epoch_metrics")),
            f"{method}_last": _last_epoch(task, (sparse.get("masked_finetune") or {}).get("epoch_metrics")),
            "admm_residual": (sparse.get("admm_history") or [{}])[-1].get("relative_residual"),
            "machine": validation.get("machine")}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def build_table(work: Path, tasks, seeds, argv_of) -> dict:
    """Cells, per-task mean ± std and the average over tasks of every variant (complete variants only)."""
    cells, per_task = [], {}
    for task in tasks:
        values = {v: [] for v in VARIANTS + LAST_EPOCH}
        for seed in seeds:
            for method in METHODS:
                cell = read_cell(work, task, seed, method)
                command = "nxm-deploy " + shlex.join(argv_of(task, seed, method))
                cells.append({"task": task, "seed": seed, "method": method, "command": command,
                              "finished": cell is not None, **(cell or {})})
                if cell is None:
                    continue
                own = (method, f"{method}_int8", f"{method}_last")
                for variant in own + (("dense", "dense_last") if method == METHODS[0] else ()):
                    if cell.get(variant) is not None:
                        values[variant].append(cell[variant])
        per_task[task] = {v: _mean_std(vals) for v, vals in values.items() if vals}
    def complete_means(variants) -> dict:
        out = {}
        for variant in variants:
            rows = [per_task[t].get(variant) for t in tasks]
            if all(r is not None and r["n"] == len(seeds) for r in rows):
                out[variant] = statistics.fmean(r["mean"] for r in rows)
        return out

    # "average": the five variants; the last epochs apart, so that the key keeps its contract
    return {"cells": cells, "per_task": per_task, "average": complete_means(VARIANTS),
            "average_last_epoch": complete_means(LAST_EPOCH)}


def _row(result: dict, variant: str) -> str:
    cells = []
    for task in result["tasks"]:
        s = result["per_task"].get(task, {}).get(variant)
        cells.append("–" if s is None else f"{s['mean']:.2f} ± {s['std']:.2f} (n={s['n']})")
    avg = result["average" if variant in VARIANTS else "average_last_epoch"].get(variant)
    return f"| {LABELS[variant]} | " + " | ".join(cells) + f" | {'incomplete' if avg is None else f'{avg:.2f}'} |"


def _header(result: dict) -> list[str]:
    return ["| | " + " | ".join(result["tasks"]) + " | average |", "|---|" + "---|" * (len(result["tasks"]) + 1)]


#: issue 15's targets: (label, variant, reference, least difference in points; None = an absolute bound)
TARGETS = (("dense reference average >= 75.0", "dense", None, 75.0),
           ("2:4 ADMM >= magnitude + 0.5", "admm", "magnitude", 0.5),
           ("deployed 2:4 ADMM INT8 within 1.0 of dense", "admm_int8", "dense", -1.0))


def target_lines(result: dict) -> list[str]:
    """One line per target: the value on the tasks where both variants have cells (the average once complete)."""
    lines = []
    for label, variant, reference, bound in TARGETS:
        tasks = [t for t in result["tasks"] if variant in result["per_task"].get(t, {})
                 and (reference is None or reference in result["per_task"][t])]
        if not tasks:
            lines.append(f"- {label}: not measured yet")
            continue
        def mean_of(v):
            return statistics.fmean(result["per_task"][t][v]["mean"] for t in tasks)
        value = mean_of(variant) - (mean_of(reference) if reference else 0.0)
        complete = result["average"].get(variant) is not None and (reference is None or
                                                                   result["average"].get(reference) is not None)
        where = "average over tasks" if complete else f"so far, on {', '.join(tasks)} only"
        verdict = ("met" if value >= bound else "**missed**") if complete else "not decided until every cell ran"
        shown = f"{value:.2f}" if reference is None else f"{value:+.2f}"
        lines.append(f"- {label}: {shown} ({where}): {verdict}")
    return lines


def render_markdown(result: dict) -> str:
    lines = ["# Accuracy: dense vs 2:4 magnitude vs 2:4 ADMM, each + INT8 QAT (MiniLM-L6, GLUE dev)", "",
             f"Command: `{result['command']}`  ", f"Date (UTC): {result['date']}  ", f"Versions: {result['versions']}  ",
             f"Machine of the report: {result['machine']}", "",
             "Protocol: `benchmarks/PROTOCOL.md`; base recipe `recipes/bench_accuracy.yaml`. Score 0-100 (MRPC: mean of "
             "F1 and accuracy; STS-B: mean of Pearson and Spearman), mean ± std over seeds. INT8 rows: the exported "
             "2:4 INT8 ONNX model under ONNX Runtime; dense: the dense FP32 ONNX model of the same run; sparse FP "
             "rows: the kept (best dev epoch) PyTorch model. An average is given only where every cell finished.", "",
             *_header(result), *(_row(result, v) for v in VARIANTS), "", "Targets:", "", *target_lines(result), "",
             "Last epoch instead of the best one:", "",
             *_header(result), *(_row(result, v) for v in LAST_EPOCH)]
    done = [c for c in result["cells"] if c["finished"]]
    lines += ["", f"{len(done)} of {len(result['cells'])} cells finished. Each cell, the command that reproduces it "
              "and the machine that ran it:", "",
              "| task | seed | method | dense | sparse FP | sparse INT8 | ADMM residual | machine | command |",
              "|---|---|---|---|---|---|---|---|---|"]

    def fmt(v, spec=".2f"):
        return "–" if v is None else format(v, spec)

    for c in result["cells"]:
        m = c["method"]
        lines.append(f"| {c['task']} | {c['seed']} | {m} | {fmt(c.get('dense'))} | {fmt(c.get(m))} | "
                     f"{fmt(c.get(m + '_int8'))} | {fmt(c.get('admm_residual') if m == 'admm' else None, '.3f')} | "
                     f"{c.get('machine') or 'not run yet'} | `{c['command']}` |")
    return "\n".join(lines) + "\n"


def render_readme_block(result: dict, out: Path) -> str:
    """The README's results table: the best-epoch rows, each with the command of its seed-0 cell on the first task."""
    task = result["tasks"][0]
    cmd = {c["method"]: c["command"] for c in result["cells"] if c["task"] == task and c["seed"] == result["seeds"][0]}
    rows = [_row(result, v) for v in VARIANTS]
    lines = [f"From `{out.with_suffix('.md')}` (`{result['command']}`, {result['date'][:10]}, {result['machine']}).",
             "", *_header(result), *rows, "", "Targets (issue 15):", "", *target_lines(result), "",
             f"Reproduce one cell of a row ({task}, seed {result['seeds'][0]}; other tasks and seeds: `--set task.name=`, "
             "`--set train.seed=`, and the run directory):", ""]
    for variant in VARIANTS:
        method = "admm" if variant.startswith("admm") else METHODS[0]
        lines.append(f"- {LABELS[variant]}: `{cmd.get(method, '')}`")
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

    table = build_table(work, args.tasks, args.seeds, argv_of)
    # the command that runs (or resumes) every cell of this table, whichever invocation wrote the report
    command = ["python", "tools/bench_accuracy.py", "--tasks", *args.tasks, "--seeds", *map(str, args.seeds)]
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
              "machine": machine_line(), "tasks": list(args.tasks), "seeds": list(args.seeds), **table}
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
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides for every cell")
    p.add_argument("--work-dir", default=WORK_DIR)
    p.add_argument("--out", default="benchmarks/accuracy_glue")
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--time-budget-min", type=float, default=None, help="start no new cell after this many minutes")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--readme", default="README.md", help="README whose accuracy_glue block is rewritten ('' for none)")
    args = p.parse_args(argv)
    work, out, start = Path(args.work_dir), Path(args.out), time.monotonic()
    failed = []
    cells = [] if args.report_only else itertools.product(args.seeds, args.tasks, METHODS)
    for seed, task, method in cells:
        if args.time_budget_min is not None and time.monotonic() - start > 60 * args.time_budget_min:
            print("time budget spent: stopping before the next cell", flush=True)
            break
        cmd = [sys.executable, "-m", "nxm_deploy.cli", "-q", *cell_argv(work, task, seed, method, args.recipe, args.set)]
        if args.glue_dir:
            cmd += ["--glue-dir", args.glue_dir]
        print(f"cell {task} seed {seed} {method}: nxm-deploy {shlex.join(cmd[3:])}", flush=True)
        rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
        if rc != 0:
            failed.append((task, seed, method, rc))
            print(f"  exit {rc}", flush=True)
        write_outputs(out, args, work)
    result = write_outputs(out, args, work)
    print(f"average: {result['average']}; wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
