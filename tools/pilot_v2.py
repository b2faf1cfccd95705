"""Pilots of accuracy protocol v2 (``benchmarks/PROTOCOL.md``, issue 30): seed 0, every cell one ``nxm-deploy`` command.

* dense: the v2 dense model of each task (seed 0), the start of every pilot cell (``--from-run``);
* P1: masked fine-tune learning rate {1e-4, 5e-5, 3e-5}, method magnitude, the sparse stage alone (sparse FP score);
* P2: QAT epochs {1, 3} x learning rate {1e-5, 3e-5} from P1's pick (deployed INT8 score, ``nxm-deploy run``);
* P3: ADMM at P1's learning rate, the incumbent schedule against early frequent Z/U updates (sparse FP score,
  final residual, share of kept positions that differ from the magnitude mask).

The rules of PROTOCOL.md are :func:`pick_p1`, :func:`pick_p2` and :func:`pick_p3`. P2 and P3 cells exist once P1 has
picked. Resumable and parallel: each ``run`` is one lane (:func:`lanes.run_lane`) that takes the next cell nobody
holds (a claim folder with its pid; a dead holder's claim is taken over) whose input run has finished, passing over
those whose input another lane is still training; a finished cell is skipped.

Usage:
    .venv/bin/python tools/pilot_v2.py run [--glue-dir DIR] [--threads 1]     # one lane; start two for two cores
    .venv/bin/python tools/pilot_v2.py report                                  # benchmarks/pilots_v2.{md,json}
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lanes  # noqa: E402  the cells' claims, shared with bench_accuracy
from bench_accuracy import DENSE, TASK_SETS, cell_argv, cell_command, nxm_argv, run_dir, score  # noqa: E402  the table's cells and score

from nxm_deploy.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from nxm_deploy.run.layout import RunLayout  # noqa: E402
from nxm_deploy.machine import machine_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/bench_accuracy.yaml"
WORK = Path("runs/acc2")
TASKS = ("rte", "mrpc", "stsb")
P1_RATES = ("1.0e-4", "5.0e-5", "3.0e-5")
P1_INCUMBENT = "1.0e-4"
P2_GRID = tuple((epochs, lr) for epochs in (1, 3) for lr in ("1.0e-5", "3.0e-5"))
P1_MARGIN, P2_TIE, P3_MARGIN, RESIDUAL_BOUND = 0.2, 0.1, 0.1, 0.05


def p3_configs(lr: str) -> dict[str, list[str]]:
    """The two ADMM schedules of P3 at learning rate ``lr``: rho scaled by 1e-4 / lr (lr x rho is the pull per step)."""
    scale = 1e-4 / float(lr)
    return {"incumbent": [f"train.admm.rho={100 * scale:g}", "train.admm.rho_factor=3", "train.admm.update_interval=epoch"],
            "early": [f"train.admm.rho={10 * scale:g}", "train.admm.rho_factor=1.5", "train.admm.update_interval=25",
                      f"train.admm.rho_max={900 * scale:g}"]}


def cell(name: str, task: str, stage: str, run_dir: Path, sets: list[str], source: Path | None) -> dict:
    head = ["train", RECIPE, "--stage", stage] if stage != "run" else ["run", RECIPE]
    argv = nxm_argv(head, run_dir, [f"name=acc2_{task}_s0_{name}", f"task.name={task}", "train.seed=0", *sets], source)
    return {"name": name, "task": task, "stage": stage, "run_dir": str(run_dir), "argv": argv,
            "source": None if source is None else str(source)}


def dense_dir(task: str) -> Path:
    """The table's dense cell of (task, seed 0): the pilots start from the dense models the table adopts."""
    return run_dir(WORK, task, 0, DENSE)


def p1_dir(task: str, lr: str) -> Path:
    return WORK / task / "seed0" / "p1" / f"magnitude_lr{lr}"


def cells() -> list[dict]:
    """Every pilot cell that can be named now (P2 and P3 once P1 has picked), in the order lanes take them."""
    out = [cell("dense", t, "dense", dense_dir(t), [], None) for t in TASKS]
    out += [cell(f"p1_magnitude_lr{lr}", t, "admm", p1_dir(t, lr),
                 ["sparsity.method=magnitude", f"train.admm.learning_rate={lr}"], dense_dir(t))
            for t in TASKS for lr in P1_RATES]
    lr = pick_p1(read_p1()).get("pick")
    if lr is None:
        return out
    out += [cell(f"p2_qat{e}ep_lr{q}", t, "run", WORK / t / "seed0" / "p2" / f"qat{e}ep_lr{q}",
                 ["sparsity.method=magnitude", f"train.admm.learning_rate={lr}", f"train.qat.epochs={e}",
                  f"train.qat.learning_rate={q}"], p1_dir(t, lr))
            for t in TASKS for e, q in P2_GRID]
    out += [cell(f"p3_admm_{name}", t, "admm", WORK / t / "seed0" / "p3" / name,
                 ["sparsity.method=admm", f"train.admm.learning_rate={lr}", *sets], dense_dir(t))
            for t in TASKS for name, sets in p3_configs(lr).items()]
    return out


