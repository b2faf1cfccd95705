"""INT8 quantizer groups (``train.qat.quantizers``): what INT8 GEMM outputs and INT8 attention cost in accuracy.

A thin driver of the public CLI. Per task (MRPC and STS-B by default, one seed):

1. base run: ``nxm-deploy train recipes/bench_quantizer_groups.yaml --set task.name=T --runs-root ROOT/T
   --stage dense`` then ``--stage admm`` on that run (pretrained MiniLM, dense fine-tune, one-shot magnitude 2:4 +
   masked fine-tune with KD: the sparse FP model that ``benchmarks/qat_glue.md`` starts from);
2. one cell per quantizer group: the same recipe with ``--set name=<cell> --set train.qat.quantizers.gemm_outputs=..
   --set train.qat.quantizers.attention=..`` and ``--stage qat --from-run <base run>`` (the base's dense and sparse
   stages are copied, checked by hash). The QAT manifest gives the PTQ dev metric (calibration only) and the QAT
   + KD dev metric; the cell JSON records the exact command;
3. ORT CPU latency of the exported graphs: ``nxm-deploy export`` of the ``inputs_weights`` cell (the graph before
   the groups existed) and of the default cell, then the Q/DQ graphs and the CPU INT8 artifacts of both, timed in
   one process, interleaved (:func:`nxm_deploy.timing.measure_ab`).

Writes ``benchmarks/qat_quantizer_groups.{md,json}`` and ``benchmarks/qat_quantizer_groups_cells/``. Cells are
resumable: a cell whose JSON exists is read, not rerun.

Usage:
    .venv/bin/python tools/bench_quantizer_groups.py --glue-dir ../shared/data/glue [--tasks mrpc stsb]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_accuracy import score, score_definition  # noqa: E402  (tools' score convention)
from nxm_deploy.fileio import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from nxm_deploy.machine import machine  # noqa: E402
from nxm_deploy.run.layout import CPU_INT8_ONNX, SPARSE_ONNX, RunLayout  # noqa: E402

RECIPE = "recipes/bench_quantizer_groups.yaml"
#: cell -> (gemm_outputs, attention); "inputs_weights" is the graph before the groups existed.
CELLS = {"inputs_weights": (False, False), "gemm_outputs": (True, False), "attention": (False, True),
         "both": (True, True)}
DEFAULT_CELL = "both"  # the recipe default (QuantizerGroupsConfig)
WHAT = {
    "inputs_weights": "inputs + weights of the n:m GEMMs (the graph before this benchmark)",
    "gemm_outputs": "+ an output quantizer after every n:m GEMM",
    "attention": "+ INT8 attention matmuls (Q, K, softmax, V)",
    "both": "+ GEMM outputs + INT8 attention (TensorRT's sparse INT8 layout)",
}


def cli(*args: str, log: Path) -> list[str]:
    """Run ``nxm-deploy ARGS`` (the installed console script's module), output appended to ``log``."""
    cmd = [sys.executable, "-m", "nxm_deploy.cli.main", *args]
    with log.open("a") as fh:
        fh.write(f"$ nxm-deploy {shlex.join(args)}\n")
        fh.flush()
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    return cmd


def base_run(root: Path, task: str, glue: list[str], log: Path) -> tuple[Path, list[list[str]]]:
    """The task's dense + sparse run (trained once); returns its directory and the commands that make it.

    ``root`` is relative to the repository root (the commands run there), so the commands can be published."""
    run = root / task / "bench_quantizer_groups"
    cmds = [["train", RECIPE, "--set", f"task.name={task}", "--runs-root", str(root / task), "--stage", "dense", *glue],
            ["train", str(run), "--stage", "admm"]]
    if not RunLayout(REPO / run).stage_manifest("admm").is_file():
        if not RunLayout(REPO / run).stage_manifest("dense").is_file():
            cli(*cmds[0], log=log)
        cli(*cmds[1], log=log)
    return run, cmds


def cell_args(root: Path, task: str, cell: str, base: Path, glue: list[str]) -> list[str]:
    gemm_outputs, attention = CELLS[cell]
    return ["train", RECIPE, "--set", f"task.name={task}", "--set", f"name={cell}",
            "--set", f"train.qat.quantizers.gemm_outputs={str(gemm_outputs).lower()}",
            "--set", f"train.qat.quantizers.attention={str(attention).lower()}",
            "--runs-root", str(root / task), "--stage", "qat", "--from-run", str(base), *glue]


def run_cell(root: Path, task: str, cell: str, base: Path, glue: list[str], cells_dir: Path, log: Path) -> dict:
    path = cells_dir / f"{task}__{cell}.json"
    if path.is_file():
        return read_json(path)
    args = cell_args(root, task, cell, base, glue)
    start = time.perf_counter()
    cli(*args, log=log)
    layout = RunLayout(REPO / root / task / cell)
    qat = read_json(layout.stage_manifest("qat"))
    quant = read_json(layout.quant_info())
    sparse = read_json(RunLayout(REPO / base).stage_manifest("admm"))
    result = {
        "task": task, "cell": cell, "quantizers": dict(zip(("gemm_outputs", "attention"), CELLS[cell])),
        "command": "nxm-deploy " + shlex.join(args),
        "sparse_fp": {"metrics": sparse["metrics"], "score": score(task, sparse["metrics"])},
        "ptq": {"metrics": qat["ptq_metrics"], "score": score(task, qat["ptq_metrics"])},
        "qat_kd": {"metrics": qat["metrics"], "score": score(task, qat["metrics"])},
        "placement": {k: len(v) for k, v in quant["placement"].items() if isinstance(v, list)},
        "mask_violations": 0 if qat["mask_check"].get("ok", True) else None,
        "train": qat.get("train"), "minutes": round((time.perf_counter() - start) / 60, 2),
    }
    atomic_write_json(path, result)
    return result


def latency(root: Path, task: str, cells: list[str], runs: int, threads: int, log: Path) -> dict:
    """Export each cell's run and time its Q/DQ graph and CPU INT8 artifact in one process (batch 1 and 32)."""
    import numpy as np

    from nxm_deploy.timing import measure_ab
    from nxm_deploy.runtimes.onnxruntime import OnnxRuntimeRunner

    runners = {}
    for cell in cells:
        run = RunLayout(REPO / root / task / cell)
        if not run.onnx_manifest.is_file():
            cli("export", str(root / task / cell), log=log)
        runners[f"{cell}/qdq"] = OnnxRuntimeRunner(run.onnx(SPARSE_ONNX), f"{cell}/qdq", intra_op_threads=threads)
        runners[f"{cell}/cpu_int8"] = OnnxRuntimeRunner(run.onnx(CPU_INT8_ONNX), f"{cell}/cpu_int8",
                                                        intra_op_threads=threads)
    out = {"threads": threads, "runs": runs, "shapes": {}}
    for r in runners.values():
        r.activate()
    try:
        rng = np.random.default_rng(0)
        for batch, seq in ((1, 128), (32, 128)):
            feeds = {"input_ids": rng.integers(1000, 20000, (batch, seq), dtype=np.int64),
                     "attention_mask": np.ones((batch, seq), dtype=np.int64),
                     "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}
            names = set(runners[next(iter(runners))].get_input_metadata())
            feeds = {k: v for k, v in feeds.items() if k in names}
            out["shapes"][f"{batch}x{seq}"] = measure_ab(runners, feeds, warmup_runs=3, timed_runs=runs,
                                                         baseline=f"{cells[0]}/qdq")
    finally:
        for r in runners.values():
            r.deactivate()
    return out


def render(doc: dict) -> str:
    lines = [
        "# INT8 quantizer groups: accuracy of INT8 GEMM outputs and INT8 attention (PTQ and QAT + KD)",
        "",
        f"Command: `{doc['command']}`  ",
        f"Date (UTC): {doc['date']}  ",
        f"Versions: {doc['versions']}  ",
        f"Machine: {doc['machine']}",
        "",
        "Protocol: per task, one sparse FP model (pretrained all-MiniLM-L6-v2, dense fine-tune 3 epochs, one-shot "
        "magnitude 2:4 + masked fine-tune with KD, seed 0; `recipes/bench_quantizer_groups.yaml`), then per quantizer "
        "group one QAT run from it: PTQ (16 calibration batches of 32, 99.99th-percentile activation ranges, softmax "
        "by max, per-channel weights) and QAT + KD (1 epoch, lr 1e-5, sparse FP teacher, LSQ scales, masks exact). "
        "Full dev sets. One seed: differences under about 1 point are within seed noise "
        "(`benchmarks/qat_glue.md` shows 1-2 point seed std on these tasks).",
        "",
        "Groups (`train.qat.quantizers`): inputs and weights of the 36 n:m GEMMs are always quantized; "
        "`gemm_outputs` adds a per-tensor output quantizer after every n:m GEMM whose output is not an INT8 attention "
        "input; `attention` adds `q/k/v_bmm_quantizer` and `softmax_quantizer` per self-attention module (the Q/K/V "
        "GEMM outputs are quantized there, after the head reshape).",
        "",
    ]
    for task, rows in doc["tasks"].items():
        lines += [f"## {task} ({score_definition(task)})", "",
                  "| cell | quantizers | sparse FP | PTQ | QAT + KD | QAT + KD - sparse FP | GEMM output / attention "
                  "quantizers | mask violations |",
                  "|---|---|---|---|---|---|---|---|"]
        for cell, r in rows.items():
            delta = r["qat_kd"]["score"] - r["sparse_fp"]["score"]
            lines.append(f"| {cell} | {WHAT[cell]} | {r['sparse_fp']['score']:.2f} | {r['ptq']['score']:.2f} | "
                         f"{r['qat_kd']['score']:.2f} | {delta:+.2f} | {r['placement'].get('gemm_outputs', 0)} / "
                         f"{r['placement'].get('attention', 0)} | {r['mask_violations']} |")
        lines.append("")
    lines += ["Reproduce one cell (its JSON in `benchmarks/qat_quantizer_groups_cells/` has the exact command), e.g.:",
              "", "```", *doc["reproduce"], "```", ""]
    lat = doc.get("latency")
    if lat:
        lines += [f"## ONNX Runtime CPU latency of the exported graphs ({lat['task']}, {lat['threads']} threads, "
                  f"{lat['runs']} interleaved runs, median ms)", "",
                  "| graph | " + " | ".join(lat["shapes"]) + " | vs today's Q/DQ graph (" + " / ".join(lat["shapes"])
                  + ") |", "|---|" + "---|" * (len(lat["shapes"]) + 1)]
        for name in next(iter(lat["shapes"].values())):
            cells = [f"{lat['shapes'][s][name]['p50_ms']:.2f}" for s in lat["shapes"]]
            ratio = [f"{lat['shapes'][s][name]['speedup']:.2f}x" for s in lat["shapes"]]
            lines.append(f"| {name} | " + " | ".join(cells) + " | " + " / ".join(ratio) + " |")
        lines.append("")
    if doc.get("notes"):
        lines += ["## Findings", "", doc["notes"].strip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["mrpc", "stsb"])
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--root", default="runs/bench_quantizer_groups", help="where the runs go")
    p.add_argument("--out-dir", default="benchmarks")
    p.add_argument("--latency-task", default="mrpc", help="task whose exported graphs are timed ('' to skip)")
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--notes", default=None, help="markdown file with the findings, appended to the report")
    p.add_argument("--report-only", action="store_true", help="tabulate finished cells; run nothing")
    args = p.parse_args(argv)
    root, out = Path(args.root), REPO / args.out_dir  # root stays relative: it appears in published commands
    cells_dir = out / "qat_quantizer_groups_cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    (REPO / root).mkdir(parents=True, exist_ok=True)
    log = REPO / root / "bench.log"
    glue = ["--glue-dir", args.glue_dir] if args.glue_dir else []
    doc = {"command": "python tools/bench_quantizer_groups.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "machine": machine()["line"], "tasks": {}, "reproduce": []}
    import onnxruntime
    import torch
    import transformers

    doc["versions"] = (f"torch {torch.__version__}, transformers {transformers.__version__}, "
                       f"onnxruntime {onnxruntime.__version__}")
    for task in args.tasks:
        base, base_cmds = (root / task / "bench_quantizer_groups", None) if args.report_only else \
            base_run(root, task, glue, log)
        doc["tasks"][task] = {}
        for cell in args.cells:
            path = cells_dir / f"{task}__{cell}.json"
            if args.report_only and not path.is_file():
                continue
            doc["tasks"][task][cell] = run_cell(root, task, cell, base, glue, cells_dir, log)
        if base_cmds and not doc["reproduce"]:
            doc["reproduce"] = ["nxm-deploy " + shlex.join(c) for c in base_cmds] + \
                ["nxm-deploy " + shlex.join(cell_args(root, task, DEFAULT_CELL, base, glue))]
    latency_path = cells_dir / f"latency__{args.latency_task}.json"
    if args.latency_task and not args.report_only:
        wanted = ["inputs_weights", DEFAULT_CELL]
        atomic_write_json(latency_path, {"task": args.latency_task, **latency(
            root, args.latency_task, wanted, args.latency_runs, args.threads, log)})
    if args.latency_task and latency_path.is_file():
        doc["latency"] = read_json(latency_path)
    if not doc["reproduce"] and (out / "qat_quantizer_groups.json").is_file():
        doc["reproduce"] = read_json(out / "qat_quantizer_groups.json").get("reproduce", [])
    if args.notes:
        doc["notes"] = Path(args.notes).read_text()
    atomic_write_json(out / "qat_quantizer_groups.json", doc)
    atomic_write_text(out / "qat_quantizer_groups.md", render(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
