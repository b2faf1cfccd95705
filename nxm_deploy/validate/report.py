"""The run report: ``report.json`` for CI and ``report.md`` for people, built from the stage manifests on disk."""

from __future__ import annotations

from pathlib import Path

from nxm_deploy._io import atomic_write_json, atomic_write_text, read_json
from nxm_deploy.config.recipe import Recipe


def _maybe(path: Path):
    return read_json(path) if path.is_file() else None


def _fmt_metrics(metrics: dict | None) -> str:
    if not metrics:
        return "–"
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _delta(metrics: dict | None, base: dict | None, key: str) -> str:
    if not metrics or not base or key not in metrics or key not in base:
        return "–"
    return f"{100 * (metrics[key] - base[key]):+.2f} pt"


def build_report(recipe: Recipe, run_dir: str | Path) -> dict:
    """Collect every stage's results; write ``report.json`` and ``report.md``; return the JSON dict."""
    run_dir = Path(run_dir)
    dense = _maybe(run_dir / "dense" / "manifest.json")
    sparse = _maybe(run_dir / "sparse" / "manifest.json")
    qat = _maybe(run_dir / "qat" / "manifest.json")
    export = _maybe(run_dir / "onnx" / "manifest.json")
    sparsity = _maybe(run_dir / "onnx" / "sparsity_report.json")
    engines = _maybe(run_dir / "engines" / "status.json")
    validation = _maybe(run_dir / "validation.json")
    primary = None
    from nxm_deploy.data import get_task

    task = get_task(recipe.task.name)
    primary = task.primary_metric
    ort = (validation or {}).get("metrics", {})
    accuracy = [
        {"model": "dense FP32", "runtime": "PyTorch", "metrics": (dense or {}).get("metrics")},
        {"model": f"sparse {recipe.sparsity.pattern} FP32 (ADMM + KD)", "runtime": "PyTorch", "metrics": (sparse or {}).get("metrics")},
        {"model": f"sparse {recipe.sparsity.pattern} INT8 PTQ only", "runtime": "PyTorch fake-quant", "metrics": (qat or {}).get("ptq_metrics")},
        {"model": f"sparse {recipe.sparsity.pattern} INT8 QAT + KD", "runtime": "PyTorch fake-quant", "metrics": (qat or {}).get("metrics")},
        {"model": "dense FP32 ONNX", "runtime": "ONNX Runtime CPU", "metrics": ort.get("dense_fp32")},
        {"model": f"sparse {recipe.sparsity.pattern} INT8 Q/DQ ONNX", "runtime": "ONNX Runtime CPU", "metrics": ort.get("sparse_int8")},
    ]
    report = {
        "name": recipe.name, "recipe_sha256": recipe.sha256(), "model": recipe.model.source, "task": task.name,
        "primary_metric": primary, "pattern": recipe.sparsity.pattern, "accuracy": accuracy,
        "sparsity_check": (export or {}).get("sparsity_check"), "parity": (export or {}).get("parity"),
        "latency": (validation or {}).get("latency"), "machine": (validation or {}).get("machine"),
        "runtime": (validation or {}).get("runtime"), "engines": (engines or {}).get("engines"),
        "admm_history": (sparse or {}).get("admm_history"), "admm_epoch_metrics": (sparse or {}).get("epoch_metrics"),
        "stages_done": {k: v is not None for k, v in
                        {"dense": dense, "admm": sparse, "qat": qat, "export": export, "engines": engines, "validate": validation}.items()},
    }
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", _markdown(report, sparsity, dense))
    return report


