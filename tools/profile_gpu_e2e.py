"""Where the time of one encoder forward goes on a GPU, per variant: the CUDA kernels of one eager forward of
bench-gpu's random 2:4 encoder, grouped by kernel name (torch.profiler), the top rows per variant.

    python tools/profile_gpu_e2e.py [--shapes bert-base] [--batch 32] [--seq 128] [--top 12] [--variants ...]

Diagnoses end-to-end ratios of ``nxm-deploy bench-gpu`` (e.g. dense INT8 slower than dense FP16): kernel time is
what a CUDA graph replays, so the sum per variant bounds the graphed latency from below. Needs a CUDA device.
"""
from __future__ import annotations

import argparse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="bert-base")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--variants", default="dense-fp16,dense-int8,sparse-int8",
                        help="comma-separated; eager sparse-fp16 costs ~0.3 s of host set-up per GEMM on torch 2.11")
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nxm_deploy.gpu.bench import SHAPE_SETS, build_encoders
    from nxm_deploy.gpu.graphs import hf_forward

    models, _ = build_encoders(SHAPE_SETS[args.shapes])
    ids = torch.randint(1000, 30000, (args.batch, args.seq), device="cuda")
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for variant in args.variants.split(","):
        model = models[variant]
        forward = hf_forward(model, "last_hidden_state")
        with torch.no_grad():
            for _ in range(2):
                forward(**inputs)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                forward(**inputs)
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.self_device_time_total for e in events) / 1e3
        print(f"\n## {variant}: {args.shapes} {args.batch}x{args.seq}, kernel time {total:.3f} ms per forward")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]:
            print(f"{e.self_device_time_total / 1e3:8.3f} ms  {e.count:5d}x  {e.key[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
