"""``nxm-deploy bench-gpu`` end to end on a real NVIDIA GPU (a short run: one shape set, few rounds).

Marked ``gpu``: skipped, with the reason, where ``torch.cuda.is_available()`` is false.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False"),
]


def test_bench_gpu_writes_tables(tmp_path):
    from nxm_deploy.cli.main import main

    rc = main(["-q", "bench-gpu", "--shapes", "minilm", "--out", str(tmp_path), "--rounds", "5",
               "--max-seconds", "90"])
    assert rc == 0
    md = next(tmp_path.glob("gpu_*.md")).read_text()
    assert "### GEMMs" in md and "### End to end" in md and "cuSPARSELt" in md
    data = json.loads(next(tmp_path.glob("gpu_*.json")).read_text())["sets"]["minilm"]
    assert len(data["gemm"]) == 9 and all(r["eager"] for r in data["gemm"])
    assert {r["batch"] for r in data["e2e"]} == {1, 32}
