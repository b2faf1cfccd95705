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

from nxm_deploy.fileio import atomic_write_json, atomic_write_text
from nxm_deploy.layout import RunLayout
from nxm_deploy.machine import machine_line

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/bench_accuracy.yaml"
TASKS = ("rte", "mrpc", "stsb")
METHODS = ("magnitude", "admm")
VARIANTS = ("dense", "magnitude", "admm", "magnitude_int8", "admm_int8")
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
    """The 0-100 score of one metrics dict (None when missing or undefined)."""
    if not metrics:
        return None
    keys = SCORE.get(task)
    values = [metrics.get(k) for k in keys] if keys else [next(iter(metrics.values()))]
    if any(v is None or v != v for v in values):
        return None
    return 100.0 * sum(values) / len(values)


def read_cell(work: Path, task: str, seed: int, method: str) -> dict | None:
    """The numbers of one finished cell, or None."""
    layout = RunLayout(run_dir(work, task, seed, method))
    if not layout.validation.is_file() or not layout.stage_manifest("admm").is_file():
        return None
    validation = json.loads(layout.validation.read_text())
    sparse = json.loads(layout.stage_manifest("admm").read_text())
    metrics = validation.get("metrics") or {}
    return {"dense": score(task, metrics.get("dense_fp32")), method: score(task, sparse.get("metrics")),
            f"{method}_int8": score(task, metrics.get("sparse_int8")),
            "admm_residual": (sparse.get("admm_history") or [{}])[-1].get("relative_residual"),
            "machine": validation.get("machine")}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def build_table(work: Path, tasks, seeds, argv_of) -> dict:
    """Cells, per-task mean ± std and the average over tasks of every variant (complete variants only)."""
    cells, per_task = [], {}
    for task in tasks:
        values = {v: [] for v in VARIANTS}
        for seed in seeds:
            for method in METHODS:
                cell = read_cell(work, task, seed, method)
                command = "nxm-deploy " + shlex.join(argv_of(task, seed, method))
                cells.append({"task": task, "seed": seed, "method": method, "command": command,
                              "finished": cell is not None, **(cell or {})})
                if cell is None:
                    continue
                for variant in (method, f"{method}_int8") + (("dense",) if method == METHODS[0] else ()):
                    if cell.get(variant) is not None:
                        values[variant].append(cell[variant])
        per_task[task] = {v: _mean_std(vals) for v, vals in values.items() if vals}
    average = {}
    for variant in VARIANTS:
        rows = [per_task[t].get(variant) for t in tasks]
        if all(r is not None and r["n"] == len(seeds) for r in rows):
            average[variant] = statistics.fmean(r["mean"] for r in rows)
    return {"cells": cells, "per_task": per_task, "average": average}


def render_markdown(result: dict) -> str:
    tasks, per_task, average = result["tasks"], result["per_task"], result["average"]
    lines = ["# Accuracy: dense vs 2:4 magnitude vs 2:4 ADMM, each + INT8 QAT (MiniLM-L6, GLUE dev)", "",
             f"Command: `{result['command']}`  ", f"Date (UTC): {result['date']}  ", f"Versions: {result['versions']}  ",
             f"Machine: {result['machine']}", "",
             "Protocol: `benchmarks/PROTOCOL.md`; base recipe `recipes/bench_accuracy.yaml`. Score 0-100 (MRPC: mean of "
             "F1 and accuracy; STS-B: mean of Pearson and Spearman). INT8 columns: the exported 2:4 INT8 ONNX model "
             "under ONNX Runtime; dense: the dense FP32 ONNX model of the same run.", "",
             "| variant | " + " | ".join(tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
    for variant in VARIANTS:
        cells = []
        for task in tasks:
            s = per_task.get(task, {}).get(variant)
            cells.append("–" if s is None else f"{s['mean']:.2f} ± {s['std']:.2f} (n={s['n']})")
        avg = average.get(variant)
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {'incomplete' if avg is None else f'{avg:.2f}'} |")
    done = [c for c in result["cells"] if c["finished"]]
    lines += ["", f"{len(done)} of {len(result['cells'])} cells finished. Reproduce one cell (the line of the table "
              "it feeds):", ""]
    lines += [f"- {c['task']} seed {c['seed']} {c['method']}{'' if c['finished'] else ' (not run yet)'}: "
              f"`{c['command']}`" for c in result["cells"]]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, args, work: Path) -> dict:
    import nxm_deploy
    import torch
    import transformers

    def argv_of(task, seed, method):
        return cell_argv(work, task, seed, method, args.recipe, args.set)

    table = build_table(work, args.tasks, args.seeds, argv_of)
    result = {"command": "python tools/bench_accuracy.py " + shlex.join(sys.argv[1:]),
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, python "
                          f"{platform.python_version()}, nxm_deploy {nxm_deploy.__version__}",
              "machine": machine_line(), "tasks": list(args.tasks), "seeds": list(args.seeds), **table}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), render_markdown(result))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides for every cell")
    p.add_argument("--work-dir", default="runs/bench_accuracy")
    p.add_argument("--out", default="benchmarks/accuracy_glue")
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--time-budget-min", type=float, default=None, help="start no new cell after this many minutes")
    p.add_argument("--report-only", action="store_true")
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
