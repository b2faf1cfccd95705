"""The run report: ``report.json`` for CI, ``report.md`` for people and ``plots/*.png``, built from the stage
manifests on disk (so ``nxm-deploy report`` rebuilds it without measuring anything)."""

from __future__ import annotations

from pathlib import Path

from nxm_deploy.run.layout import RunLayout
from nxm_deploy.fileio import atomic_write_json, atomic_write_text, read_json
from nxm_deploy.config.recipe import Recipe
from nxm_deploy.export.ort_peer import DENSE_FP32_OPT, DENSE_INT8_DYNAMIC
from nxm_deploy.runtimes import runtime_label
from nxm_deploy.validate.gates import delta_pt

_RESERVED = {"batch_size", "sequence_length"}


def _maybe(path: Path):
    return read_json(path) if path.is_file() else None


def _fmt_metrics(metrics: dict | None) -> str:
    if not metrics:
        return "–"
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


#: what a point of Δ perplexity is (nxm_deploy.validate.gates.delta_pt)
PPL_UNIT = " (1 pt = 1 % of the dense perplexity; + = lower perplexity, better)"


def _fmt_delta(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f} pt"


#: the peers of the CPU rows (:mod:`nxm_deploy.export.ort_peer`) and their short names in the report
_PEER_SHORT = {DENSE_FP32_OPT: "optimized FP32", DENSE_INT8_DYNAMIC: "quantize_dynamic"}


def _label(runners: dict, name: str) -> str:
    """The label the runtime gave runner ``name`` (``validation.json``'s ``runners``), else its name."""
    return (runners.get(name) or {}).get("label") or name


def _runtime(runners: dict, name: str) -> str:
    """The report label of runner ``name``'s runtime."""
    return runtime_label((runners.get(name) or {}).get("backend"))


def _method_words(name: str) -> str:
    """How the sparse stage found its mask, for the report (the mask method's label: ``ADMM``, ``Wanda + masked
    fine-tune``)."""
    from nxm_deploy.sparsity.methods import METHODS

    method = METHODS.get(name)
    if method is None:
        return name
    return method.label if name == "admm" else f"{method.label} + masked fine-tune"


def _runners(validation: dict) -> dict[str, dict]:
    """``validation["runners"]``, or labels guessed for a validation.json written before runners were recorded."""
    runners = dict(validation.get("runners") or {})
    for name in validation.get("metrics") or {}:
        runners.setdefault(name, {"name": name, "backend": "onnxruntime-cpu", "sparse": name != "dense_fp32",
                                  "precision": "fp32" if name == "dense_fp32" else "int8"})
    return runners


