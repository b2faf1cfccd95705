"""The Trainer-based training stack against the hand-written loop it replaced, measured in one run.

Both stacks train the same recipe's dense stage (each its own), sparse stage (``nxm-deploy train RUN_DIR --stage admm``: ADMM epochs, hard
projection, masked fine-tune, KD from the dense model) and its QAT stage (these two from one shared dense model), in separate
processes on this machine, one after the other (order alternated per repeat). The baseline is the package at a git
revision that still has ``nxm_deploy/training/loop.py`` (default ``979b1c1``), checked out as a git worktree under
``--work``; the candidate is this checkout. The shared dense model is trained once by the baseline.

Reported per stack: optimizer steps, training seconds as each stack reports them (``train_loop``'s ``seconds``,
the Trainer's ``train_runtime``; both include the dev evaluations inside training), the stage's wall time
(process start to exit: model loading, data, every evaluation), steps per second on both, and the dev metrics
(after the hard projection, the sparse model, PTQ, QAT). Target, printed as PASS/MISS: candidate / baseline steps
per second >= 0.9 on the sparse stage.

Writes ``benchmarks/trainer_migration.{json,md}`` (``--out``).

Usage:
    .venv/bin/python tools/bench_trainer_migration.py --glue-dir ../shared/data/glue
        [--recipe recipes/minilm_mrpc_2of4_int8.yaml] [--baseline-ref 979b1c1] [--work /tmp/trainer_migration]
        [--repeats 1] [--stages admm qat]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nxm_deploy.machine import machine  # noqa: E402
from nxm_deploy.run.layout import RunLayout  # noqa: E402

TARGET_RATIO = 0.9
PREPARE = ("import sys; from nxm_deploy.config.recipe import load_recipe; from nxm_deploy.pipeline import "
           "prepare_run_dir; prepare_run_dir(load_recipe(sys.argv[1]), sys.argv[2], overwrite=True)")


def _run(tree: Path, args: list[str], log_path: Path) -> float:
    """Run ``python args`` with ``tree`` first on the import path; returns the wall seconds; raises on failure."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, *args], cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(args)} in {tree} exited {proc.returncode}; see {log_path}")
    return seconds


def _worktree(ref: str, work: Path) -> Path:
    tree = work / f"baseline-{ref}"
    if not (tree / "nxm_deploy").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-f", "--detach", str(tree), ref], check=True,
                       capture_output=True)
    if not (tree / "nxm_deploy" / "training" / "loop.py").is_file():
        raise SystemExit(f"error: {ref} has no nxm_deploy/training/loop.py: it is not the hand-written loop.")
    return tree


