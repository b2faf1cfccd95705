"""Benchmark the inference client (``TextClassifier``) on a run's artifacts with ONNX Runtime on CPU.

Measures, in one process and on the same session:

* requests/s and p50/p99 latency of single-input requests from 1 caller and from 8 concurrent callers
  (sharing one client), and from 8 callers through a ``MicroBatcher``;
* client overhead at batch 32: ``client.predict(32 inputs)`` vs the raw ``InferenceSession.run`` on the
  same already-tokenized inputs (median of paired ratios over interleaved runs), and the client's own
  work (tokenization, result formatting) timed alone; target ratio <= 1.10.

Inputs are the task's GLUE dev examples when a GLUE dir is found (``--glue-dir``, ``NXM_GLUE_DIR`` or
``../shared/data/glue``), else synthetic sentences of varied length.

Usage:
    .venv/bin/python tools/bench_client.py [RUN_DIR] [--model sparse_int8] [--requests 400] [--overhead-runs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nxm_deploy.client import MicroBatcher, TextClassifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a man woman child dog cat city river house car road tree sun rain music book letter "
         "quickly slowly bright dark old new small large said walked found gave took saw made").split()


def _inputs(client: TextClassifier, glue_dir: str | None, n: int) -> tuple[list, str]:
    """``n`` inputs fitting the task (pairs for pair tasks): GLUE dev examples when available."""
    candidates = [glue_dir, os.environ.get("NXM_GLUE_DIR"), str(REPO.parent / "shared" / "data" / "glue")]
    task = client.artifacts.task
    for root in candidates:
        if root and task and Path(root).is_dir():
            try:
                from nxm_deploy.data import load_task_split

                ex = load_task_split(task, "dev", root, n)
            except Exception:  # noqa: BLE001 - fall back to synthetic text
                continue
            items = list(zip(ex.texts_a, ex.texts_b)) if ex.texts_b is not None else list(ex.texts_a)
            while len(items) < n:
                items += items[: n - len(items)]
            return items, f"{task} dev examples from {root}"
    rng = np.random.default_rng(0)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(6, 40)))).capitalize() + "."

    pair = client.artifacts.is_pair_task is not False
    items = [(sentence(), sentence()) if pair else sentence() for _ in range(n)]
    return items, "synthetic sentences"


def _stats(latencies: list[float], wall: float) -> dict:
    ms = np.array(latencies) * 1000.0
    return {"requests": len(latencies), "req_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def _callers(call, items: list, callers: int) -> dict:
    latencies: list[list[float]] = [[] for _ in range(callers)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(callers + 1)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for item in items[k::callers]:
                start = time.perf_counter()
                call(item)
                latencies[k].append(time.perf_counter() - start)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(callers)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return _stats([x for lat in latencies for x in lat], wall)


def _overhead(client: TextClassifier, items: list, runs: int, batch: int) -> dict:
    batch_items = items[:batch]
    feeds = client.encode(batch_items).feeds
    session = client.ort_session
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    for _ in range(3):
        client.predict(batch_items, batch_size=batch)
        session.run(["logits"], feeds)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def client_call() -> None:
        client.predict(batch_items, batch_size=batch)

    def raw_call() -> None:
        session.run(["logits"], feeds)

    t_client, t_raw = [], []
    for i in range(runs):  # interleaved, alternating which goes first, so drift and order hit both equally
        if i % 2:
            t_raw.append(timed(raw_call))
            t_client.append(timed(client_call))
        else:
            t_client.append(timed(client_call))
            t_raw.append(timed(raw_call))
    c, r = statistics.median(t_client), statistics.median(t_raw)
    ratio = statistics.median(a / b for a, b in zip(t_client, t_raw))  # median of paired ratios
    # the client's own work, timed alone: tokenization + checks, and result formatting
    logits = session.run(["logits"], feeds)[0]
    encode = statistics.median(timed(lambda: client.encode(batch_items)) for _ in range(20))
    fmt = statistics.median(timed(lambda: client.format_results(logits, np.zeros(len(logits), bool))) for _ in range(20))
    return {"batch_size": batch, "sequence_length": int(feeds["input_ids"].shape[1]), "runs": runs,
            "client_median_ms": round(c * 1000, 3), "raw_ort_run_median_ms": round(r * 1000, 3),
            "ratio": round(ratio, 4), "overhead_pct": round((ratio - 1) * 100, 2), "ok": ratio <= 1.10,
            "encode_ms": round(encode * 1000, 3), "format_ms": round(fmt * 1000, 3),
            "client_work_pct_of_raw_run": round((encode + fmt) / r * 100, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default=str(REPO / "runs" / "minilm_mrpc_2of4_int8"))
    parser.add_argument("--model", choices=["sparse_int8", "dense"], default="sparse_int8")
    parser.add_argument("--requests", type=int, default=400, help="single-input requests per scenario")
    parser.add_argument("--overhead-runs", type=int, default=30, help="timed batch-32 runs for the overhead ratio")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--intra-op-threads", type=int, default=None)
    parser.add_argument("--glue-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    client = TextClassifier.from_artifacts(args.run_dir, backend="onnxruntime", model=args.model,
                                           intra_op_threads=args.intra_op_threads)
    load_s = time.perf_counter() - start
    with client:
        items, source = _inputs(client, args.glue_dir, max(args.requests, args.batch))
        lengths = [int(n) for n in client.encode(items).feeds["attention_mask"].sum(1)]
        header = {
            "run_dir": args.run_dir, "model": args.model, "task": client.artifacts.task,
            "runtime": client.info["runtime"], "max_length": client.max_length,
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "inputs": f"{source}; tokens per input mean {np.mean(lengths):.1f}, max {max(lengths)}",
            "client_load_s": round(load_s, 3),
        }
        for key, value in header.items():
            print(f"{key:>17}: {value}")
        for item in items[:8]:  # warm-up
            client.predict([item])
        requests = items[: args.requests]
        results = {}
        results["1 caller"] = _callers(lambda x: client.predict([x]), requests, 1)
        results["8 callers"] = _callers(lambda x: client.predict([x]), requests, 8)
        with MicroBatcher(client, max_batch_size=8, max_wait_ms=2.0) as batcher:
            results["8 callers + MicroBatcher(8, 2 ms)"] = _callers(batcher.predict, requests, 8)
            mb = dict(batcher.stats)
        print(f"\n{'scenario':<36} {'requests':>8} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9}")
        for name, row in results.items():
            print(f"{name:<36} {row['requests']:>8} {row['req_per_s']:>9.1f} {row['p50_ms']:>9.2f} {row['p99_ms']:>9.2f}")
        print(f"micro-batcher: {mb['batches']} batches for {mb['requests']} requests (max batch {mb['max_batch']})")
        over = _overhead(client, items, args.overhead_runs, args.batch)
        print(f"\nclient overhead at batch {over['batch_size']} (L={over['sequence_length']}, {over['runs']} interleaved runs): "
              f"client.predict median {over['client_median_ms']:.2f} ms vs raw InferenceSession.run median "
              f"{over['raw_ort_run_median_ms']:.2f} ms -> ratio {over['ratio']:.3f} "
              f"(median of paired ratios; {over['overhead_pct']:+.1f}%) {'PASS' if over['ok'] else 'FAIL'} (target <= 1.10)")
        print(f"client-side work alone: tokenize {over['encode_ms']:.2f} ms + format {over['format_ms']:.3f} ms = "
              f"{over['client_work_pct_of_raw_run']:.2f}% of the raw run")
    if args.json:
        Path(args.json).write_text(json.dumps({**header, "scenarios": results, "micro_batcher": mb,
                                               "overhead": over}, indent=2) + "\n")
    return 0 if over["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
