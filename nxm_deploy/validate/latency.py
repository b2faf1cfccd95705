"""A/B latency measurement: warm-up, interleaved timed runs, percentiles and same-run speedup ratios."""

from __future__ import annotations

import numpy as np


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of a list of durations in seconds, returned in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def measure_ab(runners: dict, feeds: dict[str, np.ndarray], warmup_runs: int, timed_runs: int, baseline: str) -> dict:
    """Time every runner on the same ``feeds``, interleaving runners each round so machine drift cancels.

    Args:
        runners: name -> active runner with ``infer(feed_dict)`` and ``last_inference_s``.
        feeds: int64 ``[B, L]`` arrays.
        warmup_runs: untimed rounds first.
        timed_runs: timed rounds; in round ``i`` the runner order is rotated by ``i``.
        baseline: runner name that speedups are relative to.

    Returns:
        dict: per runner ``p50_ms``, ``p90_ms``, ``p99_ms``, ``mean_ms``, ``throughput_seq_per_s`` (batch / p50),
        ``speedup_vs_<baseline>`` (ratio of p50s) and ``speedup_p10``/``speedup_p90`` (spread of per-round ratios).
    """
    names = list(runners)
    batch = int(next(iter(feeds.values())).shape[0])
    for _ in range(warmup_runs):
        for name in names:
            runners[name].infer(feeds)
    times = {name: [] for name in names}
    for i in range(timed_runs):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            runners[name].infer(feeds)
            times[name].append(runners[name].last_inference_s)
    result = {}
    base = np.asarray(times[baseline])
    for name in names:
        stats = percentiles_ms(times[name])
        stats["throughput_seq_per_s"] = batch * 1e3 / stats["p50_ms"]
        ratios = base / np.asarray(times[name])
        stats[f"speedup_vs_{baseline}"] = float(np.percentile(base, 50) / np.percentile(times[name], 50))
        stats["speedup_p10"] = float(np.percentile(ratios, 10))
        stats["speedup_p90"] = float(np.percentile(ratios, 90))
        stats["runs"] = timed_runs
        result[name] = stats
    return result