def build_report(recipe: Recipe, run_dir: str | Path) -> dict:
    """Collect every stage's results; write ``report.json``, ``report.md`` and ``plots/*.png``; return the JSON."""
    from nxm_deploy.validate.plots import write_plots

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    dense = _maybe(layout.stage_manifest("dense"))
    sparse = _maybe(layout.stage_manifest("admm"))
    qat = _maybe(layout.stage_manifest("qat"))
    export = _maybe(layout.onnx_manifest)
    sparsity = _maybe(layout.sparsity_report)
    engines = _maybe(layout.engine_status)
    validation = _maybe(layout.validation) or {}
    task = recipe.task.spec()
    primary = task.primary_metric
    pattern = recipe.sparsity.pattern
    runners = _runners(validation)
    base_torch = (dense or {}).get("metrics")
    method = _method_words((sparse or {}).get("method", "admm"))
    kd = " + KD" if recipe.train.admm.distill else ""
    accuracy = [
        {"name": "torch_dense", "model": "dense FP32", "runtime": "PyTorch", "metrics": base_torch, "stage": "dense"},
        {"name": "torch_admm", "model": f"sparse {pattern} FP32 ({method}{kd})", "runtime": "PyTorch",
         "metrics": (sparse or {}).get("metrics"), "stage": "admm"},
        {"name": "torch_ptq", "model": f"sparse {pattern} INT8 PTQ only", "runtime": "PyTorch fake-quant",
         "metrics": (qat or {}).get("ptq_metrics"), "stage": "qat"},
        {"name": "torch_qat", "model": f"sparse {pattern} INT8 QAT + KD", "runtime": "PyTorch fake-quant",
         "metrics": (qat or {}).get("metrics"), "stage": "qat"},
    ]
    for row in accuracy:
        row["delta_pt"] = None if row["name"] == "torch_dense" else delta_pt(row["metrics"], base_torch, primary)
    metrics = validation.get("metrics") or {}
    baseline = validation.get("baseline", "dense_fp32")
    for name, values in metrics.items():
        accuracy.append({"name": name, "model": _label(runners, name), "runtime": _runtime(runners, name),
                         "metrics": values,
                         "stage": "validate",
                         "delta_pt": None if name == baseline else delta_pt(values, metrics.get(baseline), primary)})
    labels = {name: _label(runners, name) for name in runners}
    plot_rows = [{"label": f"{r['model']} [{r['runtime']}]", "delta_pt": r["delta_pt"]} for r in accuracy]
    plots = write_plots(run_dir, latency=validation.get("latency"), accuracy_rows=plot_rows, metric=primary,
                        sparsity=sparsity, pattern=pattern, labels=labels, gates=validation.get("gates")) \
        if recipe.validate_.plots else {}
    report = {
        "name": recipe.name, "recipe_sha256": recipe.sha256(), "model": recipe.model.source, "task": task.name,
        "primary_metric": primary, "pattern": pattern, "accuracy": accuracy, "baseline": baseline,
        "runners": runners, "skipped": validation.get("skipped"),
        "sparsity_check": (export or {}).get("sparsity_check"), "parity": (export or {}).get("parity"),
        "int8_weights": (export or {}).get("int8_weights"),
        "latency": validation.get("latency"), "latency_method": validation.get("latency_method"),
        "machine": validation.get("machine"), "runtime": validation.get("runtime"),
        "dev_set": dev_set_words(validation.get("dev_examples"), validation.get("dev_examples_total")),
        "diff": validation.get("diff"), "gates": validation.get("gates"), "plots": plots,
        "engines": (engines or {}).get("engines"),
        "admm_history": (sparse or {}).get("admm_history"), "admm_epoch_metrics": (sparse or {}).get("epoch_metrics"),
        "stages_done": {k: v is not None for k, v in
                        {"dense": dense, "admm": sparse, "qat": qat, "export": export, "engines": engines,
                         "validate": validation or None}.items()},
    }
    atomic_write_json(layout.report_json, report)
    atomic_write_text(layout.report_md, _markdown(report, sparsity))
    return report


def dev_set_words(used: int | None, total: int | None) -> str | None:
    """``"full dev set, M examples"``, or ``"first N of M dev examples"`` when ``task.max_eval_examples`` cut it."""
    if used is None:
        return None
    if total is None or used >= total:
        return f"full dev set, {used} examples"
    return f"first {used} of {total} dev examples"


def _gate_word(gate: dict | None) -> str:
    if not gate or not gate.get("enabled"):
        return "not set"
    return "PASSED" if gate.get("passed") else "FAILED"


