"""ONNX Runtime CPU benchmark of a run's models: FP32, ``quantize_dynamic`` INT8, TensorRT-style Q/DQ, CPU INT8.

In one process, on the same inputs, with ``intra_op_num_threads`` threads (default 2):

* ``fp32``: ``<run>/onnx/dense_fp32.onnx``;
* ``quantize_dynamic``: ``onnxruntime.quantization.quantize_dynamic`` of the FP32 model (per-channel QInt8
  weights, UINT8 dynamic activations; the ONNX Runtime peer), after ``quant_pre_process(skip_symbolic_shape=True)``;
* ``trt_qdq``: ``<run>/onnx/sparse_int8_qdq.onnx`` (symmetric S8S8 Q/DQ, the TensorRT interchange graph);
* ``cpu_int8``: :func:`nxm_deploy.export.cpu_int8.make_cpu_int8` of the Q/DQ model (fused form,
  ``<run>/onnx/sparse_int8_cpu.onnx`` when the export stage wrote it, else built in a temp dir);
* ``cpu_int8_standard``: the same rewrite in plain ONNX ops (MatMulInteger -> Cast -> Mul), for reference.

Latency: batch 1 and batch 32 at sequence length 128 (``--seq``), ``--warmup`` untimed rounds, then ``--runs``
interleaved rounds (runner order rotated each round, :func:`nxm_deploy.validate.latency.measure_ab`); medians.
Accuracy: the dev-set metric of each model (task and max_seq_length from ``<run>/recipe.yaml``) and the
logit agreement of ``cpu_int8`` with ``trt_qdq``.

Writes ``benchmarks/ort_cpu.json`` and ``benchmarks/ort_cpu.md`` (``--out-dir``). Target, printed as PASS/MISS:
``cpu_int8`` >= 2.0x FP32 throughput at batch 32 and faster than ``quantize_dynamic`` in the same run.

Usage:
    .venv/bin/python tools/bench_ort.py --run-dir runs/minilm_mrpc_2of4_int8 [--glue-dir ../shared/data/glue] [--runs 20]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from nxm_deploy.validate.runners import OnnxRuntimeRunner  # noqa: E402
from nxm_deploy.export.cpu_int8 import CPU_INT8_ONNX, make_cpu_int8  # noqa: E402
from nxm_deploy.export.onnx import DENSE_ONNX, SPARSE_ONNX  # noqa: E402
from nxm_deploy.machine import machine  # noqa: E402
from nxm_deploy.validate.latency import measure_ab  # noqa: E402

TARGET_SPEEDUP_B32 = 2.0
MODELS = ("fp32", "quantize_dynamic", "trt_qdq", "cpu_int8", "cpu_int8_standard")
log = logging.getLogger("bench_ort")








def make_quantize_dynamic(fp32: Path, out_dir: Path) -> tuple[Path, str]:
    """``quantize_dynamic`` (per-channel QInt8) of ``fp32``; returns (path, how the input was pre-processed)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out_dir / "dense_fp32_pre.onnx"
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        source, note = pre, "quant_pre_process(skip_symbolic_shape=True)"
    except Exception as exc:  # noqa: BLE001 - any failure: quantize the raw export instead
        source, note = fp32, f"quant_pre_process failed ({type(exc).__name__}); raw FP32 export quantized"
    out = out_dir / "dense_int8_dynamic.onnx"
    quantize_dynamic(str(source), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return out, note


def dev_logits(runner: OnnxRuntimeRunner, loader, names) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = [], []
    for batch in loader:
        labels.append(batch["labels"].numpy())
        logits.append(runner.infer({k: batch[k].numpy() for k in names})["logits"])
    return np.concatenate(logits), np.concatenate(labels)


def fmt_metric(metrics: dict | None) -> str:
    if not metrics:
        return "-"
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="run directory with onnx/ and dense/ (e.g. runs/minilm_mrpc_2of4_int8)")
    parser.add_argument("--glue-dir", default=None, help="GLUE TSV root (default: recipe task.glue_dir, NXM_GLUE_DIR, ../shared/data/glue)")
    parser.add_argument("--runs", type=int, default=20, help="timed rounds per shape (>= 20 for reported numbers)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per shape")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument("--seq", type=int, default=128, help="sequence length of the latency inputs")
    parser.add_argument("--batches", default="1,32", help="latency batch sizes, comma separated")
    parser.add_argument("--max-eval", type=int, default=None, help="limit dev examples (smoke checks only)")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks"), help="where ort_cpu.json / ort_cpu.md go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s | %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("nxm_deploy").setLevel(logging.WARNING)

    import onnx
    import onnxruntime as ort
    import yaml

    from nxm_deploy.data import get_task, load_task_split, make_dataloader, resolve_glue_dir
    from nxm_deploy.data.loader import encode_fixed
    from nxm_deploy.data.metrics import compute_metrics
    from nxm_deploy.models import load_saved_model

    run_dir = Path(args.run_dir)
    onnx_dir = run_dir / "onnx"
    for needed in (run_dir / "recipe.yaml", onnx_dir / DENSE_ONNX, onnx_dir / SPARSE_ONNX, run_dir / "dense"):
        if not needed.exists():
            print(f"error: {needed} not found: run the pipeline (export stage) for {run_dir} first", file=sys.stderr)
            return 2
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    task = get_task(recipe["task"]["name"])
    max_len = int(recipe["task"]["max_seq_length"])
    glue = args.glue_dir or recipe["task"].get("glue_dir")
    if not glue and not os.environ.get("NXM_GLUE_DIR") and (REPO.parent / "shared" / "data" / "glue").is_dir():
        glue = str(REPO.parent / "shared" / "data" / "glue")
    batches = [int(b) for b in args.batches.split(",")]

    _, tokenizer = load_saved_model(run_dir / "dense")
    dev = load_task_split(task, "dev", resolve_glue_dir(glue), args.max_eval)

    tmp = tempfile.TemporaryDirectory(prefix="bench_ort_")
    tmp_dir = Path(tmp.name)
    paths: dict[str, Path] = {"fp32": onnx_dir / DENSE_ONNX, "trt_qdq": onnx_dir / SPARSE_ONNX}
    notes: dict[str, str] = {"fp32": "dense FP32 export", "trt_qdq": "S8S8 Q/DQ export (TensorRT layout)"}
    log.info("quantize_dynamic of the FP32 model")
    paths["quantize_dynamic"], notes["quantize_dynamic"] = make_quantize_dynamic(paths["fp32"], tmp_dir)
    notes["quantize_dynamic"] = "quantize_dynamic(per_channel=True, QInt8) after " + notes["quantize_dynamic"]
    cpu_info = {}
    if (onnx_dir / CPU_INT8_ONNX).is_file():
        paths["cpu_int8"], notes["cpu_int8"] = onnx_dir / CPU_INT8_ONNX, f"{CPU_INT8_ONNX} from the export stage"
    else:
        log.info("make_cpu_int8 (fused) of the Q/DQ model")
        info = make_cpu_int8(paths["trt_qdq"], tmp_dir / CPU_INT8_ONNX, form="fused")
        paths["cpu_int8"], notes["cpu_int8"] = Path(info["path"]), "make_cpu_int8(form='fused') in a temp dir"
        cpu_info["fused"] = {k: info[k] for k in ("converted", "activation_quantizers", "left_float", "remaining_qdq")}
    info = make_cpu_int8(paths["trt_qdq"], tmp_dir / "sparse_int8_cpu_standard.onnx", form="standard")
    paths["cpu_int8_standard"], notes["cpu_int8_standard"] = Path(info["path"]), "make_cpu_int8(form='standard')"
    cpu_info["standard"] = {k: info[k] for k in ("converted", "activation_quantizers", "left_float", "remaining_qdq")}

    runners = {name: OnnxRuntimeRunner(paths[name], name, intra_op_threads=args.threads) for name in MODELS}
    for runner in runners.values():
        runner.activate()
    names = runners["fp32"].input_names

    # ---- accuracy on the dev set
    loader = make_dataloader(tokenizer, dev, batch_size=32, max_seq_length=max_len, shuffle=False, group_by_length=True)
    logits, metrics = {}, {}
    for name, runner in runners.items():
        log.info("dev set: %s", name)
        logits[name], labels = dev_logits(runner, loader, names)
        metrics[name] = compute_metrics(task, logits[name], labels)

    def agreement(a: str, b: str) -> dict:
        diff = np.abs(logits[a].astype(np.float64) - logits[b].astype(np.float64))
        return {"examples": int(len(logits[a])), "argmax_agreement": float(np.mean(logits[a].argmax(-1) == logits[b].argmax(-1))),
                "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}

    parity = {
        "cpu_int8_vs_trt_qdq": agreement("cpu_int8", "trt_qdq"),
        "cpu_int8_standard_vs_trt_qdq": agreement("cpu_int8_standard", "trt_qdq"),
        "quantize_dynamic_vs_fp32": agreement("quantize_dynamic", "fp32"),
        "trt_qdq_vs_fp32": agreement("trt_qdq", "fp32"),
    }

    # ---- latency, interleaved
    latency = {}
    for batch in batches:
        log.info("latency: batch %d x seq %d, %d warm-up + %d timed rounds", batch, args.seq, args.warmup, args.runs)
        feeds = {k: v for k, v in encode_fixed(tokenizer, dev, args.seq, batch).items() if k in names}
        latency[f"batch{batch}"] = measure_ab(runners, feeds, args.warmup, args.runs, baseline="fp32")
    for runner in runners.values():
        runner.deactivate()

    speedup = {
        shape: {name: round(stats[name]["speedup_vs_fp32"], 4) for name in MODELS if name != "fp32"}
        for shape, stats in latency.items()
    }
    medians = {shape: {name: round(stats[name]["p50_ms"], 4) for name in MODELS} for shape, stats in latency.items()}
    b32 = latency.get("batch32")
    if b32 is not None:
        s_cpu = b32["cpu_int8"]["speedup_vs_fp32"]
        vs_qd = b32["quantize_dynamic"]["p50_ms"] / b32["cpu_int8"]["p50_ms"]
        passed = s_cpu >= TARGET_SPEEDUP_B32 and vs_qd > 1.0
        target = {"rule": f"cpu_int8 >= {TARGET_SPEEDUP_B32}x FP32 throughput at batch 32 and faster than quantize_dynamic",
                  "cpu_int8_speedup_vs_fp32_b32": round(s_cpu, 4), "cpu_int8_vs_quantize_dynamic_b32": round(vs_qd, 4),
                  "result": "PASS" if passed else "MISS"}
    else:
        target = {"rule": "needs batch 32", "result": "MISS"}

    command = " ".join([os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable,
                        shlex.quote(os.path.relpath(__file__)), *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    result = {
        "command": command,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "machine": machine(),
        "run_dir": str(run_dir), "task": task.name, "dev_examples": len(dev), "dev_max_seq_length": max_len,
        "latency_sequence_length": args.seq, "intra_op_threads": args.threads, "inter_op_threads": 1,
        "warmup_runs": args.warmup, "timed_runs": args.runs, "statistic": "median (p50) of interleaved rounds",
        "models": {name: {"file": paths[name].name, "bytes": paths[name].stat().st_size, "note": notes[name]} for name in MODELS},
        "cpu_int8_conversion": cpu_info,
        "speedup_vs_fp32": speedup,
        "median_ms": medians,
        "latency": latency,
        "dev_metrics": metrics,
        "parity": parity,
        "target": target,
    }

    # ---- report
    header = ["model"] + [f"{s} p50 ms" for s in latency] + [f"{s} vs FP32" for s in latency] + [f"dev {task.name}"]
    rows = []
    for name in MODELS:
        rows.append([name] + [f"{latency[s][name]['p50_ms']:.2f}" for s in latency]
                    + [f"{latency[s][name]['speedup_vs_fp32']:.2f}x" for s in latency] + [fmt_metric(metrics[name])])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    table = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, [*("-" * w for w in widths)], *rows])
    p = parity["cpu_int8_vs_trt_qdq"]
    lines = [
        f"ONNX Runtime {ort.__version__} CPU, {args.threads} intra-op threads, seq {args.seq}, {args.runs} timed rounds "
        f"(after {args.warmup} warm-up), interleaved; {result['machine']['line']}",
        "",
        table,
        "",
        f"cpu_int8 vs trt_qdq on {p['examples']} dev examples: argmax agreement {p['argmax_agreement']:.4f}, "
        f"max |logit diff| {p['max_abs_diff']:.3g}",
        f"target: {target['rule']}: {target['result']}"
        + (f" (cpu_int8 {target['cpu_int8_speedup_vs_fp32_b32']:.2f}x FP32, "
           f"{target['cpu_int8_vs_quantize_dynamic_b32']:.2f}x quantize_dynamic at batch 32)" if "cpu_int8_speedup_vs_fp32_b32" in target else ""),
    ]
    print("\n".join(lines))

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ort_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# ONNX Runtime CPU benchmark",
        "",
        f"Command: `{command}`  ",
        f"Date (UTC): {result['date_utc']}  ",
        f"Versions: onnxruntime {ort.__version__}, onnx {onnx.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}  ",
        f"Machine: {result['machine']['line']}",
        "",
        "Models: " + "; ".join(f"`{n}`: {notes[n]}" for n in MODELS) + ".",
        "",
        "```",
        *lines,
        "```",
        "",
        "Speedups are ratios of medians measured in the same process with interleaved rounds; compare numbers only "
        "within one run.",
    ]
    (out_dir / "ort_cpu.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out_dir / 'ort_cpu.json'} and {out_dir / 'ort_cpu.md'}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
