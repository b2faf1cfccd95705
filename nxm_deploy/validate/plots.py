"""PNG plots of a run's report (matplotlib, Agg canvas; no pyplot global state).

* ``latency.png`` - p50 latency (bars to p90) and throughput by batch size, one line per model;
* ``speedup.png`` - speedup over the dense baseline per grid point with the p10-p90 spread and the gate;
* ``accuracy.png`` - dev-metric delta vs dense (points) per model, with the accuracy gate;
* ``sparsity.png`` - per-layer density of the exported INT8 graph from the n:m verifier.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from nxm_deploy.run.layout import RunLayout

log = logging.getLogger("nxm_deploy.validate")

_RESERVED = {"batch_size", "sequence_length"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _models(latency: list[dict]) -> list[str]:
    names: list[str] = []
    for row in latency:
        names += [k for k, v in row.items() if k not in _RESERVED and isinstance(v, dict) and k not in names]
    return names


def plot_latency(latency: list[dict], path: Path, labels: dict[str, str] | None = None) -> Path:
    """p50 latency (error bar up to p90) and throughput against batch size; one line per model and seq length."""
    labels = labels or {}
    fig = _figure(11, 4.2)
    ax_lat, ax_thr = fig.subplots(1, 2)
    seqs = sorted({row["sequence_length"] for row in latency})
    styles = ["-", "--", ":", "-."]
    for m, name in enumerate(_models(latency)):
        color = f"C{m % 10}"
        for k, seq in enumerate(seqs):
            rows = sorted((r for r in latency if r["sequence_length"] == seq and name in r), key=lambda r: r["batch_size"])
            if not rows:
                continue
            x = [r["batch_size"] for r in rows]
            p50 = [r[name]["p50_ms"] for r in rows]
            up = [r[name]["p90_ms"] - r[name]["p50_ms"] for r in rows]
            label = labels.get(name, name) + (f" (seq {seq})" if len(seqs) > 1 else "")
            ax_lat.errorbar(x, p50, yerr=[[0] * len(up), up], marker="o", capsize=3, color=color,
                            linestyle=styles[k % len(styles)], label=label)
            ax_thr.plot(x, [r[name]["throughput_seq_per_s"] for r in rows], marker="o", color=color,
                        linestyle=styles[k % len(styles)], label=label)
    batches = sorted({row["batch_size"] for row in latency})
    for ax in (ax_lat, ax_thr):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size" + (f" (sequence length {seqs[0]})" if len(seqs) == 1 else ""))
        ax.grid(True, which="both", alpha=0.3)
    ax_lat.set_yscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax_lat.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_lat.yaxis.set_major_formatter(ScalarFormatter())
    ax_lat.yaxis.set_minor_formatter(NullFormatter())
    ax_lat.set_ylabel("latency per batch, ms (p50, bar to p90)")
    ax_lat.set_title("Latency by batch size")
    ax_thr.set_ylabel("throughput, sequences/s (batch / p50)")
    ax_thr.set_title("Throughput by batch size")
    ax_lat.legend(fontsize=8)
    return _save(fig, path)


def plot_speedup(latency: list[dict], path: Path, min_speedup: float | None = None,
                 labels: dict[str, str] | None = None) -> Path:
    """Grouped bars: speedup over each model's dense baseline per grid point, error bars p10-p90 of the
    per-round ratios; dashed line at 1x and the gate."""
    labels = labels or {}
    names = [n for n in _models(latency)
             if any(n in r and r[n].get("speedup") is not None and r[n].get("baseline") != n for r in latency)]
    fig = _figure(max(7.5, 2.0 + 1.8 * len(latency)), 4.2)
    ax = fig.subplots()
    width = 0.8 / max(1, len(names))
    tops = [1.0, float(min_speedup or 0)]
    for m, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for i, row in enumerate(latency):
            s = row.get(name)
            if not s or s.get("speedup") is None:
                continue
            xs.append(i + (m - (len(names) - 1) / 2) * width)
            ys.append(s["speedup"])
            lo.append(max(0.0, s["speedup"] - s.get("speedup_p10", s["speedup"])))
            hi.append(max(0.0, s.get("speedup_p90", s["speedup"]) - s["speedup"]))
        bars = ax.bar(xs, ys, width=width * 0.95, yerr=[lo, hi], capsize=3, color=f"C{(m + 1) % 10}",
                      label=f"{labels.get(name, name)} vs {latency[0].get(name, {}).get('baseline', 'dense')}")
        ax.bar_label(bars, labels=[f"{y:.2f}×" for y in ys], fontsize=8, label_type="center", color="white",
                     fontweight="bold")
        tops += [y + h for y, h in zip(ys, hi)]
    ax.axhline(1.0, color="black", linewidth=1, linestyle=":")
    if min_speedup is not None:
        ax.axhline(float(min_speedup), color="red", linewidth=1.2, linestyle="--", label=f"gate: min {min_speedup}x")
    ax.set_xticks(range(len(latency)), [f"b{r['batch_size']}×s{r['sequence_length']}" for r in latency])
    ax.set_ylabel("speedup over dense (× , p50 ratio)")
    ax.set_title("Speedup vs dense, same run, interleaved (error bars: p10–p90 of per-round ratios)", fontsize=10)
    ax.set_ylim(0, max(tops) * 1.15 + 0.1)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy(rows: list[dict], metric: str, path: Path, max_drop_pt: float | None = None) -> Path:
    """Horizontal bars: delta of the dev primary metric vs dense, in points, per model (``rows``: label, delta_pt,
    group)."""
    rows = [r for r in rows if r.get("delta_pt") is not None]
    fig = _figure(8.5, 1.6 + 0.42 * max(1, len(rows)))
    ax = fig.subplots()
    ys = list(range(len(rows)))[::-1]
    colors = ["C2" if r["delta_pt"] >= 0 else "C3" for r in rows]
    bars = ax.barh(ys, [r["delta_pt"] for r in rows], color=colors, height=0.6)
    ax.bar_label(bars, labels=[f"{r['delta_pt']:+.2f}" for r in rows], fontsize=8, padding=3)
    ax.set_yticks(ys, [r["label"] for r in rows], fontsize=8)
    ax.axvline(0, color="black", linewidth=1)
    if max_drop_pt is not None:
        ax.axvline(-float(max_drop_pt), color="red", linestyle="--", linewidth=1.2, label=f"gate: max drop {max_drop_pt} pt")
        fig.legend(fontsize=8, loc="outside lower right", frameon=False)
    lim = max([abs(r["delta_pt"]) for r in rows] + [float(max_drop_pt or 0), 0.5]) * 1.35
    ax.set_xlim(-lim, lim)
    ax.set_xlabel(f"Δ dev {metric} vs dense baseline (points)")
    ax.set_title(f"Dev {metric}: change against the dense model")
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


_SHORT = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
          "attention.output.dense": "attn_out", "intermediate.dense": "ffn1", "output.dense": "ffn2"}


def _short(module: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``L3.q``; ``/model/bert/pooler/dense/Gemm`` -> ``pooler``."""
    parts = module.split(".")
    if "layer" in parts and parts.index("layer") + 1 < len(parts):
        i = parts.index("layer")
        rest = ".".join(parts[i + 2:])
        return f"L{parts[i + 1]}.{_SHORT.get(rest, rest)}"
    words = [w for w in module.replace("/", ".").split(".") if w and w not in ("model", "bert", "dense", "Gemm", "MatMul", "weight")]
    return words[-1] if words else module


