"""ONNX Runtime CPU benchmark: our CPU INT8 artifact against ONNX Runtime's own best, on exported runs.

For each ``--run-dir`` (a run whose export stage finished), in one process, on the same inputs, with
``intra_op_threads`` threads (default 2), every model the export stage wrote (checked against the sha256 its
manifest records):

* ``dense_fp32``: the dense FP32 export;
* ``dense_fp32_opt``: the peer's FP32: ONNX Runtime's transformer optimizer on it (fused attention, layer norms, GELU);
* ``dense_int8_dynamic``: the peer: ``quantize_dynamic`` (per-channel INT8 weights, dynamic UINT8 activations) of
  the optimized graph (:mod:`nxm_deploy.export.ort_peer`);
* ``sparse_int8``: the S8S8 Q/DQ export (the TensorRT interchange graph, learned QAT scales);
* ``cpu_int8``: our CPU INT8 artifact (:mod:`nxm_deploy.export.cpu_int8`; the same learned scales).

Latency: batch 1 and batch 32 at sequence length 128 (``--seq``), ``--warmup`` untimed rounds, then ``--runs``
interleaved rounds (runner order rotated each round, :func:`nxm_deploy.timing.measure_ab`); medians.
Accuracy: the dev-set metric of each model (the run's task and ``max_seq_length``) and the agreement of ``cpu_int8``
with ``sparse_int8``. Where a goal is missed, ONNX Runtime's profiler (``enable_profiling``) is run on ``cpu_int8``
and on the peer it missed against, and the time per operator type is written beside the result.

Goals (issue "The CPU tier against ONNX Runtime's own best"), each ``{"value", "target", "met"}`` in
``ort_cpu.json``: ``cpu_int8`` >= 1.2x ``dense_int8_dynamic`` at batch 1 and at batch 32, and >= 2.5x
``dense_fp32_opt`` at batch 32 (on the BERT-base shape; the same ratios are reported for every run).

Writes ``benchmarks/ort_cpu.json`` and ``benchmarks/ort_cpu.md`` (``--out-dir``). ``make bench-ort`` runs the
two runs of the committed table (the demo's MiniLM, a random-init BERT-base) and then this tool.

Usage:
    .venv/bin/python tools/bench_ort.py --run-dir runs/minilm_mrpc_2of4_int8 --run-dir runs/bench_ort_bert_base
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import logging
import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from nxm_deploy.export.ort_peer import DENSE_FP32_OPT, DENSE_INT8_DYNAMIC  # noqa: E402
from nxm_deploy.machine import machine  # noqa: E402
from nxm_deploy.timing import measure_ab  # noqa: E402
from nxm_deploy.run.reader import CPU_INT8_MODEL as CPU_INT8, DENSE_MODEL as DENSE, SPARSE_MODEL as SPARSE  # noqa: E402
from nxm_deploy.run.reader import export_models, read_export_manifest  # noqa: E402
from nxm_deploy.runtimes.onnxruntime import OnnxRuntimeRunner  # noqa: E402

MODELS = (DENSE, DENSE_FP32_OPT, DENSE_INT8_DYNAMIC, SPARSE, CPU_INT8)
#: (goal key, batch, reference, target ratio of p50(reference) / p50(cpu_int8))
GOALS = (("cpu_int8_vs_dense_int8_dynamic_b1", 1, DENSE_INT8_DYNAMIC, 1.2),
         ("cpu_int8_vs_dense_int8_dynamic_b32", 32, DENSE_INT8_DYNAMIC, 1.2),
         ("cpu_int8_vs_dense_fp32_opt_b32", 32, DENSE_FP32_OPT, 2.5))
#: the run whose ratios are the goals' values (the issue's BERT-base shape); the other runs report the same ratios
GOAL_SHAPE = "bert_base"
log = logging.getLogger("bench_ort")


def shape_name(config) -> str:
    """``bert_base`` / ``minilm`` / ``<layers>x<hidden>`` of a model config."""
    layers, hidden = config.num_hidden_layers, config.hidden_size
    return {(12, 768): "bert_base", (6, 384): "minilm", (24, 1024): "bert_large"}.get((layers, hidden),
                                                                                    f"{layers}x{hidden}")


def dev_logits(runner: OnnxRuntimeRunner, loader, names) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = [], []
    for batch in loader:
        labels.append(batch["labels"].numpy())
        logits.append(runner.infer({k: batch[k].numpy() for k in names})["logits"])
    return np.concatenate(logits), np.concatenate(labels)


def op_profile(path: Path, feeds: dict, threads: int, rounds: int) -> dict:
    """ONNX Runtime's profiler on ``rounds`` runs of ``feeds``: ms per run and share of kernel time per op type."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_ort_{path.stem}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for _ in range(rounds):
        session.run(None, {k: feeds[k] for k in names})
    trace = Path(session.end_profiling())
    per_op, nodes = collections.Counter(), collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
    trace.unlink(missing_ok=True)
    total = sum(per_op.values()) or 1
    return {op: {"ms_per_run": round(us / 1e3 / rounds, 3), "share": round(us / total, 4),
                 "nodes": nodes[op] // rounds} for op, us in per_op.most_common()}


def bench_run(run_dir: Path, args) -> dict:
    from nxm_deploy.data import load_task_split, make_dataloader, resolve_glue_dir
    from nxm_deploy.data.loader import encode_fixed
    from nxm_deploy.data.metrics import compute_metrics
    from nxm_deploy.config.recipe import load_recipe
    from nxm_deploy.run.layout import RunLayout
    from nxm_deploy.run.reader import load_stage_model, read_stage_manifest

    layout = RunLayout(run_dir)
    manifest = read_export_manifest(run_dir)
    models = export_models(run_dir, manifest)  # hash-checked against the export manifest
    missing = [m for m in MODELS if m not in models]
    if missing:
        raise SystemExit(f"error: {run_dir} has no {', '.join(missing)}: rerun `nxm-deploy export {run_dir}` "
                         "(the export stage writes the ONNX Runtime peers since 2026-12-05)")
    recipe = load_recipe(layout.recipe)
    task = recipe.task.spec()
    max_len = recipe.task.max_seq_length
    read_stage_manifest(run_dir, "dense")  # the dense model's files as its stage wrote them
    model, tokenizer = load_stage_model(run_dir, "dense")
    shape = shape_name(model.config)
    random_init = bool(recipe.model.random_init)
    del model
    glue = args.glue_dir or recipe.task.glue_dir or os.environ.get("NXM_GLUE_DIR")
    if not glue and (REPO.parent / "shared" / "data" / "glue").is_dir():
        glue = str(REPO.parent / "shared" / "data" / "glue")
    dev = load_task_split(task, "dev", resolve_glue_dir(glue), recipe.task.max_eval_examples)

    runners = {name: OnnxRuntimeRunner(models[name]["path"], name, intra_op_threads=args.threads) for name in MODELS}
    for runner in runners.values():
        runner.activate()
    names = runners[DENSE].input_names
    loader = make_dataloader(tokenizer, dev, batch_size=32, max_seq_length=max_len, shuffle=False, group_by_length=True)
    logits, metrics = {}, {}
    for name, runner in runners.items():
        log.info("%s: dev set on %s", shape, name)
        logits[name], labels = dev_logits(runner, loader, names)
        metrics[name] = compute_metrics(task, logits[name], labels)
    same = logits[CPU_INT8].argmax(-1) == logits[SPARSE].argmax(-1)
    parity = {"examples": int(len(same)), "argmax_agreement": float(same.mean()),
              "max_abs_diff": float(np.abs(logits[CPU_INT8].astype(np.float64) - logits[SPARSE]).max()),
              "metric_delta_pt": round(100 * (metrics[CPU_INT8][task.primary_metric]
                                              - metrics[SPARSE][task.primary_metric]), 4)}

    latency, feeds = {}, {}
    references = {name: [DENSE_FP32_OPT, DENSE_INT8_DYNAMIC] for name in MODELS}  # speedup_vs_<peer> of every row
    for batch in args.batches:
        log.info("%s: latency batch %d x seq %d, %d warm-up + %d timed rounds", shape, batch, args.seq, args.warmup,
                 args.runs)
        feeds[batch] = {k: v for k, v in encode_fixed(tokenizer, dev, args.seq, batch).items() if k in names}
        latency[f"b{batch}"] = measure_ab(runners, feeds[batch], args.warmup, args.runs, baseline=DENSE,
                                          references=references)
    for runner in runners.values():
        runner.deactivate()

    ratios = {key: latency[f"b{batch}"][CPU_INT8][f"speedup_vs_{ref}"] for key, batch, ref, _ in GOALS
              if f"b{batch}" in latency}
    profiles = {}
    for key, batch, ref, target in GOALS:
        if key in ratios and ratios[key] < target and f"b{batch}" not in profiles:
            log.info("%s: profiling cpu_int8 and %s at batch %d", shape, ref, batch)
            rounds = 10 if batch == 1 else 3
            profiles[f"b{batch}"] = {name: op_profile(models[name]["path"], feeds[batch], args.threads, rounds)
                                     for name in (CPU_INT8, DENSE_INT8_DYNAMIC, DENSE_FP32_OPT)}
    return {"run_dir": str(run_dir), "shape": shape, "random_init": random_init,
            "task": task.name, "dev_examples": len(dev), "primary_metric": task.primary_metric,
            "models": {name: {"file": models[name]["path"].name, "bytes": models[name]["path"].stat().st_size}
                       for name in MODELS},
            "fused": (manifest.get("ort_peers") or {}).get(DENSE_FP32_OPT, {}).get("fused"),
            "dev_metrics": metrics, "cpu_int8_vs_sparse_int8": parity, "latency": latency,
            "ratios": {k: round(v, 4) for k, v in ratios.items()}, "profiles": profiles}


def _table(result: dict, seq: int) -> list[str]:
    shapes = list(result["latency"])
    header = ["model", *(f"{s}x{seq} p50 ms" for s in shapes), *(f"{s} vs FP32 opt" for s in shapes),
              *(f"{s} vs dynamic" for s in shapes), f"dev {result['primary_metric']}"]
    rows = []
    for name in MODELS:
        row = [name, *(f"{result['latency'][s][name]['p50_ms']:.2f}" for s in shapes)]
        for ref in (DENSE_FP32_OPT, DENSE_INT8_DYNAMIC):  # a peer against itself: 1.00x
            row += [f"{result['latency'][s][name].get(f'speedup_vs_{ref}', 1.0):.2f}x" for s in shapes]
        row.append(f"{result['dev_metrics'][name][result['primary_metric']]:.4f}")
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
            for r in [header, ["-" * w for w in widths], *rows]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", action="append", required=True,
                        help="an exported run (repeatable), e.g. runs/minilm_mrpc_2of4_int8")
    parser.add_argument("--glue-dir", default=None, help="GLUE TSV root (default: the run's, NXM_GLUE_DIR, ../shared/data/glue)")
    parser.add_argument("--runs", type=int, default=20, help="timed rounds per shape (>= 20 for reported numbers)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per shape")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument("--seq", type=int, default=128, help="sequence length of the latency inputs")
    parser.add_argument("--batches", default="1,32", help="latency batch sizes, comma separated")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks"), help="where ort_cpu.json / ort_cpu.md go")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s | %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("nxm_deploy").setLevel(logging.WARNING)

    import onnx
    import onnxruntime as ort

    runs = [bench_run(Path(r), args) for r in args.run_dir]
    by_shape = {r["shape"]: r for r in runs}
    goal_run = by_shape.get(GOAL_SHAPE)
    goals = {}
    for key, batch, ref, target in GOALS:
        value = None if goal_run is None else goal_run["ratios"].get(key)
        goals[key] = {"value": value, "target": target, "met": value is not None and value >= target,
                      "shape": GOAL_SHAPE, "batch": batch, "sequence_length": args.seq,
                      "rule": f"p50({ref}) / p50(cpu_int8) at batch {batch} x {args.seq}",
                      "other_shapes": {r["shape"]: r["ratios"].get(key) for r in runs if r is not goal_run}}
    command = " ".join([os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable,
                        shlex.quote(os.path.relpath(__file__)), *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    result = {
        "command": command,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "machine": machine(), "intra_op_threads": args.threads, "inter_op_threads": 1,
        "latency_sequence_length": args.seq, "warmup_runs": args.warmup, "timed_runs": args.runs,
        "statistic": "median (p50) of interleaved rounds", "models": list(MODELS),
        "goals": goals, "runs": runs,
    }

    lines = [f"ONNX Runtime {ort.__version__} CPU, {args.threads} intra-op threads, seq {args.seq}, {args.runs} timed "
             f"rounds (after {args.warmup} warm-up), interleaved; {result['machine']['line']}"]
    for run in runs:
        p = run["cpu_int8_vs_sparse_int8"]
        lines += ["", f"{run['shape']} ({'random init: dev scores at chance, speed only' if run['random_init'] else 'real weights'}; "
                      f"{run['run_dir']}; {run['dev_examples']} {run['task']} dev examples)", "", *_table(run, args.seq), "",
                  f"cpu_int8 vs sparse_int8 (Q/DQ) on the dev set: argmax agreement {p['argmax_agreement']:.4f}, "
                  f"max |logit diff| {p['max_abs_diff']:.3g}, {run['primary_metric']} delta {p['metric_delta_pt']:+.2f} pt"]
    lines += [""] + [f"goal {k}: {g['value']:.2f}x (target {g['target']}x, {g['shape']}) "
                     f"{'met' if g['met'] else 'MISSED'}" if g["value"] is not None else f"goal {k}: not measured"
                     for k, g in goals.items()]
    print("\n".join(lines))

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ort_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# ONNX Runtime CPU benchmark: our CPU INT8 artifact against ONNX Runtime's own best", "",
          f"Command: `{command}`  ", f"Date (UTC): {result['date_utc']}  ",
          f"Versions: onnxruntime {ort.__version__}, onnx {onnx.__version__}, numpy {np.__version__}, "
          f"Python {platform.python_version()}  ", f"Machine: {result['machine']['line']}", "",
          "Models (all written by the export stage, hash-checked): `dense_fp32` the dense FP32 export; "
          "`dense_fp32_opt` ONNX Runtime's transformer optimizer on it; `dense_int8_dynamic` `quantize_dynamic` "
          "(per-channel INT8 weights, dynamic UINT8 activations) of the optimized graph: the peer; `sparse_int8` the "
          "S8S8 Q/DQ export for TensorRT; `cpu_int8` our CPU INT8 artifact (the same learned QAT scales, U8S8 "
          "integer GEMMs).", "", "```", *lines, "```", "",
          "Ratios are p50(reference) / p50(model), measured in the same process with interleaved rounds; compare "
          "numbers only within one run."]
    for run in runs:
        for shape, profile in run["profiles"].items():
            md += ["", f"## Profile of a missed goal: {run['shape']} {shape} x {args.seq} (ONNX Runtime enable_profiling, "
                       "kernel time per op type)", "", "| op type | " + " | ".join(profile) + " |",
                   "|---|" + "---|" * len(profile)]
            ops = sorted({op for p in profile.values() for op in p},
                         key=lambda op: -max(p.get(op, {}).get("ms_per_run", 0) for p in profile.values()))
            for op in ops[:14]:
                cells = [f"{p[op]['ms_per_run']:.2f} ms ({100 * p[op]['share']:.0f} %, {p[op]['nodes']} nodes)"
                         if op in p else "–" for p in profile.values()]
                md.append(f"| {op} | " + " | ".join(cells) + " |")
            md.append("| total | " + " | ".join(f"{sum(v['ms_per_run'] for v in p.values()):.2f} ms"
                                                 for p in profile.values()) + " |")
    (out_dir / "ort_cpu.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out_dir / 'ort_cpu.json'} and {out_dir / 'ort_cpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
