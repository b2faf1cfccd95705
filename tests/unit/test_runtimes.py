"""The runtime registry (:mod:`nxm_deploy.runtimes`): every registration is implemented, and a runtime added as one
module + one registration reaches validation, the output diff, the report and the client without other changes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from nxm_deploy.client import TextClassifier
from nxm_deploy.fileio import read_json
from nxm_deploy.run.layout import RunLayout
from nxm_deploy.run.reader import open_run_dir, read_export_manifest
from nxm_deploy.runtimes import RUNTIMES, Runtime, client_runtimes, runtime_label
from nxm_deploy.validate.diff import default_comparisons, polygraphy_argv
from nxm_deploy.validate.report import build_report
from nxm_deploy.validate.stage import make_runners

ROLES = {"validation": ("validation_runners",), "client": ("client_artifact", "open_client")}


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_every_registration_is_implemented(name):
    runtime = RUNTIMES[name]
    assert runtime.name == name and runtime.device in ("cpu", "cuda") and runtime.label
    module = runtime.implementation()
    for role, functions in ROLES.items():
        if getattr(runtime, role):
            assert all(callable(getattr(module, f, None)) for f in functions), (name, role)


def test_the_client_offers_tensorrt_first_then_onnxruntime():
    assert [r.client for r in client_runtimes()] == ["tensorrt", "onnxruntime"]
    assert runtime_label("onnxruntime-cpu") == "ONNX Runtime CPU" and runtime_label("unknown-rt") == "unknown-rt"


@pytest.fixture
def one_thread_runtime(monkeypatch):
    """The plugin runtime of tests/plugins/ort_one_thread.py, registered as a user would (one entry)."""
    runtime = Runtime("onnxruntime-cpu-1t", "ONNX Runtime CPU, 1 thread", "cpu", "plugins.ort_one_thread",
                      validation=True, client="onnxruntime-1t", client_priority=95, polygraphy=("--onnxrt",))
    monkeypatch.setitem(RUNTIMES, runtime.name, runtime)
    return runtime


def test_a_runtime_added_by_one_module_and_one_registration(tiny_run, tmp_path, one_thread_runtime):
    rc, source = tiny_run
    assert rc == 0
    run = tmp_path / "run"
    shutil.copytree(source, run)
    # validation asks it for runners, labelled by the runtime itself
    runners, _ = make_runners(run, read_export_manifest(run), [(1, 64)], None)
    new = runners["sparse_int8_1t"]
    assert new.backend == "onnxruntime-cpu-1t" and new.describe()["label"] == "sparse 2:4 INT8 Q/DQ ONNX, one thread"
    assert list(runners)[:2] == ["dense_fp32", "sparse_int8"]  # registration order: the built-in runtimes first
    # the output diff gates it against the Q/DQ reference and re-runs it with the registered Polygraphy flags
    comparison = next(c for c in default_comparisons(runners) if c.candidate == "sparse_int8_1t")
    assert (comparison.reference, comparison.tolerance, comparison.gated) == ("sparse_int8", "int8", True)
    assert polygraphy_argv("m.onnx", new.backend, "o.json", 0.1, 0.0, "i.json")[3] == "--onnxrt"
    # the report labels the runner and its runtime from validation.json, as validation writes them
    layout = RunLayout(run)
    validation = read_json(layout.validation)
    validation["runners"]["sparse_int8_1t"] = new.describe()
    validation["metrics"]["sparse_int8_1t"] = validation["metrics"]["sparse_int8"]
    layout.validation.write_text(json.dumps(validation))
    recipe = open_run_dir(run)
    recipe.validate_.plots = False
    report = build_report(recipe, run)
    row = next(r for r in report["accuracy"] if r["name"] == "sparse_int8_1t")
    assert (row["model"], row["runtime"]) == ("sparse 2:4 INT8 Q/DQ ONNX, one thread", "ONNX Runtime CPU, 1 thread")
    assert "ONNX Runtime CPU, 1 thread" in layout.report_md.read_text()
    # the client offers it by its client name and gives the same predictions
    texts = [("A man is playing a guitar.", "A person plays music.")]
    with TextClassifier.from_artifacts(run, backend="onnxruntime-1t") as one:
        assert one.backend == "onnxruntime-1t" and "1 intra-op threads" in one.info["runtime"]
        got = one.predict_logits(texts)
    with TextClassifier.from_artifacts(run, backend="onnxruntime") as default:
        np.testing.assert_allclose(got, default.predict_logits(texts), atol=1e-5)