def plot_sparsity(sparsity: dict, path: Path, pattern: str = "2:4") -> Path:
    """Per-layer density of the exported INT8 graph: green = verified n:m, red = expected n:m but not, grey = not
    trained n:m; dashed line at n/m."""
    layers = sparsity.get("layers", [])
    n, m = (int(v) for v in str(pattern).split(":"))
    fig = _figure(max(8.0, 0.26 * len(layers) + 2), 4.2)
    ax = fig.subplots()
    colors = ["C2" if r["status"] == "sparse" else ("C3" if r.get("expected_sparse") else "0.6") for r in layers]
    ax.bar(range(len(layers)), [r["density"] for r in layers], color=colors)
    ax.axhline(n / m, color="black", linestyle="--", linewidth=1, label=f"{pattern} density {n / m:.2f}")
    ax.set_xticks(range(len(layers)), [_short(r.get("module") or r.get("node") or "?") for r in layers],
                  rotation=90, fontsize=7)
    ax.set_ylim(0, 1.3)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_ylabel("density (nonzero fraction)")
    expected = [r for r in layers if r.get("expected_sparse")]
    ok = sum(r["status"] == "sparse" for r in expected)
    ax.set_title(f"Weight density per layer of the exported INT8 graph: {ok}/{len(expected)} trained layers "
                 f"verified {pattern}", fontsize=10)
    from matplotlib.patches import Patch

    handles = [Patch(color="C2", label=f"verified {pattern}"), Patch(color="C3", label=f"expected {pattern}, failed"),
               Patch(color="0.6", label="not trained sparse")]
    line = ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles + line, fontsize=8, loc="upper center", ncol=4, frameon=False)
    return _save(fig, path)


def write_plots(run_dir: Path, *, latency: list[dict] | None, accuracy_rows: list[dict], metric: str,
                sparsity: dict | None, pattern: str, labels: dict[str, str], gates: dict | None = None) -> dict[str, str]:
    """Every plot the data allows, under ``<run_dir>/plots``; returns name -> path relative to ``run_dir``.

    A missing matplotlib or a failing plot is logged and skipped (the report is still written).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return {}
    gates = gates or {}
    layout = RunLayout(run_dir)
    out_dir = layout.plots_dir
    jobs = []
    if latency:
        jobs.append(("latency", lambda p: plot_latency(latency, p, labels)))
        jobs.append(("speedup", lambda p: plot_speedup(latency, p, (gates.get("latency") or {}).get("threshold"), labels)))
    if any(r.get("delta_pt") is not None for r in accuracy_rows):
        jobs.append(("accuracy", lambda p: plot_accuracy(accuracy_rows, metric, p, (gates.get("accuracy") or {}).get("threshold"))))
    if sparsity and sparsity.get("layers"):
        jobs.append(("sparsity", lambda p: plot_sparsity(sparsity, p, pattern)))
    written = {}
    for name, job in jobs:
        try:
            job(out_dir / f"{name}.png")
            written[name] = layout.relative(out_dir / f"{name}.png")
        except Exception as exc:  # noqa: BLE001 - a plot must not fail the report
            log.warning("plot %s failed: %s: %s", name, type(exc).__name__, exc)
    return written