def _rev(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def _stage_numbers(manifest: dict, stage: str) -> dict:
    if stage == "dense":  # the baseline's stats are at the top level of the dense manifest, as the Trainer's
        loops = [manifest]
        out = {}
    elif stage == "admm":
        loops = [manifest.get("train"), manifest.get("masked_finetune")]
        out = {"metrics_after_projection": manifest.get("metrics_after_projection")}
    else:
        loops = [manifest.get("train")]
        out = {"ptq_metrics": manifest.get("ptq_metrics")}
    loops = [loop for loop in loops if loop]
    steps = sum(int(loop["steps"]) - int(loop.get("resumed_from_step") or 0) for loop in loops)
    seconds = sum(float(loop["seconds"]) for loop in loops)
    return {**out, "metrics": manifest["metrics"], "steps": steps, "train_seconds": round(seconds, 2),
            "steps_per_s": steps / seconds if seconds else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/minilm_mrpc_2of4_int8.yaml")
    p.add_argument("--glue-dir", required=True)
    p.add_argument("--baseline-ref", default="979b1c1", help="git revision with the hand-written training loop")
    p.add_argument("--work", default="/tmp/trainer_migration", help="worktree and run directories")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--stages", nargs="+", default=["dense", "admm", "qat"], choices=["dense", "admm", "qat"],
                   help="dense: each stack fine-tunes its own dense model too (its metrics and speed; the sparse "
                   "and QAT stages of both start from the one shared dense model)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "trainer_migration"))
    args = p.parse_args()

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe = (REPO / args.recipe).resolve() if not Path(args.recipe).is_absolute() else Path(args.recipe)
    glue = str(Path(args.glue_dir).resolve())
    trees = {"baseline": _worktree(args.baseline_ref, work), "trainer": REPO}
    cli = ["-m", "nxm_deploy.cli.main"]

    dense_run = work / "dense_run"
    if not RunLayout(dense_run).stage_manifest("dense").is_file():
        print(f"dense stage (baseline, shared by both stacks) -> {dense_run}", flush=True)
        _run(trees["baseline"], ["-c", PREPARE, str(recipe), str(dense_run)], work / "dense_prepare.log")
        _run(trees["baseline"], cli + ["train", str(dense_run), "--stage", "dense", "--glue-dir", glue],
             work / "dense.log")
    dense_metrics = json.loads(RunLayout(dense_run).stage_manifest("dense").read_text())["metrics"]

    results: dict[str, list] = {"baseline": [], "trainer": []}
    for rep in range(args.repeats):
        order = ("baseline", "trainer") if rep % 2 == 0 else ("trainer", "baseline")
        for impl in order:
            tree, run_dir = trees[impl], work / f"{impl}_{rep}"
            _run(tree, ["-c", PREPARE, str(recipe), str(run_dir)], work / f"{impl}_{rep}_prepare.log")
            shutil.copytree(RunLayout(dense_run).stage_dir("dense"), RunLayout(run_dir).stage_dir("dense"),
                            dirs_exist_ok=True)
            cell = {"repeat": rep}
            if "dense" in args.stages:  # each stack also fine-tunes its own dense model (metrics and speed only)
                dense_dir = work / f"{impl}_{rep}_dense"
                _run(tree, ["-c", PREPARE, str(recipe), str(dense_dir)], work / f"{impl}_{rep}_dense_prepare.log")
                print(f"repeat {rep}: {impl} dense ...", flush=True)
                wall = _run(tree, cli + ["train", str(dense_dir), "--stage", "dense", "--glue-dir", glue],
                            work / f"{impl}_{rep}_dense.log")
                numbers = _stage_numbers(json.loads(RunLayout(dense_dir).stage_manifest("dense").read_text()), "dense")
                numbers.update(wall_seconds=round(wall, 1), steps_per_s_wall=numbers["steps"] / wall)
                cell["dense"] = numbers
                print(f"  {impl} dense: {numbers['steps']} steps, {numbers['train_seconds']} s training, "
                      f"{wall:.0f} s wall, dev {numbers['metrics']}", flush=True)
            for stage in [s for s in args.stages if s != "dense"]:
                print(f"repeat {rep}: {impl} {stage} ...", flush=True)
                wall = _run(tree, cli + ["train", str(run_dir), "--stage", stage, "--glue-dir", glue],
                            work / f"{impl}_{rep}_{stage}.log")
                numbers = _stage_numbers(json.loads(RunLayout(run_dir).stage_manifest(stage).read_text()), stage)
                numbers["wall_seconds"] = round(wall, 1)
                numbers["steps_per_s_wall"] = numbers["steps"] / wall
                cell[stage] = numbers
                print(f"  {impl} {stage}: {numbers['steps']} steps, {numbers['train_seconds']} s training, "
                      f"{wall:.0f} s wall, dev {numbers['metrics']}", flush=True)
            results[impl].append(cell)

    def mean(impl, stage, key):
        values = [c[stage][key] for c in results[impl] if c.get(stage) and c[stage].get(key) is not None]
        return sum(values) / len(values) if values else None

    ratios = {}
    for stage in args.stages:
        for key in ("steps_per_s", "steps_per_s_wall"):
            base, new = mean("baseline", stage, key), mean("trainer", stage, key)
            ratios[f"{stage}_{key}"] = new / base if base and new else None
    headline = ratios.get("admm_steps_per_s")
    report = {
        "command": "python tools/bench_trainer_migration.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "recipe": args.recipe,
        "baseline": {"ref": args.baseline_ref, "rev": _rev(trees["baseline"]), "what": "nxm_deploy/training/loop.py"},
        "trainer": {"rev": _rev(REPO), "what": "transformers.Trainer (nxm_deploy/training/trainer.py)"},
        "versions": _versions(), "dense_metrics": dense_metrics, "results": results, "ratios": ratios,
        "target": {"ratio": TARGET_RATIO, "value": headline,
                   "verdict": None if headline is None else ("PASS" if headline >= TARGET_RATIO else "MISS")},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(report, args.stages))
    print(out.with_suffix(".md").read_text())
    return 0


def _versions() -> dict:
    import accelerate
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def _fmt(metrics: dict | None) -> str:
    if not metrics:
        return "-"
    return ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items())


def _markdown(r: dict, stages: list[str]) -> str:
    v = r["versions"]
    lines = [
        "# Training stack migration: transformers.Trainer vs the hand-written loop",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}  ",
        f"Machine: {r['machine']['line']}  ",
        f"Versions: torch {v['torch']}, transformers {v['transformers']}, accelerate {v['accelerate']}  ",
        f"Recipe: `{r['recipe']}` (same seed); baseline `{r['baseline']['rev']}` (`{r['baseline']['what']}`), "
        f"candidate `{r['trainer']['rev']}` ({r['trainer']['what']})  ",
        f"Shared dense model (trained by the baseline): dev {_fmt(r['dense_metrics'])}",
        "",
        f"**Target: Trainer / loop steps per second on the sparse stage >= {r['target']['ratio']}: "
        f"{r['target']['value']:.3f} -> {r['target']['verdict']}**",
        "",
        "| stack | repeat | stage | steps | training s | wall s | steps/s (training) | steps/s (wall) | dev metrics |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for impl in ("baseline", "trainer"):
        for cell in r["results"][impl]:
            for stage in stages:
                n = cell[stage]
                extra = {"admm": f"after projection: {_fmt(n.get('metrics_after_projection'))}; ",
                         "qat": f"PTQ: {_fmt(n.get('ptq_metrics'))}; "}.get(stage, "")
                lines.append(f"| {impl} | {cell['repeat']} | {stage} | {n['steps']} | {n['train_seconds']:.1f} | "
                             f"{n['wall_seconds']:.1f} | {n['steps_per_s']:.3f} | {n['steps_per_s_wall']:.3f} | "
                             f"{extra}final: {_fmt(n['metrics'])} |")
    lines += ["", "Ratios (Trainer / loop, mean over repeats):", ""]
    lines += [f"- {k}: {val:.3f}" for k, val in r["ratios"].items() if val is not None]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