def table_dense_cells() -> list[dict]:
    """The accuracy table's other dense cells (seeds 1 and 2, and SST-2-8k's three seeds): they read no pilot's pick,
    so a lane with no pilot cell to take trains them instead of waiting. Their commands are the table's own
    (:func:`bench_accuracy.cell_argv`), so the table finds them finished."""
    table_tasks = (*TASKS, *TASK_SETS)
    return [{"name": f"table_dense_s{seed}", "task": task, "stage": "dense", "source": None,
             "run_dir": str(run_dir(WORK, task, seed, DENSE)), "argv": cell_argv(WORK, task, seed, DENSE)}
            for seed in (0, 1, 2) for task in table_tasks if (task, seed) not in {(t, 0) for t in TASKS}]


def lane_cells() -> list[dict]:
    """What a lane takes, in order: the pilot cells, then the table's dense cells (P2 and P3 cells, named once P1
    picks, come before any dense cell left)."""
    return cells() + table_dense_cells()


def finished(c: dict) -> bool:
    layout = RunLayout(c["run_dir"])
    if c["stage"] == "run":
        return layout.validation.is_file()
    return layout.stage_manifest(c["stage"]).is_file()


def _manifest(run_dir, stage: str) -> dict | None:
    path = RunLayout(run_dir).stage_manifest(stage)
    return json.loads(path.read_text()) if path.is_file() else None


# -- the rules of PROTOCOL.md -------------------------------------------------------------------------------------
def read_p1() -> dict:
    """``{lr: {task: sparse FP score}}`` of the finished P1 cells."""
    out = {}
    for lr in P1_RATES:
        for task in TASKS:
            m = _manifest(p1_dir(task, lr), "admm")
            if m is not None:
                out.setdefault(lr, {})[task] = score(task, m["metrics"])
    return out


def pick_p1(results: dict) -> dict:
    """P1's rule: the highest three-task average; another rate must lead the incumbent 1e-4 by more than 0.2."""
    complete = {lr: statistics.fmean(v.values()) for lr, v in results.items() if len(v) == len(TASKS)}
    if len(complete) < len(P1_RATES):
        return {"averages": complete, "pick": None}
    best = max(complete, key=complete.get)
    pick = best if best == P1_INCUMBENT or complete[best] > complete[P1_INCUMBENT] + P1_MARGIN else P1_INCUMBENT
    return {"averages": complete, "pick": pick}


def read_p2() -> dict:
    """``{(epochs, lr): {task: deployed INT8 score}}`` of the finished P2 cells."""
    out = {}
    for c in cells():
        if not c["name"].startswith("p2_") or not finished(c):
            continue
        validation = json.loads(RunLayout(c["run_dir"]).validation.read_text())
        key = c["name"][len("p2_"):]
        out.setdefault(key, {})[c["task"]] = score(c["task"], (validation.get("metrics") or {}).get("sparse_int8"))
    return out


def pick_p2(results: dict) -> dict:
    """P2's rule: the highest average; within 0.1 of it counts as tied, and the tie goes to fewer epochs, then the
    lower rate."""
    complete = {k: statistics.fmean(v.values()) for k, v in results.items() if len(v) == len(TASKS)}
    if len(complete) < len(P2_GRID):
        return {"averages": complete, "pick": None}
    best = max(complete.values())
    tied = [f"qat{e}ep_lr{q}" for e, q in sorted(P2_GRID, key=lambda g: (g[0], float(g[1])))
            if complete[f"qat{e}ep_lr{q}"] >= best - P2_TIE]
    return {"averages": complete, "pick": tied[0]}


def read_p3() -> dict:
    """``{config: {task: {"score", "residual", "differing"}}}`` of the finished P3 cells."""
    out = {}
    for c in cells():
        if not c["name"].startswith("p3_") or not finished(c):
            continue
        m = _manifest(c["run_dir"], "admm")
        out.setdefault(c["name"][len("p3_admm_"):], {})[c["task"]] = {
            "score": score(c["task"], m["metrics"]),
            "residual": (m.get("admm_history") or [{}])[-1].get("relative_residual"),
            "differing": (m.get("mask_vs_magnitude") or {}).get("kept_positions_differing")}
    return out


def pick_p3(results: dict) -> dict:
    """P3's rule: among schedules whose final residual is <= 0.05 on every task, the highest average sparse FP score;
    the early schedule must lead the incumbent by more than 0.1."""
    complete = {k: v for k, v in results.items() if len(v) == len(TASKS)}
    if len(complete) < 2:
        return {"averages": {}, "pick": None}
    averages = {k: statistics.fmean(t["score"] for t in v.values()) for k, v in complete.items()}
    ok = [k for k, v in complete.items() if all(t["residual"] is not None and t["residual"] <= RESIDUAL_BOUND
                                                  for t in v.values())]
    if not ok:
        return {"averages": averages, "pick": None, "note": "no schedule met the residual bound"}
    pick = "incumbent" if "incumbent" in ok else ok[0]
    if "early" in ok and (pick != "early") and averages["early"] > averages["incumbent"] + P3_MARGIN:
        pick = "early"
    return {"averages": averages, "pick": pick}


