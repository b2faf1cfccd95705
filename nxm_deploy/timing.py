"""A/B latency measurement: warm-up, interleaved timed runs, percentiles and same-run speedup ratios; the one timing
loop and latency summary of validation (:func:`measure_ab`) and the GPU benchmark (``nxm_deploy.gpu.bench``).

Interleaving: in timed round ``i`` every runner runs once, in the runner order rotated by ``i``. A slow period
of the machine (another job, thermal throttling) then hits every runner in the same rounds, and because each
round's ratio ``t_baseline / t_model`` is taken between runs a few milliseconds apart, drift cancels in the
per-round ratios whose p10-p90 spread is reported next to the ratio of the medians.

Percentiles are NumPy's linear interpolation (``np.percentile``, method ``linear``).
"""

from __future__ import annotations

import numpy as np


def latency_stats_ms(ms) -> dict[str, float]:
    """p10/p50/p90/p99 and mean of durations in milliseconds (the one latency summary).

    Raises:
        ValueError: no durations.
    """
    ms = np.asarray(ms, dtype=np.float64)
    if ms.size == 0:
        raise ValueError("no timings")
    return {
        "p10_ms": float(np.percentile(ms, 10)),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    """:func:`latency_stats_ms` of durations given in seconds."""
    return latency_stats_ms(np.asarray(seconds, dtype=np.float64) * 1e3)


def round_order(names: list[str], round_index: int) -> list[str]:
    """The runner order of timed round ``round_index``: ``names`` rotated left by ``round_index``."""
    if not names:
        return []
    k = round_index % len(names)
    return names[k:] + names[:k]


def interleaved(names: list[str], rounds: int, measure, *, warmup: int = 0, warm=None, budget_s: float | None = None,
                min_rounds: int = 3) -> dict[str, list[float]]:
    """The one interleaved timing loop: ``warmup`` untimed rounds (``warm(name)``, default ``measure``), then up to
    ``rounds`` timed rounds; in round ``i`` each name is measured once, in the order :func:`round_order` rotates by
    ``i``. ``measure(name)`` returns one duration (any unit). With ``budget_s``, no round starts after that many
    seconds once ``min_rounds`` rounds are done.

    Returns:
        dict: name -> its durations, in round order.
    """
    import time

    warm = warm or measure
    for _ in range(warmup):
        for name in names:
            warm(name)
    out: dict[str, list[float]] = {name: [] for name in names}
    begin = time.perf_counter()
    for i in range(rounds):
        if budget_s is not None and i >= min_rounds and time.perf_counter() - begin > budget_s:
            break
        for name in round_order(names, i):
            out[name].append(measure(name))
    return out


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

    def measure(name: str) -> float:
        runners[name].infer(feeds)
        return runners[name].last_inference_s

    times = interleaved(names, timed_runs, measure, warmup=warmup_runs)
    chosen = {name: (baselines or {}).get(name, baseline) for name in names}
    return summarize(times, batch, chosen, references)