def _summary(report: dict) -> list[str]:
    primary, pattern = report["primary_metric"], report["pattern"]
    lines = []
    val_rows = [r for r in report["accuracy"] if r["stage"] == "validate" and r["metrics"]]
    base = next((r for r in val_rows if r["name"] == report["baseline"]), None)
    if base:
        others = [f"{r['model']} {r['metrics'][primary]:.4f} ({_fmt_delta(r['delta_pt'])}, {r['runtime']})"
                  for r in val_rows if r is not base]
        lines.append(f"- Dev {primary} ({report.get('dev_set') or 'dev set'}): {base['model']} {base['metrics'][primary]:.4f}"
                     + (f"; {'; '.join(others)}" if others else "") + ".")
    size = report.get("int8_weights")
    if size and size.get("file_bytes"):
        lines.append(f"- Sparse INT8 ONNX: {size['file_bytes'] / 1e6:.1f} MB ({size['converted']} weights stored as INT8 "
                     f"initializers; {size['exported_bytes_qdq_float_weights'] / 1e6:.1f} MB with FP32 weights).")
    check = report.get("sparsity_check")
    if check:
        lines.append(f"- Exported graph: {check['sparse_layers']} of {check['expected_sparse']} trained layers verified "
                     f"{pattern} ({'OK' if check['ok'] else 'FAILED'}).")
    runners = report.get("runners") or {}
    for row in report.get("latency") or []:
        parts = []
        for name, s in row.items():
            if name in _RESERVED or not isinstance(s, dict):
                continue
            text = f"{_label(runners, name)} {s['p50_ms']:.1f} ms"
            if s.get("speedup") is not None and s.get("baseline") not in (None, name):
                text += f" ({s['speedup']:.2f}×, p10–p90 {s['speedup_p10']:.2f}–{s['speedup_p90']:.2f}"
                text += "".join(f"; {s[f'speedup_vs_{p}']:.2f}× vs {_PEER_SHORT[p]}" for p in _PEER_SHORT
                                if s.get(f"speedup_vs_{p}") is not None) + ")"
            parts.append(text)
        backends = sorted({_runtime(runners, n) for n in row if n not in _RESERVED})
        lines.append(f"- Latency p50 b{row['batch_size']}×s{row['sequence_length']} ({', '.join(backends)}): "
                     + "; ".join(parts) + ".")
    diff = report.get("diff")
    if diff:
        gated = [c for c in diff["comparisons"] if c["gated"]]
        ok = sum(c["passed"] for c in gated)
        int8 = diff["tolerances"].get("int8", {})
        info = next((c for c in diff["comparisons"] if c["reference"] == "dense_fp32" and c["candidate"] == "sparse_int8"), None)
        lines.append(f"- Output diff (Polygraphy, {diff['inputs']}): {ok} of {len(gated)} checked pairs within tolerance "
                     f"(INT8 atol {int8.get('atol', float('nan')):.3g}, derived from the fake-quant reference)"
                     + (f"; dense vs sparse INT8 argmax agreement {100 * info['argmax_agreement']:.1f}%"
                        if info and info.get("argmax_agreement") is not None else "") + ".")
    gates = report.get("gates")
    if gates:
        words = []
        if gates.get("accuracy", {}).get("enabled"):
            words.append(f"accuracy drop ≤ {gates['accuracy']['threshold']} pt: {_gate_word(gates['accuracy'])}")
        if gates.get("latency", {}).get("enabled"):
            words.append(f"speedup ≥ {gates['latency']['threshold']}×: {_gate_word(gates['latency'])}")
        if gates.get("diff", {}).get("enabled"):
            words.append(f"output diff: {_gate_word(gates['diff'])}")
        lines.append("- Gates: " + ("; ".join(words) if words else
                                    "none set (validate.max_accuracy_drop_pt, validate.min_speedup, validate.diff_gate)") + ".")
    for eng in report.get("engines") or []:
        lines.append(f"- TensorRT engine `{eng['name']}`: {eng['status'].rstrip('.')}.")
    for skip in report.get("skipped") or []:
        lines.append(f"- Not validated: `{skip['name']}`: {skip['reason'].rstrip('.')}.")
    if report.get("plots"):
        lines.append("- Plots: " + ", ".join(f"[{k}]({v})" for k, v in report["plots"].items()) + ".")
    return lines


def _parity_line(p: dict) -> str:
    """The export stage's ORT vs PyTorch parity (both manifest layouts: flat ``*_max_abs_diff`` or nested)."""
    verdict = "OK" if p.get("ok") else "OUTSIDE TOLERANCE"
    if isinstance(p.get("dense"), dict):
        d, q = p["dense"], p.get("int8") or {}
        agree = q.get("argmax_agreement")
        return (f"Export-time ORT vs PyTorch parity ({p.get('inputs', 'dev examples')}): dense max |Δlogit| "
                f"{d['max_abs_diff']:.2e} (atol {p.get('dense_atol')}), INT8 max |Δlogit| {q.get('max_abs_diff', float('nan')):.2e}"
                + (f", argmax agreement {100 * agree:.1f}%" if agree is not None else "")
                + (f", {100 * q['argmax_agreement_decisive']:.1f}% without the {q.get('near_ties')} numerical ties "
                   f"(twin margin <= {p.get('int8_tie_margin')}; min {100 * p.get('int8_min_agreement', 0):.1f}%)"
                   if q.get("argmax_agreement_decisive") is not None else "")
                + f" — {verdict}.")
    return (f"Export-time ORT vs PyTorch parity: dense max |Δlogit| {p['dense_max_abs_diff']:.2e} (atol {p['dense_atol']}), "
            f"INT8 {p['int8_max_abs_diff']:.2e} (atol {p['int8_atol']}) — {verdict}.")


def _int8_derivation(tol: dict) -> str:
    """How the INT8 atol came out of :func:`nxm_deploy.validate.diff.int8_tolerance`, with its numbers (a
    validation.json from before the noise bound has no ``rounding_noise_rms``: those words are left out)."""
    q, s, n_cal, n = (tol.get(k) for k in ("quantization_max_abs_diff", "rounding_noise_rms", "calibration_batches",
                                            "batches"))
    text = f" Observed max |ORT INT8 − fake-quant| {tol['observed_impl_max_abs_diff']:.3g}"
    if n_cal is not None:
        text += f" on the first {n_cal}" + (f" of {n}" if n is not None else "") + " batches (d)"
    if q is not None:
        text += f", INT8 perturbation max |fake-quant − FP32| {q:.3g} (q)"
    if s is not None and tol.get("noise_bound") is not None:
        text += (f"; the twin's own rounding noise FP32 vs FP64 rms {s:.3g} (s) over all {n} batches, "
                 f"{tol.get('logits_compared')} logits: bound √2 × {tol['z']:.3g} × s = {tol['noise_bound']:.3g} "
                 f"(a correct INT8 runtime exceeds it with probability ≤ {tol.get('false_alarm'):g})")
    if tol.get("cap") is not None:
        text += f"; cap {tol['cap']:.3g}"
    return text + f"; limited by the {tol.get('limited_by')}."


