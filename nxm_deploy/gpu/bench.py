"""``nxm-deploy bench-gpu``: what 2:4 and INT8 give on this NVIDIA GPU through PyTorch, measured in one process.

(a) **GEMMs** at a model's own Linear shapes (``N`` out x ``K`` in) for ``M`` tokens in :data:`GEMM_TOKENS`:
    dense FP16 (``F.linear``, cuBLAS), 2:4 FP16 (``torch._cslt_sparse_mm``), dense INT8 (``torch._int_mm``, INT32
    out), 2:4 INT8 (``torch._cslt_sparse_mm``, alpha-scaled FP16 out). Operands are prepared (quantized,
    compressed) before timing. Each timed sample is ``reps`` back-to-back calls between two CUDA events, divided
    by ``reps``; the variants are interleaved per round (order rotated each round, as in
    :mod:`nxm_deploy.timing`); medians. Timed twice: launched eagerly from Python, and replayed from
    one CUDA graph of the ``reps`` calls (no launch / descriptor set-up cost on the host).
(b) **End to end**: a BERT encoder (``BertModel``, random weights with the 2:4 pattern imposed on every encoder
    Linear by magnitude: speed does not depend on the values, only on the pattern) at ``batch x seq`` in
    :data:`E2E_SHAPES`, in the four variants of :func:`nxm_deploy.gpu.kernels.convert_model` (INT8 activation
    scales calibrated by max on one forward; attention in FP16 through SDPA in every variant), eager and
    CUDA-graphed, one forward per timed sample, interleaved; plus each variant's cosine similarity to the
    dense FP16 output on the timed input.
(c) the environment line: GPU, driver, torch, CUDA, cuSPARSELt.

Writes ``gpu_<gpu>.json`` and ``gpu_<gpu>.md`` into the output folder (default ``benchmarks/``).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import re
import subprocess
from pathlib import Path

import numpy as np

from nxm_deploy.errors import ConfigError, MissingDependencyError

log = logging.getLogger("nxm_deploy.gpu")

#: BERT-style encoder shapes: layers, hidden, heads, intermediate
SHAPE_SETS = {
    "minilm": {"num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536},
    "bert-base": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
    "bert-large": {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096},
}
GEMM_TOKENS = (128, 1024, 4096)
E2E_SHAPES = ((1, 128), (32, 128), (32, 384))
GEMM_VARIANTS = ("dense-fp16", "sparse-fp16", "dense-int8", "sparse-int8")
#: a GEMM whose synchronized eager call takes longer than this (ms) is not put in the eager timing loop: its
#: eager time is that host wall time (cuSPARSELt FP16 plan set-up on torch 2.11: 200-300 ms per call)
SLOW_EAGER_MS = 20.0
#: the goals of the GPU issue, checked in every report: (what, shape set, measured key, target)
GOALS = (
    ("2:4 INT8 vs dense INT8, FFN GEMMs, M = 4096 (graphed)", "bert-base", "gemm_ffn_int8", 1.2),
    ("end to end 2:4 INT8 vs dense FP16, 32x128 (graphed)", "bert-base", "e2e_int8_vs_fp16", 1.8),
)


def require_cuda():
    """The ``torch`` module when a CUDA device is usable.

    Raises:
        MissingDependencyError: no CUDA device (exit 3 from the CLI).
    """
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError("bench-gpu needs an NVIDIA GPU: torch.cuda.is_available() is False here.",
                                     hint="Run it on a machine with an NVIDIA GPU and a CUDA build of torch "
                                          "(tools/gpu_check.sh runs every GPU check).")
    return torch


def environment() -> dict:
    """GPU, SM, driver, torch, CUDA and cuSPARSELt versions, and one ``line`` of them."""
    torch = require_cuda()
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = None
    try:
        cusparselt = torch.backends.cusparselt.version()
    except Exception:  # noqa: BLE001 - older torch / no cuSPARSELt
        cusparselt = None
    env = {"gpu": props.name, "sm": f"{props.major}{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
           "multiprocessors": props.multi_processor_count, "driver": driver, "torch": torch.__version__,
           "cuda": torch.version.cuda, "cusparselt": cusparselt}
    env["line"] = (f"{env['gpu']} (SM {env['sm']}, {env['memory_gib']} GiB), driver {driver}, torch {env['torch']}, "
                   f"CUDA {env['cuda']}, cuSPARSELt {cusparselt}")
    return env


def gpu_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``: the first word with a digit, lower case, else the whole name."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name) if w and w.upper() not in ("NVIDIA", "GEFORCE", "TESLA")]
    pick = next((w for w in words if any(c.isdigit() for c in w)), "-".join(words) or "gpu")
    return pick.lower()


def shape_set_of_run(run_dir: str | Path) -> tuple[str, dict]:
    """``(name, encoder dims)`` of a run's dense model (``dense/config.json``).

    Raises:
        ConfigError: not a run directory with a trained dense model.
    """
    from nxm_deploy.run.reader import read_model_config

    config, data = read_model_config(run_dir, ("dense",))
    if config is None:
        raise ConfigError(f"{run_dir} has no dense model config.", hint="Give a run directory whose dense stage finished.")
    dims = {k: int(data[k]) for k in SHAPE_SETS["minilm"] if k in data}
    if len(dims) != 4:
        raise ConfigError(f"{config} is not a BERT-style encoder config (needs {', '.join(SHAPE_SETS['minilm'])}).")
    return f"run:{Path(run_dir).name}", dims


def linear_shapes(dims: dict) -> dict[str, tuple[int, int]]:
    """The encoder Linears' ``(N out, K in)``: attention (Q, K, V, output are all H x H), FFN up and down."""
    h, i = dims["hidden_size"], dims["intermediate_size"]
    return {"attention HxH": (h, h), "FFN up": (i, h), "FFN down": (h, i)}