# -- lanes --------------------------------------------------------------------------------------------------------
def _ready(c: dict) -> bool:
    """The cell's input run has finished the stage the cell starts from (maybe in another lane)."""
    return c["source"] is None or RunLayout(c["source"]).stage_manifest(
        "admm" if c["stage"] == "run" else "dense").is_file()


def run_lane(args) -> int:
    def run(c: dict) -> int:
        print(f"{dt.datetime.now():%H:%M:%S} start {c['task']} {c['name']}", flush=True)
        code = subprocess.call(cell_command(c["argv"], args.glue_dir, args.threads), cwd=REPO)
        print(f"{dt.datetime.now():%H:%M:%S} end {c['task']} {c['name']}: exit {code}", flush=True)
        if code != 0:
            print("command: nxm-deploy " + shlex.join(c["argv"]), flush=True)
        return code

    failed = lanes.run_lane(lane_cells, run_dir=lambda c: c["run_dir"], finished=finished, ready=_ready, run=run)
    if not failed:
        print("every pilot cell that can be named now, and every dense cell of the table, has finished", flush=True)
    return failed[0][1] if failed else 0


# -- report -------------------------------------------------------------------------------------------------------
def report(out: Path) -> dict:
    import nxm_deploy
    import torch
    import transformers

    p1, p2, p3 = read_p1(), read_p2(), read_p3()
    result = {"command": "python tools/pilot_v2.py report", "date": dt.datetime.now(dt.timezone.utc).isoformat(
                  timespec="seconds"), "machine": machine_line(),
              "versions": f"nxm-deploy {nxm_deploy.__version__}, torch {torch.__version__}, "
                          f"transformers {transformers.__version__}",
              "p1": {"scores": p1, **pick_p1(p1)}, "p2": {"scores": p2, **pick_p2(p2)},
              "p3": {"scores": p3, **pick_p3(p3)},
              "cells": [{"task": c["task"], "name": c["name"], "finished": finished(c),
                         "command": "nxm-deploy " + shlex.join(c["argv"])} for c in cells()]}
    atomic_write_json(out.with_suffix(".json"), result)

    def fmt(v, spec=".2f"):
        return "–" if v is None else format(v, spec)

    lines = ["# Protocol v2 pilots (seed 0)", "", f"Command: `{result['command']}`  ", f"Date (UTC): {result['date']}  ",
             f"Versions: {result['versions']}  ", f"Machine: {result['machine']}", "",
             "Rules: `benchmarks/PROTOCOL.md` (protocol v2, pilots), committed before these runs. Scores 0-100 as the "
             "accuracy table's.", "", "## P1: masked fine-tune learning rate (magnitude, sparse FP score)", "",
             "| lr | " + " | ".join(TASKS) + " | average |", "|---|" + "---|" * (len(TASKS) + 1)]
    for lr in P1_RATES:
        v = p1.get(lr, {})
        lines.append(f"| {lr} | " + " | ".join(fmt(v.get(t)) for t in TASKS) + f" | "
                     f"{fmt(result['p1']['averages'].get(lr))} |")
    lines += ["", f"Pick: {result['p1']['pick'] or 'not yet (cells missing)'}", "",
              "## P2: QAT budget (deployed INT8 score)", "", "| QAT | " + " | ".join(TASKS) + " | average |",
              "|---|" + "---|" * (len(TASKS) + 1)]
    for e, q in P2_GRID:
        key = f"qat{e}ep_lr{q}"
        v = p2.get(key, {})
        lines.append(f"| {key} | " + " | ".join(fmt(v.get(t)) for t in TASKS) + f" | "
                     f"{fmt(result['p2']['averages'].get(key))} |")
    lines += ["", f"Pick: {result['p2']['pick'] or 'not yet'}", "", "## P3: ADMM schedule (sparse FP score, final "
              "residual, kept positions differing from magnitude)", "",
              "| schedule | " + " | ".join(TASKS) + " | average |", "|---|" + "---|" * (len(TASKS) + 1)]
    for name, v in p3.items():
        row = [f"{fmt(x['score'])} / {fmt(x['residual'], '.3f')} / {fmt(x['differing'], '.4f')}" if x else "–"
               for x in (v.get(t) for t in TASKS)]
        lines.append(f"| {name} | " + " | ".join(row) + f" | {fmt(result['p3']['averages'].get(name))} |")
    lines += ["", f"Pick: {result['p3']['pick'] or 'not yet'}", "", "## Cells", "", "| task | cell | finished | command |",
              "|---|---|---|---|"]
    lines += [f"| {c['task']} | {c['name']} | {'yes' if c['finished'] else 'no'} | `{c['command']}` |"
              for c in result["cells"]]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one lane: run the next free cell until none is left")
    r.add_argument("--glue-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    r.add_argument("--threads", type=int, default=1, help="torch threads of each cell (one lane per core)")
    p = sub.add_parser("report", help="write benchmarks/pilots_v2.{md,json}")
    p.add_argument("--out", default="benchmarks/pilots_v2")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    if args.command == "run":
        return run_lane(args)
    report(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
