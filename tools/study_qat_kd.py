"""KD in QAT: which teacher and which KD weights make INT8 QAT + KD beat plain QAT at the same epochs (issue 15,
item 3). A thin driver of the public CLI, on top of the accuracy table's ADMM cells (tools/bench_accuracy.py).

Every variant is the ADMM cell of ``recipes/bench_accuracy.yaml`` with QAT overrides; it adopts that cell's dense and
sparse models (``--from-run``, checked by hash), so only QAT, export and validation run:

    nxm-deploy run recipes/bench_accuracy.yaml --run-dir <work>/<task>/seed<k>/<variant> --set name=qatkd_... \\
        --set task.name=<task> --set train.seed=<k> --set train.admm.method=admm <variant overrides> \\
        --from-run runs/bench_accuracy/<task>/seed<k>/admm

Each variant sets its QAT loss in full (``distill``, ``teacher``, ``distillation``), so its meaning does not move
with the recipe. The variant whose QAT settings equal the recipe's is the table's configuration: its row is the
table's ADMM cell itself, read, not rerun. Numbers: the QAT model in PyTorch (fake-quant) and the deployed 2:4 INT8
ONNX model under ONNX Runtime, on the full dev set; score as in bench_accuracy; the average over tasks decides the
table's QAT loss (benchmarks/PROTOCOL.md: chosen on seed 0, then fixed).

Usage:
    .venv/bin/python tools/study_qat_kd.py --tasks mrpc --seeds 0 [--glue-dir ../shared/data/glue]
    .venv/bin/python tools/study_qat_kd.py --tasks mrpc --seeds 0 --report-only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from bench_accuracy import RECIPE, WORK_DIR_V1, cell_argv, run_dir as table_run_dir, score  # the table's cells and score (tools/)

from nxm_deploy.config.recipe import load_recipe
from nxm_deploy.fileio import atomic_write_json, atomic_write_text
from nxm_deploy.run.layout import RunLayout
from nxm_deploy.machine import machine_line

#: variant -> QAT overrides on top of the table's recipe (the loss in full; ``distillation=null``: train.distillation)
VARIANTS = {
    "no_kd": ("train.qat.distill=false", "train.qat.distillation=null"),
    "kd_sparse": ("train.qat.distill=true", "train.qat.teacher=sparse", "train.qat.distillation=null"),
    "kd_dense": ("train.qat.distill=true", "train.qat.teacher=dense", "train.qat.distillation=null"),
    "kd_logits_only": ("train.qat.distill=true", "train.qat.teacher=sparse",
                       "train.qat.distillation={alpha: 1.0, beta: 10.0, gamma: 0.0, temperature: 2.0}"),
    "ptq_only": ("train.qat.epochs=0",),
}
LABELS = {"no_kd": "plain QAT, task loss only",
          "kd_sparse": "QAT + KD, teacher sparse FP, alpha 1 beta 10 gamma 1 (GPUSQ-TLM)",
          "kd_dense": "QAT + KD, teacher dense FP, alpha 1 beta 10 gamma 1",
          "kd_logits_only": "QAT + KD, teacher sparse FP, no feature term (gamma 0)",
          "ptq_only": "no QAT: the calibrated model (percentile scales), exported as is"}


def reference_variant(recipe: str = RECIPE, sets=()) -> str | None:
    """The variant whose QAT settings equal the recipe's (with the table's ``sets``): the table's configuration."""
    qat = load_recipe(recipe, sets).to_dict()["train"]["qat"]
    return next((v for v, extra in VARIANTS.items()
                 if load_recipe(recipe, [*sets, *extra]).to_dict()["train"]["qat"] == qat), None)


def qat_budget(sets=(), recipe: str = RECIPE) -> str:
    """The QAT epochs and learning rate every variant trains with (the recipe's, with the table's ``sets``)."""
    qat = load_recipe(recipe, sets).train.qat
    return f"{qat.epochs:g} epoch{'s' if qat.epochs != 1 else ''}, lr {qat.learning_rate:g}"


def variant_dir(work: Path, table: Path, task: str, seed: int, variant: str, reference: str | None) -> Path:
    if variant == reference:
        return table_run_dir(table, task, seed, "admm")
    return work / task / f"seed{seed}" / variant


def variant_argv(work: Path, table: Path, task: str, seed: int, variant: str, reference: str | None,
                 sets=()) -> list[str]:
    """The ``nxm-deploy`` arguments of one variant (the reference: the table's ADMM cell's own command); ``sets``:
    the overrides the table's cells were given."""
    if variant == reference:
        return cell_argv(table, task, seed, "admm", sets=sets)
    argv = ["run", RECIPE, "--run-dir", str(variant_dir(work, table, task, seed, variant, reference)),
            "--set", f"name=qatkd_{task}_s{seed}_{variant}", "--set", f"task.name={task}", "--set", f"train.seed={seed}",
            "--set", "train.admm.method=admm"]
    for item in (*sets, *VARIANTS[variant]):
        argv += ["--set", item]
    return argv + ["--from-run", str(table_run_dir(table, task, seed, "admm"))]


def read_variant(path: Path, task: str) -> dict | None:
    layout = RunLayout(path)
    if not layout.validation.is_file() or not layout.stage_manifest("qat").is_file():
        return None
    qat = json.loads(layout.stage_manifest("qat").read_text())
    metrics = json.loads(layout.validation.read_text()).get("metrics") or {}
    return {"qat_pytorch": score(task, qat.get("metrics")), "int8_onnx": score(task, metrics.get("sparse_int8")),
            "dense": score(task, metrics.get("dense_fp32")), "kd_teacher": qat.get("kd_teacher"),
            "kd_weights": qat.get("kd_weights")}


