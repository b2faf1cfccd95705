"""Round 2 of the ADMM pilot (``ROUND=2 tools/pilot_admm.sh TASK``), read from the stage manifests: per task and
configuration the final relative residual, the mask change at every Z/U update, the hard-projected and the kept dev
score, with the table's seed-0 rho-500 ADMM and magnitude cells as references, and the decision of the rule in
``benchmarks/PROTOCOL.md`` (best average sparse FP score among the configurations that meet the residual bound on
every task; a new one must lead rho 500 by more than 0.1).

Usage:
    .venv/bin/python tools/pilot_admm_report.py [--tasks rte mrpc stsb] [--out benchmarks/admm_pilot_round2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import TASKS, WORK_DIR_V1, run_dir, score  # noqa: E402  (the table's score; v1's cells)

from nxm_deploy.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from nxm_deploy.run.layout import RunLayout  # noqa: E402
from nxm_deploy.machine import machine_line  # noqa: E402


def _round2(name: str):
    """The run directory of configuration ``name`` for a task, as ``ROUND=2 tools/pilot_admm.sh`` writes it."""
    return lambda task: Path("runs/pilot") / task / "round2" / name


#: configuration -> (its run directory for a task, what it is); the first is the incumbent of the rule
CONFIGS = {
    "rho500_epoch": (_round2("rho500_epoch"), "rho 500 constant (round 1's choice)"),
    "rho200_epoch": (_round2("rho200_epoch"), "rho 200 constant"),
    "rho100x3_epoch": (_round2("rho100x3_epoch"), "rho 100, 300, 900"),
    "magnitude": (lambda t: run_dir(Path(WORK_DIR_V1), t, 0, "magnitude"),
                  "one-shot magnitude (the table's cell), for reference"),
}
RESIDUAL_BOUND = 0.05
LEAD = 0.1


def read(task: str, run: Path) -> dict | None:
    """The numbers of one sparse stage, or None when it has not finished."""
    manifest = RunLayout(run).stage_manifest("admm")
    if not manifest.is_file():
        return None
    m = json.loads(manifest.read_text())
    history = m.get("admm_history") or []
    return {"score": score(task, m.get("metrics")),
            "projected": score(task, m.get("metrics_after_projection")),
            "residual": history[-1]["relative_residual"] if history else None,
            "mask_change": [h.get("mask_change") for h in history],
            "rho": [h.get("rho") for h in history]}


def decide(results: dict, tasks) -> tuple[str | None, str]:
    """The configuration the rule keeps and why (None while a configuration lacks a task)."""
    admm = [c for c in CONFIGS if c != "magnitude"]
    if any(results[c][t] is None for c in admm for t in tasks):
        return None, "not decided: a configuration has not run on every task"
    eligible = {c: statistics.fmean(results[c][t]["score"] for t in tasks) for c in admm
                if all(results[c][t]["residual"] is not None and results[c][t]["residual"] <= RESIDUAL_BOUND
                       for t in tasks)}
    incumbent = admm[0]
    if not eligible:
        return None, "no configuration meets the residual bound on every task"
    best = max(eligible, key=eligible.get)
    if best != incumbent and incumbent in eligible and eligible[best] - eligible[incumbent] <= LEAD:
        return incumbent, f"{best} leads by {eligible[best] - eligible[incumbent]:.2f}, not more than {LEAD}"
    return best, f"best average among those within the bound ({', '.join(f'{c} {v:.2f}' for c, v in eligible.items())})"


def render(results: dict, tasks, decision) -> str:
    def f(v, spec=".2f"):
        return "–" if v is None else format(v, spec)

    lines = ["# ADMM pilot, round 2 (seed 0, from the table's dense models)", "",
             "Command: `ROUND=2 tools/pilot_admm.sh TASK` per task, then `python tools/pilot_admm_report.py`  ",
             f"Date (UTC): {dt.datetime.now(dt.timezone.utc):%Y-%m-%d}  ", f"Machine: {machine_line()}", "",
             "Score 0-100 as in the accuracy table (MRPC mean of F1 and accuracy, STS-B mean of Pearson and Spearman). "
             "Kept: the sparse FP model of the admm stage (best dev epoch). Projected: right after the hard 2:4 "
             "projection, before the masked fine-tune. Mask change: the fraction of mask entries that change at each "
             "Z/U update.", "",
             "| configuration | task | kept | projected | final residual | mask change per update |",
             "|---|---|---|---|---|---|"]
    averages = []
    for name, (_, what) in CONFIGS.items():
        scores = []
        for t in tasks:
            r = results[name][t]
            if r is None:
                lines.append(f"| `{name}` | {t} | not run | | | |")
                continue
            scores.append(r["score"])
            changes = ", ".join(f"{c:.1e}" for c in r["mask_change"] if c is not None) or "–"
            lines.append(f"| `{name}` | {t} | {f(r['score'])} | {f(r['projected'])} | {f(r['residual'], '.3f')} | "
                         f"{changes} |")
        averages.append(f"| `{name}`: {what} | "
                        f"{f(statistics.fmean(scores)) if len(scores) == len(tasks) else 'incomplete'} |")
    lines += ["", f"Average kept score over {', '.join(tasks)}:", "", "| configuration | average |", "|---|---|",
              *averages]
    kept, why = decision
    lines += ["", f"Rule (`benchmarks/PROTOCOL.md`, written before the runs): residual ≤ {RESIDUAL_BOUND} on every "
              f"task, then the best average kept score; a new configuration must lead rho 500 by more than {LEAD}.",
              "", f"**Kept: {kept or 'none yet'}** ({why})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--out", default="benchmarks/admm_pilot_round2")
    args = p.parse_args(argv)
    results = {name: {t: read(t, where(t)) for t in args.tasks} for name, (where, _) in CONFIGS.items()}
    decision = decide(results, args.tasks)
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"tasks": args.tasks, "results": results,
                                                 "kept": decision[0], "why": decision[1], "machine": machine_line()})
    atomic_write_text(out.with_suffix(".md"), render(results, args.tasks, decision))
    print(f"kept: {decision[0]} ({decision[1]}); wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
