"""``torchrun --nproc_per_node=2 nxm-deploy run RECIPE`` (gloo, CPU) against ``nxm-deploy train`` in one process.

The tiny smoke recipe without dropout (so one process and two differ only by float summation order: the global
batch of 32 is split 16 + 16 over the ranks, the length-grouped order is drawn per global batch, DDP averages the
per-rank mean gradients). Every stage runs: dense, ADMM 2:4 + KD + masked fine-tune, INT8 QAT + KD. Rank 0 alone
writes the artifacts; each stage manifest records a checksum of the masks (sparse) or of every weight and scale
(QAT) from each rank, which must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install accelerate)")

import torch.distributed as dist  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the gloo backend is not available in this torch build"),
]


def _invoke(tmp: Path, recipe: Path, glue_dir: Path, processes: int, command: str) -> tuple[Path, str]:
    """``nxm-deploy <command> RECIPE`` in one process, or under torchrun with ``processes``; (run dir, stdout)."""
    runs = tmp / f"runs{processes}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("WORLD_SIZE", None)
    cli = ["-m", "nxm_deploy.cli.main", "-q", command, str(recipe), "--runs-root", str(runs), "--glue-dir", str(glue_dir)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *cli]
    else:
        cmd = [sys.executable, *cli]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "Traceback" not in proc.stderr
    return runs / "tiny_smoke", proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory, glue_dir, tiny_recipe_dict_module):
    """The training stages in one process (``nxm-deploy train``), and the whole chain under torchrun with 2 processes
    (``nxm-deploy run``: one torchrun invocation for every multi-process check of the pipeline)."""
    tmp = tmp_path_factory.mktemp("ddp_pipeline")
    data = json.loads(json.dumps(tiny_recipe_dict_module))
    data["model"]["random_init"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    data["train"].update(device="cpu", num_threads=1)
    data["engine"] = {"specs": []}  # no TensorRT here
    recipe = tmp / "tiny_smoke.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    one, _ = _invoke(tmp, recipe, glue_dir, 1, "train")
    two, stdout = _invoke(tmp, recipe, glue_dir, 2, "run")
    return {1: one, 2: two, "stdout": stdout}


def _manifest(run: Path, sub: str) -> dict:
    return json.loads((run / sub / "manifest.json").read_text())


def test_both_ranks_hold_the_same_masks_and_qat_weights(runs):
    sparse, qat = _manifest(runs[2], "sparse"), _manifest(runs[2], "qat")
    for manifest in (sparse, qat):
        sums = manifest["mask_check"]["rank_checksums"]
        assert manifest["world_size"] == 2 and len(sums) == 2 and sums[0] == sums[1]
    assert _manifest(runs[1], "sparse")["mask_check"]["rank_checksums"].__len__() == 1
    assert not (runs[2] / "checkpoints").exists()  # rank 0 dropped the checkpoints after writing


def test_two_processes_match_one_process(runs):
    for sub in ("dense", "sparse", "qat"):
        one, two = _manifest(runs[1], sub), _manifest(runs[2], sub)
        for name, value in one["metrics"].items():
            assert two["metrics"][name] == pytest.approx(value, abs=0.02), (sub, name)
        key = "train" if sub != "dense" else None
        steps_one = (one[key] or {}).get("steps") if key else one["steps"]
        steps_two = (two[key] or {}).get("steps") if key else two["steps"]
        assert steps_one == steps_two  # the same optimizer steps: the global batch is the recipe's on both
    dense1, dense2 = (load_file(str(r / "dense" / "model.safetensors")) for r in (runs[1], runs[2]))
    for name in dense1:
        torch.testing.assert_close(dense2[name], dense1[name], rtol=0, atol=1e-4, msg=name)
    masks1, masks2 = (load_file(str(r / "sparse" / "masks.safetensors")) for r in (runs[1], runs[2]))
    assert masks1.keys() == masks2.keys() and len(masks1) == 12
    agree = sum(int((masks1[k] == masks2[k]).sum()) for k in masks1) / sum(m.numel() for m in masks1.values())
    assert agree > 0.999


def test_run_under_torchrun_reports_once_from_rank_zero(runs):
    """``nxm-deploy run`` under torchrun: both ranks train, rank 0 alone exports, validates and prints the report."""
    assert sum(line.startswith("report: ") for line in runs["stdout"].splitlines()) == 1  # rank 0 only
    run = runs[2]
    assert (run / "report.md").is_file() and json.loads((run / "onnx" / "manifest.json").read_text())["parity"]["ok"]
    assert _manifest(run, "qat")["world_size"] == 2