# ----------------------------------------------------------------------------------------------- timing


def _time_interleaved(fns: dict, rounds: int, warmup: int, reps: int = 1,
                      budget_s: float | None = None) -> dict[str, list[float]]:
    """Per name, up to ``rounds`` samples in ms of one call of ``fns[name]`` (``reps`` calls between two CUDA events);
    with ``budget_s``, rounds stop once that many seconds have passed (at least 3 rounds). The loop is
    :func:`nxm_deploy.timing.interleaved`."""
    import torch

    from nxm_deploy.timing import interleaved

    def calls(name: str) -> None:
        for _ in range(reps):
            fns[name]()

    def measure(name: str) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        calls(name)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps

    names = list(fns)
    if warmup:
        interleaved(names, 0, measure, warmup=warmup, warm=calls)
        torch.cuda.synchronize()
    return interleaved(names, rounds, measure, budget_s=budget_s)


def _wall_call_s(fn, calls: int = 3) -> float:
    """Median wall time in seconds of one synchronized call of ``fn`` (after one untimed call)."""
    import time

    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _graph_of(fn, reps: int, warmup: int = 2):
    """A zero-argument function replaying one CUDA graph of ``reps`` calls of ``fn`` (None if capture fails)."""
    import torch

    from nxm_deploy.gpu.graphs import capture

    def calls():
        for _ in range(reps):
            fn()

    try:
        graph, _, _ = capture(calls, warmup)
    except RuntimeError as exc:
        log.warning("CUDA graph capture failed: %s", str(exc).splitlines()[0])
        torch.cuda.synchronize()
        return None
    return graph.replay


def _summary(samples: dict[str, list[float]]) -> dict[str, dict]:
    """Per name, the latency summary (:func:`nxm_deploy.timing.latency_stats_ms`) of samples in ms, and their count."""
    from nxm_deploy.timing import latency_stats_ms

    return {name: {**latency_stats_ms(v), "samples": len(v)} for name, v in samples.items()}