def _markdown(report: dict, sparsity: dict | None) -> str:
    primary, pattern = report["primary_metric"], report["pattern"]
    plots = report.get("plots") or {}
    runners = report.get("runners") or {}
    lines = [
        f"# nxm-deploy report: {report['name']}", "",
        f"Model `{report['model']}`, task **{report['task']}**, pattern **{pattern}** "
        f"(n nonzeros kept in every m consecutive weights along the input axis).", "",
    ]
    if report.get("machine"):
        lines += [f"Machine: {report['machine']}; runtime: {report['runtime']}.", ""]
    lines += ["## Summary", "", *_summary(report)]

    lines += ["", "## Accuracy (dev set)", "",
              "Training-stage rows are PyTorch evaluations (Δ vs the PyTorch dense model); validation rows are every "
              f"deployable model on the {report.get('dev_set') or 'dev set'} in this process (Δ vs the dense FP32 ONNX "
              "model).", "",
              f"| model | runtime | metrics | Δ {primary} vs dense{PPL_UNIT if primary == 'perplexity' else ''} |",
              "|---|---|---|---|"]
    for row in report["accuracy"]:
        lines.append(f"| {row['model']} | {row['runtime']} | {_fmt_metrics(row['metrics'])} | {_fmt_delta(row['delta_pt'])} |")
    if report.get("admm_epoch_metrics"):
        lines += ["", "ADMM hard-projected dev score per epoch: " +
                  "; ".join(f"{m['after']}: {m.get(primary, float('nan')):.4f}" for m in report["admm_epoch_metrics"])]
    if report.get("admm_history"):
        lines += ["", "ADMM Z/U updates (relative residual = ||W - Z|| / ||W||; mask change = fraction of weights whose "
                  "kept/pruned state changed since the previous update):", "",
                  "| update | rho | relative residual | mask change |", "|---|---|---|---|"]
        lines += [f"| {h['update']} | {h['rho']:.4g} | {h.get('relative_residual', float('nan')):.3f} | {h['mask_change']:.3f} |"
                  for h in report["admm_history"]]
    if "accuracy" in plots:
        lines += ["", f"![Δ dev {primary} vs dense]({plots['accuracy']})"]

    if report.get("latency"):
        method = report.get("latency_method") or {}
        lines += ["", "## Latency (A/B interleaved in one process)", "",
                  f"{method.get('warmup_runs', '?')} warm-up rounds, {method.get('timed_runs', '?')} timed rounds; in "
                  "round i every model runs once, in an order rotated by i, so machine drift hits all models alike. "
                  "Speedup = ratio of p50s against the dense model of the same backend; p10–p90 = spread of the "
                  "per-round ratios.", "",
                  "| batch × seq | model | runtime | p50 ms | p90 ms | p99 ms | seq/s | speedup vs dense (p10–p90) "
                  "| vs optimized FP32 | vs quantize_dynamic |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in report["latency"]:
            for name, s in row.items():
                if name in _RESERVED or not isinstance(s, dict):
                    continue
                speed = "–" if s.get("speedup") is None else \
                    f"{s['speedup']:.2f}× ({s['speedup_p10']:.2f}–{s['speedup_p90']:.2f})"
                peers = " | ".join("–" if s.get(f"speedup_vs_{p}") is None else f"{s[f'speedup_vs_{p}']:.2f}×"
                                   for p in _PEER_SHORT)
                lines.append(f"| {row['batch_size']}×{row['sequence_length']} | {_label(runners, name)} | "
                             f"{_runtime(runners, name)} | {s['p50_ms']:.2f} | "
                             f"{s['p90_ms']:.2f} | {s['p99_ms']:.2f} | {s['throughput_seq_per_s']:.1f} | {speed} | "
                             f"{peers} |")
        if any(r.get("peer") for r in runners.values()):
            lines += ["", "The two peer rows are what a CPU deployment gets from ONNX Runtime alone: its transformer "
                      "optimizer on the dense FP32 export (fused attention, layer norms and GELU), and "
                      "`quantize_dynamic` on that graph (per-channel INT8 weights, activations quantized at run time). "
                      "Both are scored on the dev set above and timed in the same interleaved rounds."]
            lines += ["", "ONNX Runtime's CPU kernels do not use 2:4 sparsity: a CPU speedup comes from INT8 kernels "
                      "alone. The 2:4 speedup belongs to the TensorRT engines (sparse tensor cores)."]
        for key in ("latency", "speedup"):
            if key in plots:
                lines += ["", f"![{key}]({plots[key]})"]

    diff = report.get("diff")
    if diff:
        lines += ["", "## Output diff (Polygraphy Comparator)", "", f"Inputs: {diff['inputs']}.", ""]
        for key, tol in diff["tolerances"].items():
            extra = ""
            if key == "int8" and tol.get("observed_impl_max_abs_diff") is not None:
                extra = _int8_derivation(tol)
            lines.append(f"- `{key}`: atol {tol['atol']:.3g}, rtol {tol['rtol']:g} — {tol['rule']}.{extra}")
        lines += ["", "| reference | candidate | tolerance | atol | max \\|Δ\\| | mean \\|Δ\\| | argmax agree | batches passed | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in diff["comparisons"]:
            verdict = ("PASS" if c["passed"] else "FAIL") if c["gated"] else "info"
            agree = "–" if c.get("argmax_agreement") is None else f"{100 * c['argmax_agreement']:.1f}%"
            lines.append(f"| {c['reference']} | {c['candidate']} | {c['tolerance']} | {c['atol']:.3g} | "
                         f"{c['max_abs_diff']:.3g} | {c['mean_abs_diff']:.3g} | {agree} | "
                         f"{c['iterations_passed']}/{c['iterations']} | {verdict} |")
        commands = [c for c in diff["comparisons"] if c.get("command")]
        if commands:
            lines += ["", "Re-run a comparison by hand (saved Polygraphy inputs/outputs; exit 0 = within tolerance):", "", "```"]
            for c in commands:
                lines.append(c["command"])
            lines.append("```")
            verified = [c for c in commands if "cli_exit_code" in c]
            for c in verified:
                lines.append(f"\n`polygraphy run` for {c['candidate']} was re-run here: exit {c['cli_exit_code']} "
                             f"({'agrees' if c.get('cli_agrees') else 'DISAGREES'} with the in-process comparison).")
    if report.get("parity"):
        lines += ["", _parity_line(report["parity"])]

    gates = report.get("gates")
    if gates and any(gates.get(k, {}).get("enabled") for k in ("accuracy", "latency", "diff")):
        lines += ["", "## Gates", "", "| gate | threshold | check | value | result |", "|---|---|---|---|---|"]
        word = {True: "PASS", False: "FAIL"}
        if gates["accuracy"]["enabled"]:
            for c in gates["accuracy"]["checks"]:
                lines.append(f"| accuracy | max drop {gates['accuracy']['threshold']} pt | {c['model']} vs "
                             f"{gates['accuracy']['baseline']} | {_fmt_delta(c['delta_pt'])} | {word[c['passed']]} |")
        if gates["latency"]["enabled"]:
            for c in gates["latency"]["checks"]:
                lines.append(f"| speedup | min {gates['latency']['threshold']}× | b{c['batch_size']}×s{c['sequence_length']} "
                             f"{c['backend']}: best {c['model']} | {c['speedup']:.2f}× | {word[c['passed']]} |")
        if gates["diff"]["enabled"]:
            for c in gates["diff"]["checks"]:
                lines.append(f"| output diff | atol {c['atol']:.3g} | {c['candidate']} vs {c['reference']} | "
                             f"{c['max_abs_diff']:.3g} | {word[c['passed']]} |")

    if sparsity:
        lines += ["", f"## Per-layer {pattern} check of the exported INT8 graph", ""]
        if "sparsity" in plots:
            lines += [f"![per-layer density]({plots['sparsity']})", ""]
        lines += ["| module | trained n:m | initializer | shape | axis | groups | violating | density | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in sparsity["layers"]:
            lines.append(f"| {row.get('module') or row['node']} | {'yes' if row['expected_sparse'] else 'no'} | {row['initializer']} | "
                         f"{'×'.join(map(str, row['shape']))} | {row['axis']} | {row['groups_checked']} | {row['groups_violating']} | "
                         f"{row['density']:.3f} | {row['status']} |")
    if report.get("engines"):
        lines += ["", "## TensorRT", ""] + [f"- `{e['name']}`: {e['status']}" for e in report["engines"]]
    return "\n".join(lines) + "\n"
