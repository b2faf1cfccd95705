"""A/B latency measurement: warm-up, interleaved timed runs, percentiles and same-run speedup ratios.

Interleaving: in timed round ``i`` every runner runs once, in the runner order rotated by ``i``. A slow period
of the machine (another job, thermal throttling) then hits every runner in the same rounds, and because each
round's ratio ``t_baseline / t_model`` is taken between runs a few milliseconds apart, drift cancels in the
per-round ratios whose p10-p90 spread is reported next to the ratio of the medians.

Percentiles are NumPy's linear interpolation (``np.percentile``, method ``linear``).
"""

from __future__ import annotations

import numpy as np


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of a list of durations in seconds, returned in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no timings")
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def round_order(names: list[str], round_index: int) -> list[str]:
    """The runner order of timed round ``round_index``: ``names`` rotated left by ``round_index``."""
    if not names:
        return []
    k = round_index % len(names)
    return names[k:] + names[:k]


def speedup_stats(base_s: list[float], model_s: list[float]) -> dict[str, float]:
    """Speedup of a model over its baseline from paired per-round timings (same length, round ``i`` with ``i``).

    Returns:
        dict: ``speedup`` = p50(base) / p50(model); ``speedup_p10`` / ``speedup_p90`` = 10th / 90th percentile of
        the per-round ratios ``base[i] / model[i]``.
    """
    base, model = np.asarray(base_s, np.float64), np.asarray(model_s, np.float64)
    if base.shape != model.shape or base.size == 0:
        raise ValueError(f"paired timings needed, got {base.shape} and {model.shape}")
    ratios = base / model
    return {
        "speedup": float(np.percentile(base, 50) / np.percentile(model, 50)),
        "speedup_p10": float(np.percentile(ratios, 10)),
        "speedup_p90": float(np.percentile(ratios, 90)),
    }


def summarize(times: dict[str, list[float]], batch_size: int, baselines: dict[str, str],
              references: dict[str, list[str]] | None = None) -> dict:
    """Per runner: percentiles (ms), ``throughput_seq_per_s`` (batch / p50), and the speedup over its baseline
    (``baseline``, ``speedup``, ``speedup_p10``, ``speedup_p90`` and the same ratio as ``speedup_vs_<baseline>``);
    ``references``: more runners per runner to give the ratio of p50s against, as ``speedup_vs_<reference>``
    (e.g. ONNX Runtime's optimized FP32 graph and its ``quantize_dynamic`` model beside the plain FP32 baseline)."""
    result = {}
    for name, seconds in times.items():
        stats = percentiles_ms(seconds)
        stats["throughput_seq_per_s"] = batch_size * 1e3 / stats["p50_ms"]
        base = baselines.get(name)
        if base is not None and base in times:
            sp = speedup_stats(times[base], seconds)
            stats["baseline"] = base
            stats[f"speedup_vs_{base}"] = sp["speedup"]
            stats.update(sp)
        for ref in (references or {}).get(name, ()):
            if ref in times and ref != name:
                stats[f"speedup_vs_{ref}"] = speedup_stats(times[ref], seconds)["speedup"]
        stats["runs"] = len(seconds)
        result[name] = stats
    return result


def measure_ab(runners: dict, feeds: dict[str, np.ndarray], warmup_runs: int, timed_runs: int, baseline: str,
               baselines: dict[str, str] | None = None, references: dict[str, list[str]] | None = None) -> dict:
    """Time every runner on the same ``feeds``, interleaving runners each round so machine drift cancels.

    Args:
        runners: name -> active runner with ``infer(feed_dict)`` and ``last_inference_s``.
        feeds: int64 ``[B, L]`` arrays.
        warmup_runs: untimed rounds first (each runner once per round).
        timed_runs: timed rounds; in round ``i`` the runner order is rotated by ``i`` (:func:`round_order`).
        baseline: runner name that speedups are relative to by default.
        baselines: per-runner baseline overrides (e.g. the dense engine for TensorRT runners).
        references: per runner, more runners to give ``speedup_vs_<name>`` against (:func:`summarize`).

    Returns:
        dict: per runner (:func:`summarize`) ``p50_ms``, ``p90_ms``, ``p99_ms``, ``mean_ms``,
        ``throughput_seq_per_s``, ``baseline``, ``speedup``, ``speedup_vs_<baseline>``, ``speedup_p10``,
        ``speedup_p90``, ``runs``.
    """
    names = list(runners)
    if baseline not in runners:
        raise ValueError(f"baseline {baseline!r} is not one of the runners {names}")
    batch = int(next(iter(feeds.values())).shape[0])
    for _ in range(warmup_runs):
        for name in names:
            runners[name].infer(feeds)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(timed_runs):
        for name in round_order(names, i):
            runners[name].infer(feeds)
            times[name].append(runners[name].last_inference_s)
    chosen = {name: (baselines or {}).get(name, baseline) for name in names}
    return summarize(times, batch, chosen, references)