# ----------------------------------------------------------------------------------------------- (a) GEMMs


def gemm_operands(n: int, k: int, m: int, seed: int = 0) -> dict:
    """Random 2:4 weight ``[n, k]`` and activations ``[m, k]`` on the GPU, prepared for the four kernels."""
    torch = require_cuda()
    from nxm_deploy.gpu.kernels import SemiSparseLinear
    from nxm_deploy.quantization.fake_quant import int8_codes
    from nxm_deploy.sparsity import nm_mask

    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=gen)
    w = w * nm_mask(w, "2:4")
    x = torch.randn(m, k, device="cuda", generator=gen)
    s_w = w.abs().amax(dim=1) / 127
    s_x = x.abs().amax() / 127
    return {"w16": w.half(), "x16": x.half(), "xq": int8_codes(x, s_x), "wq_t": int8_codes(w, s_w.reshape(-1, 1)).t(),
            "sparse16": SemiSparseLinear(w, None), "sparse8": SemiSparseLinear(w, None, input_scale=s_x, weight_scale=s_w)}


def gemm_table(dims: dict, tokens=GEMM_TOKENS, rounds: int = 30, progress=None, budget_s: float = 0.6,
               deadline: float | None = None) -> list[dict]:
    """Rows ``{layer, n, k, m, reps, call_wall_ms, eager: {variant: stats}, graphed: {...}, speedups}`` (see the
    module docstring). ``reps`` calls per sample: enough for about 2 ms of work, at most 20; each timing loop
    stops after ``budget_s`` seconds (at least 3 rounds); no cell starts after ``deadline`` (``time.perf_counter``).
    """
    import time

    torch = require_cuda()
    import torch.nn.functional as F

    rows = []
    for layer, (n, k) in linear_shapes(dims).items():
        for m in tokens:
            if deadline is not None and time.perf_counter() > deadline:
                return rows
            ops = gemm_operands(n, k, m)
            sparse16, sparse8, xq, x16 = ops["sparse16"], ops["sparse8"], ops["xq"], ops["x16"]
            w16, wq_t, xq_t = ops["w16"], ops["wq_t"], xq.t()
            fns = {
                "dense-fp16": lambda: F.linear(x16, w16),
                "sparse-fp16": lambda: torch._cslt_sparse_mm(sparse16.packed, x16.t(), transpose_result=True),
                "dense-int8": lambda: torch._int_mm(xq, wq_t),
                "sparse-int8": lambda: torch._cslt_sparse_mm(sparse8.packed, xq_t, alpha=sparse8.alpha,
                                                             out_dtype=torch.float16, transpose_result=True),
            }
            row = {"layer": layer, "n": n, "k": k, "m": m, "errors": {}, "call_wall_ms": {}}
            ok = {}
            for name, fn in fns.items():
                try:
                    row["call_wall_ms"][name] = _wall_call_s(fn, calls=2) * 1e3
                    ok[name] = fn
                except RuntimeError as exc:
                    row["errors"][name] = str(exc).splitlines()[0][:200]
            # a call with tens of ms of host set-up: its eager time is that wall time; not worth a timing loop
            slow = {name for name, ms in row["call_wall_ms"].items() if ms > SLOW_EAGER_MS}
            fast = {name: fn for name, fn in ok.items() if name not in slow}
            slowest = max((row["call_wall_ms"][name] for name in fast), default=1.0) * 1e-3
            reps = row["reps"] = int(min(20, max(1, 2e-3 // max(slowest, 1e-6))))
            row["eager"] = _summary(_time_interleaved(fast, rounds, warmup=1, reps=reps, budget_s=budget_s))
            for name in sorted(slow):
                ms = row["call_wall_ms"][name]
                row["eager"][name] = {"p50_ms": ms, "p10_ms": ms, "p90_ms": ms, "samples": 2, "host_wall": True}
            graphed = {name: g for name, g in ((name, _graph_of(fn, reps, warmup=0 if name in slow else 2))
                                               for name, fn in ok.items()) if g is not None}
            row["graph_capture_failed"] = sorted(set(ok) - set(graphed))
            row["graphed"] = {name: {**s, "p50_ms": s["p50_ms"] / reps, "p10_ms": s["p10_ms"] / reps,
                                     "p90_ms": s["p90_ms"] / reps}
                              for name, s in _summary(_time_interleaved(graphed, rounds, warmup=1,
                                                                        budget_s=budget_s)).items()}
            for mode in ("eager", "graphed"):
                t = {name: s["p50_ms"] for name, s in row[mode].items()}
                row[mode + "_speedups"] = _ratios(t)
                for name, s in row[mode].items():
                    s["tflops"] = 2 * m * n * k / (s["p50_ms"] * 1e-3) / 1e12
            rows.append(row)
            del ops, fns
            if progress is not None:
                progress.update(1)
    return rows


def _ratios(t: dict[str, float]) -> dict[str, float | None]:
    def r(base, model):
        return t[base] / t[model] if base in t and model in t and t[model] > 0 else None

    return {"sparse_fp16_vs_dense_fp16": r("dense-fp16", "sparse-fp16"),
            "dense_int8_vs_dense_fp16": r("dense-fp16", "dense-int8"),
            "sparse_int8_vs_dense_int8": r("dense-int8", "sparse-int8"),
            "sparse_int8_vs_dense_fp16": r("dense-fp16", "sparse-int8")}


# ----------------------------------------------------------------------------------------------- (b) end to end


def encoder_targets(model) -> list[str]:
    """fqns of every Linear inside the encoder layers (Q, K, V, attention output, FFN up and down)."""
    from torch import nn

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and ".layer." in name]


def build_encoders(dims: dict, calib_shape=(8, 128), seed: int = 0) -> tuple[dict, dict]:
    """``({variant: BertModel on the GPU}, {variant: conversion summary})`` with random 2:4 weights."""
    torch = require_cuda()
    from transformers import BertConfig, BertModel

    from nxm_deploy.gpu.kernels import VARIANTS, calibrate_inputs, convert_model
    from nxm_deploy.sparsity import nm_mask

    torch.manual_seed(seed)
    config = BertConfig(**dims, vocab_size=30522, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    base = BertModel(config, add_pooling_layer=False).eval().cuda()
    targets = encoder_targets(base)
    with torch.no_grad():
        for name in targets:
            w = base.get_submodule(name).weight
            w.mul_(nm_mask(w, "2:4"))
    ids = torch.randint(1000, 30000, calib_shape, device="cuda")
    calibration = calibrate_inputs(base, targets, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    models, summary = {}, {}
    for variant in VARIANTS:
        model = copy.deepcopy(base)
        records = convert_model(model, variant, targets, calibration=calibration)
        kernels: dict[str, int] = {}
        for rec in records:
            kernels[rec.kernel] = kernels.get(rec.kernel, 0) + 1
        summary[variant] = {"kernels": kernels, "dense_layers": [{"name": r.name, "reason": r.reason}
                                                                 for r in records if r.reason]}
        models[variant] = model
    del base
    torch.cuda.empty_cache()
    return models, summary


def predicted_eager_s(dims: dict, gemm_rows: list[dict], variant: str) -> float | None:
    """Host seconds of the Linears of one eager encoder forward in ``variant``, from the GEMM table's synchronized
    single-call wall times at M = 1024 (4 attention GEMMs, FFN up and down per layer); None without those rows."""
    walls = {r["layer"]: r.get("call_wall_ms", {}).get(variant) for r in gemm_rows if r["m"] == 1024}
    if not walls or any(v is None for v in walls.values()):
        return None
    per_layer = 4 * walls.get("attention HxH", 0.0) + walls.get("FFN up", 0.0) + walls.get("FFN down", 0.0)
    return dims["num_hidden_layers"] * per_layer / 1e3


def e2e_table(dims: dict, shapes=E2E_SHAPES, rounds: int = 20, progress=None, budget_s: float = 3.0,
              max_call_s: float = 1.0, deadline: float | None = None, gemm_rows: list[dict] | None = None,
              on_row=None) -> tuple[list[dict], dict]:
    """Rows ``{batch, seq, eager: {variant: stats}, graphed: {...}, speedups, cosine}`` and the conversion summary.

    Each timing loop stops after ``budget_s`` seconds (at least 3 rounds). A variant whose eager forward would take
    longer than ``max_call_s`` (:func:`predicted_eager_s` from ``gemm_rows``, else its first call) is not run
    eagerly: it is captured without warm-up and checked by its output's cosine to the dense FP16 one (the same
    2:4 weights), and ``eager_skipped`` says why. No shape starts after ``deadline`` (``time.perf_counter``);
    ``on_row(rows)`` is called after each shape (to save partial results)."""
    import time

    torch = require_cuda()
    from nxm_deploy.gpu.graphs import GraphedForward, hf_forward

    models, summary = build_encoders(dims)
    predicted = {v: predicted_eager_s(dims, gemm_rows or [], v) for v in models}
    rows = []
    for batch, seq in shapes:
        if deadline is not None and time.perf_counter() > deadline:
            break
        gen = torch.Generator(device="cuda").manual_seed(batch * 1000 + seq)
        ids = torch.randint(1000, 30000, (batch, seq), device="cuda", generator=gen)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        row = {"batch": batch, "seq": seq, "eager_call_s": {}, "eager_skipped": {}}
        eager, graphed, cosine = {}, {}, {}
        with torch.no_grad():
            ref = hf_forward(models["dense-fp16"], "last_hidden_state")(**inputs).float()
            for variant, model in models.items():
                forward = hf_forward(model, "last_hidden_state")
                if predicted[variant] is not None and predicted[variant] > max_call_s:
                    row["eager_skipped"][variant] = (f"one eager forward would take about {predicted[variant]:.1f} s "
                                                     "of host set-up (GEMM table wall times)")
                else:
                    start = time.perf_counter()
                    out = forward(**inputs).float()
                    torch.cuda.synchronize()
                    call_s = row["eager_call_s"][variant] = time.perf_counter() - start
                    cosine[variant] = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
                    if call_s <= max_call_s:
                        eager[variant] = lambda forward=forward: forward(**inputs)
                    else:
                        row["eager_skipped"][variant] = f"one eager forward took {call_s:.1f} s"
                graph = GraphedForward(forward, max_graphs=1, warmup=0 if variant in row["eager_skipped"] else 1)
                start = time.perf_counter()
                got = graph(**inputs).float()
                row.setdefault("capture_s", {})[variant] = time.perf_counter() - start
                if graph.capture_error is None:
                    graphed[variant] = lambda graph=graph: graph(**inputs)
                    cosine[f"{variant} (graphed)"] = float(torch.nn.functional.cosine_similarity(
                        got.flatten(), ref.flatten(), dim=0))
                else:
                    row.setdefault("capture_errors", {})[variant] = graph.capture_error
            names = {**{f"eager:{v}": f for v, f in eager.items()}, **{f"graphed:{v}": f for v, f in graphed.items()}}
            samples = _time_interleaved(names, rounds, warmup=1, budget_s=budget_s)
        stats = _summary(samples)
        for mode in ("eager", "graphed"):
            row[mode] = {v: stats[f"{mode}:{v}"] for v in models if f"{mode}:{v}" in stats}
            row[mode + "_speedups"] = _ratios({v: s["p50_ms"] for v, s in row[mode].items()})
        row["cosine_vs_dense_fp16"] = cosine
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        if progress is not None:
            progress.update(1)
    del models
    torch.cuda.empty_cache()
    return rows, summary


# ----------------------------------------------------------------------------------------------- report


def goal_values(results: dict) -> dict[str, float | None]:
    """The measured values behind :data:`GOALS`, by key (None when the shape set was not run)."""
    out: dict[str, float | None] = {"gemm_ffn_int8": None, "e2e_int8_vs_fp16": None}
    base = results.get("sets", {}).get("bert-base")
    if not base:
        return out
    ffn = [r["graphed_speedups"]["sparse_int8_vs_dense_int8"] for r in base.get("gemm", [])
           if r["layer"].startswith("FFN") and r["m"] == 4096 and r["graphed_speedups"]["sparse_int8_vs_dense_int8"]]
    if ffn:
        out["gemm_ffn_int8"] = min(ffn)
    for row in base.get("e2e", []):
        if (row["batch"], row["seq"]) == (32, 128):
            out["e2e_int8_vs_fp16"] = row["graphed_speedups"]["sparse_int8_vs_dense_fp16"]
    return out


def _f(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def _timing_rows(row: dict, label: str, digits: int) -> list[str]:
    """The eager and graphed Markdown rows of one GEMM or end-to-end cell: medians per variant, then the ratios."""
    out = []
    for mode in ("eager", "graphed"):
        t, s = row[mode], row[mode + "_speedups"]
        cells = [_f(t.get(v, {}).get("p50_ms"), digits) for v in GEMM_VARIANTS]
        out.append(f"| {label} | {mode} | {' | '.join(cells)} | {_f(s['sparse_fp16_vs_dense_fp16'])}× | "
                   f"{_f(s['sparse_int8_vs_dense_int8'])}× | {_f(s['sparse_int8_vs_dense_fp16'])}× |")
    return out


def render_markdown(results: dict) -> str:
    """The human report of a :func:`run_bench` result: command, environment, goals, GEMM and end-to-end tables."""
    lines = [f"# GPU speed of 2:4 and INT8 through PyTorch: {results['environment']['gpu']}", "",
             f"- command: `{results['command']}`", f"- environment: {results['environment']['line']}",
             f"- date: {results['date']}", f"- method: {results['method']}", "", "## Goals", "",
             "| goal | measured | target | |", "|---|---|---|---|"]
    values = goal_values(results)
    for text, _set, key, target in GOALS:
        v = values[key]
        verdict = "not run" if v is None else "met" if v >= target else "**missed**"
        lines.append(f"| {text} | {_f(v)}× | ≥ {target}× | {verdict} |")
    for set_name, data in results["sets"].items():
        dims = data["dims"]
        lines += ["", f"## {set_name} ({dims['num_hidden_layers']} layers, hidden {dims['hidden_size']}, "
                      f"FFN {dims['intermediate_size']})", ""]
        if data.get("error"):
            lines += [f"Failed: `{data['error']}`", ""]
        if data.get("gemm"):
            lines += ["### GEMMs (ms per call, median; speedups from the same run)", "",
                      "| layer | N×K | M | mode | dense FP16 | 2:4 FP16 | dense INT8 | 2:4 INT8 | 2:4 FP16 / dense FP16 "
                      "| 2:4 INT8 / dense INT8 | 2:4 INT8 / dense FP16 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in data["gemm"]:
                lines += _timing_rows(r, f"{r['layer']} | {r['n']}×{r['k']} | {r['m']}", digits=4)
                if r.get("graph_capture_failed"):
                    lines.append(f"| {r['layer']} | {r['n']}×{r['k']} | {r['m']} | graph capture failed | "
                                 + ", ".join(r["graph_capture_failed"]) + " | | | | | | |")
                if r.get("errors"):
                    lines.append(f"| {r['layer']} | {r['n']}×{r['k']} | {r['m']} | errors | "
                                 + "; ".join(f"{k}: {v}" for k, v in r["errors"].items()) + " | | | | | | |")
        wall_only = sorted({v for r in data.get("gemm", []) for v, st in r["eager"].items() if st.get("host_wall")})
        if wall_only:
            lines += ["", f"Eager {', '.join(wall_only)}: no timing loop (over {SLOW_EAGER_MS:g} ms per call); the eager "
                          "cell is the host wall time of one synchronized call (table below)."]
        if data.get("gemm"):
            lines += ["", "Host wall time of one synchronized eager call (ms; launch and cuSPARSELt set-up included):", "",
                      "| layer | M | " + " | ".join(GEMM_VARIANTS) + " |", "|---|---|" + "---|" * len(GEMM_VARIANTS)]
            for r in data["gemm"]:
                lines.append(f"| {r['layer']} | {r['m']} | "
                             + " | ".join(_f(r.get("call_wall_ms", {}).get(v), 3) for v in GEMM_VARIANTS) + " |")
        if data.get("gemm_skipped"):
            lines += ["", f"GEMMs not run: {data['gemm_skipped']}."]
        if data.get("e2e_skipped"):
            lines += ["", f"End to end not run: {data['e2e_skipped']}."]
        if data.get("e2e"):
            lines += ["", "### End to end (encoder forward, ms, median; random 2:4 weights)", "",
                      "| batch×seq | mode | dense FP16 | 2:4 FP16 | dense INT8 | 2:4 INT8 | 2:4 FP16 / dense FP16 | "
                      "2:4 INT8 / dense INT8 | 2:4 INT8 / dense FP16 |", "|---|---|---|---|---|---|---|---|---|"]
            for r in data["e2e"]:
                lines += _timing_rows(r, f"{r['batch']}×{r['seq']}", digits=3)
            cos = "; ".join(f"{r['batch']}×{r['seq']}: " + ", ".join(f"{v} {c:.4f}" for v, c in r["cosine_vs_dense_fp16"].items())
                            for r in data["e2e"])
            walls = "; ".join(f"{r['batch']}×{r['seq']}: " + ", ".join(f"{v} {t * 1e3:.1f}" for v, t in r.get("eager_call_s", {}).items())
                              + "".join(f", {v} not run ({why})" for v, why in r.get("eager_skipped", {}).items())
                              for r in data["e2e"])
            errors = "; ".join(f"{r['batch']}×{r['seq']} {v}: {e}" for r in data["e2e"] for v, e in r.get("capture_errors", {}).items())
            lines += ["", f"Output cosine similarity to dense FP16: {cos}.", "",
                      f"Host wall time of one eager forward (ms): {walls}." + (f" CUDA graph capture failed: {errors}." if errors else ""), "",
                      "Kernels per variant: " + "; ".join(f"{v}: {s['kernels']}" for v, s in data.get("conversion", {}).items())]
        slower = where_sparse_does_not_help(data)
        if slower:
            lines += ["", "Where 2:4 does not help here (graphed, ratio < 1.0):", ""] + [f"- {s}" for s in slower]
    return "\n".join(lines) + "\n"


def where_sparse_does_not_help(data: dict) -> list[str]:
    """One line per GEMM / end-to-end cell where a 2:4 kernel is slower than its dense twin (graphed)."""
    out = []
    for r in data.get("gemm", []):
        s = r["graphed_speedups"]
        for key, label in (("sparse_fp16_vs_dense_fp16", "FP16"), ("sparse_int8_vs_dense_int8", "INT8")):
            if s.get(key) is not None and s[key] < 1.0:
                out.append(f"GEMM {r['layer']} {r['n']}×{r['k']}, M={r['m']}: 2:4 {label} at {s[key]:.2f}× dense {label}")
    for r in data.get("e2e", []):
        s = r["graphed_speedups"]
        for key, label in (("sparse_fp16_vs_dense_fp16", "FP16"), ("sparse_int8_vs_dense_int8", "INT8")):
            if s.get(key) is not None and s[key] < 1.0:
                out.append(f"end to end {r['batch']}×{r['seq']}: 2:4 {label} at {s[key]:.2f}× dense {label}")
    return out


def run_bench(shape_sets: list[str], run_dir: str | Path | None = None, out_dir: str | Path = "benchmarks",
              command: str = "nxm-deploy bench-gpu", gemm_rounds: int = 30, e2e_rounds: int = 20,
              max_seconds: float | None = None) -> dict:
    """Run the GEMM tables of every shape set (and a run's own dims), then the end-to-end tables set by set, and
    write ``gpu_<gpu>.json`` / ``.md`` into ``out_dir`` after each step (a later failure keeps what was measured).

    ``max_seconds``: a time budget; the sets run in the order given, and cells not started before it ran out are
    left out (a part not started at all is recorded as skipped).

    Raises:
        MissingDependencyError: no CUDA device. ConfigError: an unknown shape set or a bad run directory.
    """
    import time

    from tqdm.auto import tqdm

    require_cuda()
    begin = time.perf_counter()
    sets: dict[str, dict] = {}
    for name in shape_sets:
        if name not in SHAPE_SETS:
            raise ConfigError(f"Unknown shape set {name!r}; known: {', '.join(SHAPE_SETS)}.")
        sets[name] = dict(SHAPE_SETS[name])
    if run_dir is not None:
        name, dims = shape_set_of_run(run_dir)
        sets[name] = dims
    env = environment()
    results = {"command": command, "environment": env, "date": _dt.date.today().isoformat(),
               "method": (f"CUDA-event timings, medians; variants interleaved per round (order rotated); GEMMs up to "
                          f"{gemm_rounds} rounds of up to 20 calls per sample, end to end up to {e2e_rounds} rounds of "
                          "1 forward, each loop capped in time (at least 3 rounds); eager = launched from Python, "
                          "graphed = replayed from a CUDA graph; 2:4 by magnitude on random weights (speed depends "
                          "on the pattern, not the values); INT8 per-channel weights, per-tensor activations"),
               "sets": {name: {"dims": dims} for name, dims in sets.items()}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"gpu_{gpu_slug(env['gpu'])}"

    def save():
        results["goals"] = goal_values(results)
        results["elapsed_s"] = round(time.perf_counter() - begin, 1)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
        stem.with_suffix(".md").write_text(render_markdown(results))

    deadline = None if max_seconds is None else begin + max_seconds
    total = sum(len(linear_shapes(d)) * len(GEMM_TOKENS) + len(E2E_SHAPES) for d in sets.values())
    with tqdm(total=total, desc="bench-gpu", unit="cell") as progress:
        for name, dims in sets.items():  # in the order given: the first set gets the time first
            data = results["sets"][name]
            for part in ("gemm", "e2e"):
                if deadline is not None and time.perf_counter() > deadline:
                    data[f"{part}_skipped"] = f"time budget of {max_seconds:.0f} s spent before it started"
                    continue
                try:
                    if part == "gemm":
                        data["gemm"] = gemm_table(dims, rounds=gemm_rounds, progress=progress, deadline=deadline)
                    else:
                        def partial(rows, data=data):
                            data["e2e"] = rows
                            save()

                        data["e2e"], data["conversion"] = e2e_table(dims, rounds=e2e_rounds, progress=progress,
                                                                    deadline=deadline, gemm_rows=data.get("gemm"),
                                                                    on_row=partial)
                except (RuntimeError, ConfigError) as exc:  # keep the other parts; the report says what failed
                    log.error("bench-gpu %s %s failed: %s", name, part, exc)
                    data["error"] = f"{part}: " + str(exc).splitlines()[0][:400]
                save()
    results["files"] = [str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))]
    return results
