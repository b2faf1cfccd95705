"""CI gates on a validation result: accuracy drop, speedup, output diff.

Thresholds come from the recipe's ``validate`` section (read with ``getattr`` so recipes without them work):

* ``max_accuracy_drop_pt`` (float | None): every validated model's dev primary metric may be at most this many
  points (100 x metric) below the dense baseline (ONNX Runtime CPU dense FP32, same dev set, same process); for
  perplexity (lower is better) a point is 1 % of the baseline's perplexity (:func:`delta_pt`).
* ``min_speedup`` (float | None): at every latency grid point, in every backend that has a dense baseline,
  the best sparse model's speedup (ratio of p50 latencies, measured interleaved in the same run) must reach it.
* ``diff_gate`` (bool, default False): every gated output comparison must pass its tolerance.

:func:`raise_for_gates` raises :class:`AccuracyRegressionError` (accuracy failed, whatever else failed too),
else :class:`LatencyRegressionError`, else :class:`OutputMismatchError`.
"""

from __future__ import annotations

from nxm_deploy.errors import AccuracyRegressionError, LatencyRegressionError, OutputMismatchError

GATE_DEFAULTS = {"max_accuracy_drop_pt": None, "min_speedup": None, "diff_gate": False}
_RESERVED = {"batch_size", "sequence_length"}


def gate_settings(validate_cfg) -> dict:
    """The gate thresholds of a recipe's ``validate`` section (defaults where the recipe has no such field)."""
    return {k: getattr(validate_cfg, k, default) for k, default in GATE_DEFAULTS.items()}


def delta_pt(metrics: dict | None, base: dict | None, key: str) -> float | None:
    """Change of ``metrics[key]`` against ``base[key]`` in points, positive = better: ``100 * (metric - base)``;
    for ``perplexity`` (lower is better) ``-100 * (ppl / base_ppl - 1)``, the relative increase in percent with
    the sign flipped. None when either is missing."""
    if not metrics or not base or metrics.get(key) is None or base.get(key) is None:
        return None
    if key == "perplexity":
        return -100.0 * (float(metrics[key]) / float(base[key]) - 1.0)
    return 100.0 * (float(metrics[key]) - float(base[key]))


def accuracy_gate(metrics: dict[str, dict], baseline: str, primary: str, max_drop_pt: float | None) -> dict:
    """Check every model in ``metrics`` (except ``baseline``) against ``max_drop_pt``.

    Returns:
        dict: ``enabled``, ``threshold``, ``baseline``, ``metric``, ``checks`` (model, delta_pt, passed), ``passed``.
    """
    base = metrics.get(baseline)
    checks = []
    for name, values in metrics.items():
        if name == baseline:
            continue
        delta = delta_pt(values, base, primary)
        passed = True if max_drop_pt is None or delta is None else (-delta) <= float(max_drop_pt) + 1e-9
        checks.append({"model": name, "delta_pt": delta, "passed": passed})
    return {"enabled": max_drop_pt is not None, "threshold": max_drop_pt, "baseline": baseline, "metric": primary,
            "checks": checks, "passed": all(c["passed"] for c in checks)}


def latency_gate(latency: list[dict], runners: dict[str, dict], min_speedup: float | None) -> dict:
    """Best sparse speedup per grid point and backend (runners: name -> ``describe()`` dict with ``backend``,
    ``sparse``); backends without a dense baseline in the same run are not checked.

    Returns:
        dict: ``enabled``, ``threshold``, ``checks`` (batch_size, sequence_length, backend, model, speedup,
        speedup_p10, speedup_p90, passed), ``passed``.
    """
    checks = []
    for row in latency or []:
        best: dict[str, tuple[str, dict]] = {}
        for name, stats in row.items():
            if name in _RESERVED or not isinstance(stats, dict) or stats.get("speedup") is None:
                continue
            info = runners.get(name, {})
            if not info.get("sparse") or stats.get("baseline") == name:
                continue
            backend = info.get("backend", "?")
            if backend not in best or stats["speedup"] > best[backend][1]["speedup"]:
                best[backend] = (name, stats)
        for backend, (name, stats) in best.items():
            passed = True if min_speedup is None else stats["speedup"] >= float(min_speedup)
            checks.append({"batch_size": row["batch_size"], "sequence_length": row["sequence_length"],
                           "backend": backend, "model": name, "baseline": stats.get("baseline"),
                           "speedup": stats["speedup"], "speedup_p10": stats.get("speedup_p10"),
                           "speedup_p90": stats.get("speedup_p90"), "passed": passed})
    return {"enabled": min_speedup is not None, "threshold": min_speedup, "checks": checks,
            "passed": all(c["passed"] for c in checks)}


def diff_gate(diff: dict | None, enabled: bool) -> dict:
    checks = [{"reference": c["reference"], "candidate": c["candidate"], "max_abs_diff": c["max_abs_diff"],
               "atol": c["atol"], "passed": c["passed"] or not enabled}
              for c in (diff or {}).get("comparisons", []) if c.get("gated")]
    return {"enabled": bool(enabled), "checks": checks, "passed": all(c["passed"] for c in checks)}


def evaluate_gates(settings: dict, *, metrics: dict, baseline: str, primary: str, latency: list[dict],
                   runners: dict[str, dict], diff: dict | None) -> dict:
    """All gates; ``passed`` is False when any enabled gate failed."""
    gates = {
        "accuracy": accuracy_gate(metrics, baseline, primary, settings.get("max_accuracy_drop_pt")),
        "latency": latency_gate(latency, runners, settings.get("min_speedup")),
        "diff": diff_gate(diff, bool(settings.get("diff_gate"))),
    }
    gates["passed"] = all(g["passed"] for g in gates.values() if isinstance(g, dict))
    return gates


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def raise_for_gates(gates: dict, report: str | None = None) -> None:
    """Raise the error of the first failed gate (accuracy, latency, diff); its message names every failure."""
    acc = [c for c in gates.get("accuracy", {}).get("checks", []) if not c["passed"]]
    lat = [c for c in gates.get("latency", {}).get("checks", []) if not c["passed"]]
    dif = [c for c in gates.get("diff", {}).get("checks", []) if not c["passed"]]
    if not (acc or lat or dif):
        return
    parts = []
    if acc:
        g = gates["accuracy"]
        parts.append(f"accuracy: {', '.join(c['model'] + ' ' + _fmt(c['delta_pt'], '+.2f') + ' pt' for c in acc)} "
                     f"{g['metric']} vs {g['baseline']} (max drop {g['threshold']} pt)")
    if lat:
        parts.append("latency: " + ", ".join(
            f"b{c['batch_size']}xs{c['sequence_length']} {c['backend']} best {c['model']} {c['speedup']:.2f}x"
            for c in lat) + f" (min speedup {gates['latency']['threshold']}x)")
    if dif:
        parts.append("output diff: " + ", ".join(
            f"{c['candidate']} vs {c['reference']} max |diff| {c['max_abs_diff']:.3g} > atol {c['atol']:.3g}" for c in dif))
    message = "Validation gate failed: " + "; ".join(parts) + "."
    hint = f"See {report}." if report else None
    cls = AccuracyRegressionError if acc else LatencyRegressionError if lat else OutputMismatchError
    raise cls(message, failures=acc + lat + dif, report=report, hint=hint)
