"""``nxm-deploy validate`` on a real (tiny) run: every runner, accuracy, latency, Polygraphy diff with a hand-run
round trip on the exported INT8 model, plots, and the gate exits.

Builds its own run of ``recipes/tiny_smoke.yaml`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nxm_deploy.cli.main import main

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = REPO_ROOT / "recipes" / "tiny_smoke.yaml"


@pytest.fixture
def run_dir(tiny_run) -> Path:
    """The session's tiny run (``tests/conftest.py``), Polygraphy CLI re-run and plots on."""
    rc, path = tiny_run
    assert rc == 0
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_validation_covers_every_runner(run_dir) -> None:
    v = read_json(run_dir / "validation.json")
    assert {"dense_fp32", "sparse_int8"} <= set(v["metrics"]) and set(v["metrics"]) == set(v["runners"])
    assert v["metric_deltas_pt"]["dense_fp32"] == 0.0
    for row in v["latency"]:
        for name in v["runners"]:
            stats = row[name]
            assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] and stats["runs"] == v["latency_method"]["timed_runs"]
            assert stats["baseline"] == "dense_fp32" and stats["speedup"] > 0
    comps = {(c["reference"], c["candidate"]): c for c in v["diff"]["comparisons"]}
    assert comps[("torch_dense_fp32", "dense_fp32")]["passed"]
    assert comps[("torch_int8_fakequant", "sparse_int8")]["passed"]
    assert comps[("dense_fp32", "sparse_int8")]["gated"] is False
    verified = [c for c in comps.values() if "cli_exit_code" in c]
    assert verified and all(c["cli_agrees"] for c in verified)
    report = read_json(run_dir / "report.json")
    assert set(report["plots"]) == {"latency", "speedup", "accuracy", "sparsity"}
    for rel in report["plots"].values():
        assert (run_dir / rel).stat().st_size > 1000
    md = (run_dir / "report.md").read_text()
    assert "## Output diff (Polygraphy Comparator)" in md and "polygraphy run onnx/sparse_int8_qdq.onnx" in md


def test_hand_run_polygraphy_round_trip_on_the_exported_int8_model(run_dir, tmp_path) -> None:
    import onnx
    from onnx import numpy_helper

    from nxm_deploy.validate.diff import run_polygraphy

    v = read_json(run_dir / "validation.json")
    (row,) = [c for c in v["diff"]["comparisons"] if c["candidate"] == "sparse_int8" and c["gated"]]
    argv = row["command"].split(" && ", 1)[1].split()
    rc, tail = run_polygraphy(argv, run_dir)
    assert rc == 0, tail

    # the same command on a copy of the run whose INT8 model has a planted weight change: non-zero exit
    bad = tmp_path / "bad"
    shutil.copytree(run_dir / "diff", bad / "diff")
    (bad / "onnx").mkdir()
    proto = onnx.load(str(run_dir / "onnx" / "sparse_int8_qdq.onnx"))
    (init,) = [t for t in proto.graph.initializer if t.name.endswith("classifier.bias")]
    w = numpy_helper.to_array(init).copy()
    w[0] += 0.1  # shifts logit 0 of every example by 0.1, far beyond the INT8 tolerance
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(bad / "onnx" / "sparse_int8_qdq.onnx"))
    rc, tail = run_polygraphy(argv, bad)
    assert rc != 0, tail


@pytest.mark.parametrize("settings, expected, name", [
    ({"max_accuracy_drop_pt": -100.0}, 4, "AccuracyRegressionError"),
    ({"min_speedup": 1000.0}, 5, "LatencyRegressionError"),
])
def test_gates_exit_non_zero_after_writing_the_report(run_dir, glue_dir, monkeypatch, capsys, settings, expected, name) -> None:
    import nxm_deploy.validate.stage as stage

    monkeypatch.setenv("NXM_GLUE_DIR", str(glue_dir))
    monkeypatch.setattr(stage, "gate_settings", lambda _cfg: {"max_accuracy_drop_pt": None, "min_speedup": None,
                                                              "diff_gate": False, **settings})
    (run_dir / "report.md").unlink()
    rc = main(["-q", "validate", str(run_dir)])
    err = capsys.readouterr().err
    assert rc == expected, err  # the CLI's one exit-code table (nxm_deploy.errors.EXIT_CODES)
    assert "error: Validation gate failed" in err and f"hint: See {run_dir / 'report.md'}" in err
    assert "Traceback" not in err
    assert (run_dir / "report.md").is_file()
    gates = read_json(run_dir / "validation.json")["gates"]
    assert gates["passed"] is False
    assert "FAIL" in (run_dir / "report.md").read_text()
