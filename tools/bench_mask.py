"""Time ``nxm_deploy.sparsity.nm_mask`` over every Linear weight of a BERT-base-sized encoder.

12 layers x (Q, K, V, attention output 768x768, FFN1 3072x768, FFN2 768x3072) = 84,934,656 float32 weights
(random normal tensors: the mask cost does not depend on the values). One warm-up pass, then the median of
``--runs`` (5) timed passes, with ``torch.set_num_threads(--threads)`` (2). Target: one pass <= 1 s.

Usage:
    .venv/bin/python tools/bench_mask.py [--pattern 2:4] [--runs 5] [--threads 2] [--out benchmarks/nm_mask.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nxm_deploy.machine import machine_line  # noqa: E402

TARGET_S = 1.0
HIDDEN, FFN, LAYERS = 768, 3072, 12


def bert_base_linear_shapes(layers: int = LAYERS, hidden: int = HIDDEN, ffn: int = FFN) -> list[tuple[int, int]]:
    """``[out, in]`` shapes of the encoder Linear weights: per layer Q, K, V, O, FFN1, FFN2."""
    per_layer = [(hidden, hidden)] * 4 + [(ffn, hidden), (hidden, ffn)]
    return per_layer * layers








def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="2:4", help="n:m pattern")
    parser.add_argument("--runs", type=int, default=5, help="timed passes (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", default=None, help="also write a Markdown report here (e.g. benchmarks/nm_mask.md)")
    args = parser.parse_args(argv)

    import torch
    import transformers  # noqa: F401 - version line only

    from nxm_deploy.sparsity import nm_mask
    from nxm_deploy.sparsity.pattern import NMPattern

    pattern = NMPattern.parse(args.pattern)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=gen, dtype=torch.float32) for shape in bert_base_linear_shapes()]
    count = sum(w.numel() for w in weights)

    def one_pass() -> float:
        t0 = time.perf_counter()
        for weight in weights:
            nm_mask(weight, pattern)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        one_pass()
    times = [one_pass() for _ in range(args.runs)]
    median = statistics.median(times)
    result = "PASS" if median <= TARGET_S else "MISS"
    argv_used = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    lines = [
        f"nm_mask {pattern} over {len(weights)} BERT-base Linear weights ({LAYERS} layers x Q,K,V,O {HIDDEN}x{HIDDEN}, "
        f"FFN1 {FFN}x{HIDDEN}, FFN2 {HIDDEN}x{FFN}): {count:,} float32 weights",
        f"median of {args.runs} passes after {args.warmup} warm-up, torch threads {torch.get_num_threads()}: "
        f"{median:.3f} s (passes: {', '.join(f'{t:.3f}' for t in times)})",
        f"target <= {TARGET_S:.1f} s: {result}",
        f"versions: torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"machine: {machine_line()}",
    ]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        md = [
            "# n:m mask computation time (BERT-base-sized encoder)",
            "",
            f"Command: `{shlex.join(argv_used)}`  ",
            f"Date (UTC): {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}",
            "",
            "```",
            *lines,
            "```",
        ]
        out.write_text("\n".join(md) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
