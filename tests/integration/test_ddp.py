"""ADMMTrainer under ``torchrun --nproc_per_node=2`` (gloo, CPU): ranks agree, and equal a 1-process run.

``ddp_worker.py`` trains a tiny dropout-free BERT for 2 epochs (8 optimizer steps, Z/U updates after steps 4 and 8)
with a global batch of 8: 4 per rank on 2 ranks here, 8 in one process for the reference (run in this process).
The same seeded sampler hands rank 0 and rank 1 the two halves of the reference batch, and DDP averages the
per-rank mean gradients, so the two runs differ only by float summation order (a mean of two means of 4 vs one
mean of 8, and gloo's all-reduce): measured 9e-8 at most after 8 AdamW steps at lr 1e-3, hence atol 1e-5 (weights
of std 0.02; a wrong batch split, a doubled loss or a missing penalty moves them by 1e-3 or more).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install accelerate)")

import torch.distributed as dist  # noqa: E402

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
REPO_ROOT = Path(__file__).resolve().parents[2]
MODES = ("check", "broadcast")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def two_rank_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(out), "--per-device-batch", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def one_process_dir(tmp_path_factory) -> Path:
    """The reference, run in this process with the worker's own code (batch 8, no process group)."""
    out = tmp_path_factory.mktemp("ddp1")
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    argv = sys.argv
    try:
        sys.argv = [str(WORKER), str(out), "--per-device-batch", "8"]
        worker.main()
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    return out


def test_ranks_hold_identical_admm_state_and_weights(two_rank_dir):
    for mode in MODES:
        meta = [json.loads((two_rank_dir / f"rank{r}_{mode}.json").read_text()) for r in (0, 1)]
        assert meta[0]["world_size"] == 2 and meta[0]["ranks_identical"], meta[0]["checksums"]
        assert meta[0]["history"] == meta[1]["history"]
        assert [h["global_step"] for h in meta[0]["history"]] == [4, 8]
        rank0, rank1 = (_load(two_rank_dir / f"rank{r}_{mode}.safetensors") for r in (0, 1))
        assert set(rank0) == set(rank1) and any(k.startswith("z/") for k in rank0)
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), (mode, key)
    # "check" verified agreement without help; "broadcast" must not change a run whose ranks already agree
    check, broadcast = (_load(two_rank_dir / f"rank0_{mode}.safetensors") for mode in MODES)
    assert all(torch.equal(check[k], broadcast[k]) for k in check)


def test_admm_state_saved_once_by_rank_zero(two_rank_dir):
    saved = sorted(two_rank_dir.glob("trainer_check/checkpoint-*/admm_state.pt"))
    assert [p.parent.name for p in saved] == ["checkpoint-4", "checkpoint-8"]
    state = torch.load(saved[0], weights_only=True)
    assert state["global_step"] == 4 and state["sparsifier"]["num_updates"] == 1


def test_two_processes_match_one_process_with_the_same_global_batch(two_rank_dir, one_process_dir):
    from nxm_deploy.sparsity import count_nm_violations

    ref_meta = json.loads((one_process_dir / "rank0_check.json").read_text())
    assert ref_meta["world_size"] == 1
    ddp, ref = _load(two_rank_dir / "rank0_check.safetensors"), _load(one_process_dir / "rank0_check.safetensors")
    assert set(ddp) == set(ref)
    masks = [k for k in ref if k.startswith("mask/")]
    assert len(masks) == 12
    for key in masks:
        assert torch.equal(ddp[key], ref[key]), key
        weight = ddp["weight/" + key[len("mask/"):]]
        assert count_nm_violations(weight.numpy(), "2:4", axis=1)[1] == 0, key
    for key in ref:
        torch.testing.assert_close(ddp[key], ref[key], rtol=0, atol=1e-5, msg=key)
    ddp_hist = json.loads((two_rank_dir / "rank0_check.json").read_text())["history"]
    for got, want in zip(ddp_hist, ref_meta["history"], strict=True):
        assert got["mask_change"] == want["mask_change"] and got["rho"] == want["rho"]
        assert got["primal_residual"] == pytest.approx(want["primal_residual"], rel=1e-5)