def build(work: Path, table: Path, tasks, seeds, reference: str | None, sets=()) -> dict:
    """Every variant's cells and rows; ``reference``: :func:`reference_variant` (its row is the table's cell)."""
    cells, rows = [], {}
    for task in tasks:
        for variant in VARIANTS:
            values = {"qat_pytorch": [], "int8_onnx": []}
            for seed in seeds:
                got = read_variant(variant_dir(work, table, task, seed, variant, reference), task)
                argv = variant_argv(work, table, task, seed, variant, reference, sets)
                cells.append({"task": task, "seed": seed, "variant": variant, "finished": got is not None,
                              "command": "nxm-deploy " + shlex.join(argv), **(got or {})})
                for key in values:
                    if got and got.get(key) is not None:
                        values[key].append(got[key])
            rows.setdefault(task, {})[variant] = {k: statistics.fmean(v) if v else None for k, v in values.items()}
            rows[task][variant]["n"] = len(values["int8_onnx"])
    # the deployed score averaged over tasks, only where every (task, seed) of the variant finished
    average = {v: (statistics.fmean(rows[t][v]["int8_onnx"] for t in tasks)
                   if all(rows[t][v]["n"] == len(seeds) for t in tasks) else None) for v in VARIANTS}
    return {"reference": reference, "cells": cells, "rows": rows, "average": average}


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def render(result: dict) -> str:
    reference = result["reference"]
    lines = ["# KD in INT8 QAT: teacher and weights (MiniLM-L6, 2:4 ADMM, GLUE dev)", "",
             f"Command: `{result['command']}`  ", f"Date (UTC): {result['date']}  ", f"Machine: {result['machine']}", "",
             "Every variant starts from the same ADMM 2:4 model (the accuracy table's ADMM cell) and trains QAT for the "
             f"same epochs (`recipes/bench_accuracy.yaml`: {result['qat_budget']}). Score 0-100 as in "
             "`benchmarks/accuracy_glue.md`; Δ against plain QAT. The table's configuration today: "
             f"{LABELS[reference] if reference else 'none of these variants'} (its row is the table's ADMM cell).", "",
             "## Average over tasks (deployed INT8)", "", "| variant | " + " | ".join(result["rows"]) + " | average |",
             "|---|" + "---|" * (len(result["rows"]) + 1)]
    for variant in VARIANTS:
        per_task = [_fmt(result["rows"][t][variant]["int8_onnx"]) for t in result["rows"]]
        lines.append(f"| {LABELS[variant]} | " + " | ".join(per_task) + f" | {_fmt(result['average'][variant])} |")
    lines.append("")
    for task, variants in result["rows"].items():
        base = variants["no_kd"]["int8_onnx"]
        lines += [f"## {task}", "", "| variant | n | QAT (PyTorch fake-quant) | deployed INT8 (ONNX Runtime) | Δ vs plain QAT |",
                  "|---|---|---|---|---|"]
        for variant, row in variants.items():
            delta = "–" if base is None or row["int8_onnx"] is None else f"{row['int8_onnx'] - base:+.2f}"
            mark = " (the table's)" if variant == reference else ""
            lines.append(f"| {LABELS[variant]}{mark} | {row['n']} | {_fmt(row['qat_pytorch'])} | "
                         f"{_fmt(row['int8_onnx'])} | {delta} |")
        lines.append("")
    lines += ["Cells (the command that reproduces each):", ""]
    lines += [f"- {c['task']} seed {c['seed']} {c['variant']}{'' if c['finished'] else ' (not run yet)'}: `{c['command']}`"
              for c in result["cells"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["mrpc"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--work-dir", default="runs/qat_kd")
    p.add_argument("--table-dir", default=WORK_DIR_V1, help="work dir of tools/bench_accuracy.py")
    p.add_argument("--out", default="benchmarks/qat_kd")
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="variants to run (all reported; the table's own is read from its cell, not run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more overrides for every variant (as given to the table's cells)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    work, table, out = Path(args.work_dir), Path(args.table_dir), Path(args.out)
    failed, reference = 0, reference_variant(sets=args.set)
    for task in args.tasks:
        for seed in args.seeds:
            if not RunLayout(table_run_dir(table, task, seed, "admm")).validation.is_file():
                print(f"{task} seed {seed}: the table's ADMM cell has not finished; skipped", flush=True)
                continue
            for variant in [] if args.report_only else [v for v in args.variants if v != reference]:
                cmd = [sys.executable, "-m", "nxm_deploy.cli", "-q",
                       *variant_argv(work, table, task, seed, variant, reference, args.set)]
                if args.glue_dir:
                    cmd += ["--glue-dir", args.glue_dir]
                print(f"{task} seed {seed} {variant}: nxm-deploy {shlex.join(cmd[4:])}", flush=True)
                rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
                failed += rc != 0
    # the command that runs (or resumes) every variant of this report, whichever invocation wrote it
    command = ["python", "tools/study_qat_kd.py", "--tasks", *args.tasks, "--seeds", *map(str, args.seeds)]
    for item in args.set:
        command += ["--set", item]
    result = {"command": shlex.join(command),
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine_line(),
              "qat_budget": qat_budget(args.set),
              **build(work, table, args.tasks, args.seeds, reference, args.set)}
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), render(result))
    print(f"wrote {out.with_suffix('.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