def _markdown(report: dict, sparsity: dict | None, dense: dict | None) -> str:
    primary = report["primary_metric"]
    base = report["accuracy"][0]["metrics"]
    ort_base = report["accuracy"][4]["metrics"]
    lines = [
        f"# nxm-deploy report: {report['name']}", "",
        f"Model `{report['model']}`, task **{report['task']}**, pattern **{report['pattern']}** "
        f"(n nonzeros kept in every m consecutive weights along the input axis).", "",
    ]
    if report.get("machine"):
        lines += [f"Machine: {report['machine']}; runtime: {report['runtime']}.", ""]
    lines += ["## Summary", ""]
    acc = {row["model"]: row["metrics"] for row in report["accuracy"]}
    ort_sparse = report["accuracy"][5]["metrics"]
    if ort_base and ort_sparse:
        lines.append(f"- Dev {primary}: dense FP32 {ort_base[primary]:.4f}, sparse INT8 {ort_sparse[primary]:.4f} "
                     f"({_delta(ort_sparse, ort_base, primary)}) on ONNX Runtime.")
    check = report.get("sparsity_check")
    if check:
        lines.append(f"- Exported graph: {check['sparse_layers']} of {check['expected_sparse']} trained layers verified "
                     f"{report['pattern']} ({'OK' if check['ok'] else 'FAILED'}).")
    for row in report.get("latency") or []:
        s = row["sparse_int8"]
        lines.append(f"- Latency b{row['batch_size']}×s{row['sequence_length']}: dense {row['dense_fp32']['p50_ms']:.1f} ms, "
                     f"sparse INT8 {s['p50_ms']:.1f} ms (speedup {s['speedup_vs_dense_fp32']:.2f}×, ORT CPU).")
    for eng in report.get("engines") or []:
        lines.append(f"- TensorRT engine `{eng['name']}`: {eng['status'].rstrip('.')}.")
    lines += ["", "## Accuracy (dev set)", "", f"| model | runtime | metrics | Δ {primary} vs dense |", "|---|---|---|---|"]
    for i, row in enumerate(report["accuracy"]):
        ref = ort_base if i >= 4 else base
        lines.append(f"| {row['model']} | {row['runtime']} | {_fmt_metrics(row['metrics'])} | {_delta(row['metrics'], ref, primary) if i not in (0, 4) else '–'} |")
    if report.get("admm_epoch_metrics"):
        lines += ["", "ADMM hard-projected dev score per epoch: " +
                  "; ".join(f"{m['after']}: {m.get(primary, float('nan')):.4f}" for m in report["admm_epoch_metrics"])]
    if report.get("latency"):
        lines += ["", "## Latency (ONNX Runtime CPU, A/B interleaved in one process)", "",
                  "| batch × seq | model | p50 ms | p90 ms | p99 ms | seq/s | speedup vs dense (p10–p90) |", "|---|---|---|---|---|---|---|"]
        for row in report["latency"]:
            for name in ("dense_fp32", "sparse_int8"):
                s = row[name]
                lines.append(f"| {row['batch_size']}×{row['sequence_length']} | {name} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | "
                             f"{s['p99_ms']:.2f} | {s['throughput_seq_per_s']:.1f} | {s['speedup_vs_dense_fp32']:.2f}× "
                             f"({s['speedup_p10']:.2f}–{s['speedup_p90']:.2f}) |")
        lines += ["", "ONNX Runtime's CPU kernels do not exploit 2:4 sparsity: any CPU speedup here comes from its INT8 "
                  "kernels alone. The 2:4 speedup belongs to the TensorRT engines (sparse tensor cores)."]
    if report.get("parity"):
        p = report["parity"]
        lines += ["", f"ORT vs PyTorch parity: dense max |Δlogit| {p['dense_max_abs_diff']:.2e} (atol {p['dense_atol']}), "
                  f"INT8 {p['int8_max_abs_diff']:.2e} (atol {p['int8_atol']}) — {'OK' if p['ok'] else 'OUTSIDE TOLERANCE'}."]
    if sparsity:
        lines += ["", f"## Per-layer {report['pattern']} check of the exported INT8 graph", "",
                  "| module | trained n:m | initializer | shape | axis | groups | violating | density | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in sparsity["layers"]:
            lines.append(f"| {row.get('module') or row['node']} | {'yes' if row['expected_sparse'] else 'no'} | {row['initializer']} | "
                         f"{'×'.join(map(str, row['shape']))} | {row['axis']} | {row['groups_checked']} | {row['groups_violating']} | "
                         f"{row['density']:.3f} | {row['status']} |")
    if report.get("engines"):
        lines += ["", "## TensorRT", ""] + [f"- `{e['name']}`: {e['status']}" for e in report["engines"]]
    return "\n".join(lines) + "\n"
