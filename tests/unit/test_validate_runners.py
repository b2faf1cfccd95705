"""Runners behind Polygraphy's interface, the Polygraphy round trip on tiny hand-built ONNX models, the report
with its plots, and the CLI's handling of validation errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from nxm_deploy.validate.diff import Comparison, compare, collect_outputs, run_diff, run_polygraphy
from nxm_deploy.errors import AccuracyRegressionError, ValidationError
from nxm_deploy.runtimes.onnxruntime import OnnxRuntimeRunner
from nxm_deploy.runtimes.pytorch import TorchRunner, quantizers_disabled
from nxm_deploy.validate.runners import check_io

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def tiny_classifier(path: Path, *, labels: int = 2, inputs=tuple(NAMES), seed: int = 0, vocab: int = 50,
                    hidden: int = 8) -> Path:
    """``logits = sum_t(emb[input_ids] * mask) @ W``: a BERT-shaped ONNX classifier (int64 [B, L] in, [B, C] out)."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(vocab, hidden)).astype(np.float32)
    w = rng.normal(size=(hidden, labels)).astype(np.float32)
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch_size", "sequence_length"]) for n in inputs]
    nodes = [helper.make_node("Gather", ["emb", inputs[0]], ["e"]),
             helper.make_node("Cast", [inputs[1]], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axis_last"], ["m3"]),
             helper.make_node("Mul", ["e", "m3"], ["em"]),
             helper.make_node("ReduceSum", ["em", "axis_seq"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "classifier.weight"], ["logits"])]
    inits = [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "classifier.weight"),
             numpy_helper.from_array(np.array([-1], np.int64), "axis_last"),
             numpy_helper.from_array(np.array([1], np.int64), "axis_seq")]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", labels])
    model = helper.make_model(helper.make_graph(nodes, "tiny", ins, [out], inits), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def plant_weight_change(path: Path, delta: float = 0.5) -> None:
    """Add ``delta`` to one classifier weight, in place."""
    model = onnx.load(str(path))
    (init,) = [t for t in model.graph.initializer if t.name == "classifier.weight"]
    w = numpy_helper.to_array(init).copy()
    w[0, 0] += delta
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))


def feeds(n_batches: int = 3, batch: int = 4, length: int = 6, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 50, (batch, length)).astype(np.int64),
             "attention_mask": np.ones((batch, length), np.int64),
             "token_type_ids": np.zeros((batch, length), np.int64)} for _ in range(n_batches)]


# ----------------------------------------------------------------------------------------------- runners
def test_onnxruntime_runner_is_a_polygraphy_runner(tmp_path) -> None:
    from polygraphy.backend.base import BaseRunner

    runner = OnnxRuntimeRunner(tiny_classifier(tmp_path / "m.onnx"), "dense_fp32", intra_op_threads=1)
    assert isinstance(runner, BaseRunner) and not runner.is_active
    with runner:
        assert runner.input_names == NAMES and runner.static_num_labels() == 2
        feed = {**feeds(1)[0], "extra": np.zeros((4, 6), np.int64)}  # extra entries are ignored
        out = runner.infer({k: v.astype(np.int32) for k, v in feed.items()})  # int32 ids are accepted
        assert out["logits"].shape == (4, 2) and out["logits"].dtype == np.float32
        assert runner.last_inference_s > 0
        assert runner.describe() == {"name": "dense_fp32", "label": "dense_fp32", "backend": "onnxruntime-cpu",
                                     "precision": "fp32", "sparse": False, "source": str(tmp_path / "m.onnx")}
        with pytest.raises(ValidationError, match="token_type_ids"):
            runner.infer({"input_ids": feed["input_ids"], "attention_mask": feed["attention_mask"]})
        with pytest.raises(ValidationError, match="integer"):
            runner.infer({k: v.astype(np.float32) for k, v in feed.items()})
    assert not runner.is_active


def test_check_io_rejects_other_inputs_and_label_counts(tmp_path) -> None:
    probe = feeds(1, batch=1)[0]
    with OnnxRuntimeRunner(tiny_classifier(tmp_path / "three.onnx", labels=3), "three", intra_op_threads=1) as r:
        check_io(r, NAMES, 3, probe)
        with pytest.raises(ValidationError, match=r"logits of shape \[1, 3\].*\[B, 2\]"):
            check_io(r, NAMES, 2, probe)
    two_inputs = tiny_classifier(tmp_path / "two.onnx", inputs=("input_ids", "attention_mask"))
    with OnnxRuntimeRunner(two_inputs, "two", intra_op_threads=1) as r:
        with pytest.raises(ValidationError, match="takes inputs"):
            check_io(r, NAMES, 2, probe)


def test_gpu_backend_without_its_provider_is_refused(tmp_path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu installed")
    runner = OnnxRuntimeRunner(tiny_classifier(tmp_path / "m.onnx"), "dense_fp32_cuda", backend="onnxruntime-cuda")
    with pytest.raises(ValidationError, match="CUDAExecutionProvider"):
        runner.activate()


def test_torch_runner_and_quantizers_disabled() -> None:
    import torch

    from nxm_deploy.quantization.fake_quant import TensorQuantizer

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = TensorQuantizer(learn_amax=False)
            self.quant.amax.data.fill_(1.0)
            self.config = SimpleNamespace()

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            x = (input_ids.float() * attention_mask.float()).mean(-1, keepdim=True) / 100.0 + 0.0013
            return SimpleNamespace(logits=torch.cat([self.quant(x), -x], dim=-1))

    model = Tiny()
    quant = TorchRunner(model, "torch_int8_fakequant", NAMES, precision="int8")
    plain = TorchRunner(model, "torch_qat_fp32", NAMES, context=quantizers_disabled)
    with quant, plain:  # one model, two modes at once: the context is entered per forward
        feed = feeds(1)[0]
        q, f = quant.infer(feed)["logits"], plain.infer(feed)["logits"]
        assert q.shape == (4, 2) and quant.last_inference_s > 0
        assert np.allclose(q[:, 0], np.round(f[:, 0] * 127) / 127, atol=1e-6)  # INT8 grid of amax 1
        assert not np.allclose(q[:, 0], f[:, 0]) and np.allclose(q[:, 1], f[:, 1])
        assert model.quant.enabled  # restored
        assert quant.describe()["backend"] == "pytorch-cpu"
    with quant:  # a runner activates again after deactivation (Polygraphy's Comparator does), with its inputs
        assert quant.input_names == NAMES and quant.infer(feeds(1)[0])["logits"].shape == (4, 2)


# ----------------------------------------------------------------------------------------------- Polygraphy
def test_compare_uses_polygraphy_with_the_given_tolerance(tmp_path) -> None:
    a = tiny_classifier(tmp_path / "a.onnx")
    shutil.copy(a, tmp_path / "b.onnx")
    plant_weight_change(tmp_path / "b.onnx", delta=0.01)
    with OnnxRuntimeRunner(a, "a", intra_op_threads=1) as ra, OnnxRuntimeRunner(tmp_path / "b.onnx", "b", intra_op_threads=1) as rb:
        results = collect_outputs({"a": ra, "b": rb}, feeds())
    assert list(results.keys()) == ["a", "b"]
    tight = compare(results, "a", "b", atol=1e-3, rtol=0.0)
    loose = compare(results, "a", "b", atol=1.0, rtol=0.0)
    assert not tight["passed"] and loose["passed"] and loose["iterations_passed"] == loose["iterations"] == 3
    assert 0 < tight["max_abs_diff"] < 1.0 and tight["max_abs_diff"] >= tight["mean_abs_diff"]
    assert 0.0 <= tight["argmax_agreement"] <= 1.0


def test_polygraphy_round_trip_same_model_passes_planted_change_fails(tmp_path) -> None:
    run = tmp_path / "run"
    ref = tiny_classifier(run / "onnx" / "reference.onnx")
    cand = run / "onnx" / "candidate.onnx"
    shutil.copy(ref, cand)
    with OnnxRuntimeRunner(ref, "reference", intra_op_threads=1) as r0, \
            OnnxRuntimeRunner(cand, "candidate", intra_op_threads=1) as r1:
        diff = run_diff({"reference": r0, "candidate": r1}, feeds(), run / "diff", run,
                        comparisons=[Comparison("reference", "candidate", "fp32")], verify_cli=1)
    (row,) = diff["comparisons"]
    assert row["passed"] and row["max_abs_diff"] == 0.0 and diff["ok"]
    assert (run / "diff" / "inputs.json").is_file() and (run / "diff" / "outputs_reference.json").is_file()
    assert diff["files"]["inputs"] == "diff/inputs.json"
    assert row["command"] == (f"cd {run} && polygraphy run onnx/candidate.onnx --onnxrt --load-inputs diff/inputs.json "
                              "--load-outputs diff/outputs_reference.json --atol 0.001 --rtol 0 --check-error-stat elemwise")
    assert row["cli_exit_code"] == 0 and row["cli_agrees"]

    # the printed command, run by hand: same model -> 0; planted weight change -> non-zero
    argv = row["command"].split(" && ", 1)[1].split()
    rc, _ = run_polygraphy(argv, run)
    assert rc == 0
    plant_weight_change(cand)
    rc, tail = run_polygraphy(argv, run)
    assert rc != 0, tail
    assert "FAILED" in tail


def test_saved_files_are_polygraphy_json(tmp_path) -> None:
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    model = tiny_classifier(tmp_path / "onnx" / "m.onnx")
    data = feeds(2)
    with OnnxRuntimeRunner(model, "m", intra_op_threads=1) as r:
        run_diff({"m": r}, data, tmp_path / "diff", tmp_path, comparisons=[], verify_cli=0)
        expected = r.infer(data[1])["logits"]
    loaded_inputs = load_json(str(tmp_path / "diff" / "inputs.json"))
    assert len(loaded_inputs) == 2 and np.array_equal(loaded_inputs[1]["input_ids"], data[1]["input_ids"])
    results = RunResults.load(str(tmp_path / "diff" / "outputs_m.json"))
    assert np.allclose(np.asarray(results["m"][1]["logits"]), expected)


# ----------------------------------------------------------------------------------------------- report + plots
def _run_dir(tmp_path) -> tuple[Path, object]:
    from nxm_deploy.config.recipe import recipe_from_dict
    from nxm_deploy.pipeline import prepare_run_dir

    recipe = recipe_from_dict(yaml.safe_load((REPO_ROOT / "recipes" / "tiny_smoke.yaml").read_text()))
    return prepare_run_dir(recipe, tmp_path / "run"), recipe


def _validation() -> dict:
    row = lambda b, d, s, c: {  # noqa: E731
        "batch_size": b, "sequence_length": 128,
        "dense_fp32": {"p50_ms": d, "p90_ms": d * 1.1, "p99_ms": d * 1.2, "mean_ms": d, "throughput_seq_per_s": b * 1e3 / d,
                       "baseline": "dense_fp32", "speedup": 1.0, "speedup_vs_dense_fp32": 1.0, "speedup_p10": 1.0, "speedup_p90": 1.0, "runs": 20},
        "sparse_int8": {"p50_ms": s, "p90_ms": s * 1.1, "p99_ms": s * 1.3, "mean_ms": s, "throughput_seq_per_s": b * 1e3 / s,
                        "baseline": "dense_fp32", "speedup": d / s, "speedup_vs_dense_fp32": d / s, "speedup_p10": d / s - 0.2,
                        "speedup_p90": d / s + 0.2, "runs": 20},
        "cpu_int8": {"p50_ms": c, "p90_ms": c * 1.1, "p99_ms": c * 1.3, "mean_ms": c, "throughput_seq_per_s": b * 1e3 / c,
                     "baseline": "dense_fp32", "speedup": d / c, "speedup_vs_dense_fp32": d / c, "speedup_p10": d / c - 0.3,
                     "speedup_p90": d / c + 0.3, "runs": 20}}
    runners = {"dense_fp32": {"name": "dense_fp32", "label": "dense FP32 ONNX", "backend": "onnxruntime-cpu", "precision": "fp32", "sparse": False, "source": "onnx/dense_fp32.onnx"},
               "sparse_int8": {"name": "sparse_int8", "label": "sparse 2:4 INT8 Q/DQ ONNX", "backend": "onnxruntime-cpu", "precision": "int8", "sparse": True, "source": "onnx/sparse_int8_qdq.onnx"},
               "cpu_int8": {"name": "cpu_int8", "label": "sparse 2:4 INT8 CPU ONNX (U8S8 MatMulInteger)", "backend": "onnxruntime-cpu", "precision": "int8", "sparse": True, "source": "onnx/sparse_int8_cpu.onnx"}}
    metrics = {"dense_fp32": {"accuracy": 0.54}, "sparse_int8": {"accuracy": 0.556}, "cpu_int8": {"accuracy": 0.552}}
    latency = [row(1, 30.0, 16.0, 12.0), row(32, 470.0, 215.0, 180.0)]
    diff = {"inputs": "4 batches of 8 real dev examples padded to 128 tokens", "batches": 4,
            "tolerances": {"fp32": {"atol": 1e-3, "rtol": 0.0, "rule": "fp32"},
                           "int8": {"atol": 0.04, "rtol": 0.0, "rule": "int8 rule", "observed_impl_max_abs_diff": 0.01,
                                    "quantization_max_abs_diff": 0.3, "limited_by": "factor"}},
            "comparisons": [{"reference": "torch_int8_fakequant", "candidate": "sparse_int8", "tolerance": "int8", "atol": 0.04,
                             "rtol": 0.0, "gated": True, "passed": True, "iterations": 4, "iterations_passed": 4,
                             "max_abs_diff": 0.02, "mean_abs_diff": 0.004, "argmax_agreement": 1.0,
                             "command": "cd run && polygraphy run onnx/sparse_int8_qdq.onnx --onnxrt ...", "cli_exit_code": 0, "cli_agrees": True},
                            {"reference": "dense_fp32", "candidate": "sparse_int8", "tolerance": "int8", "atol": 0.04, "rtol": 0.0,
                             "gated": False, "passed": False, "iterations": 4, "iterations_passed": 0, "max_abs_diff": 1.5,
                             "mean_abs_diff": 0.4, "argmax_agreement": 0.8, "command": None}]}
    from nxm_deploy.validate.gates import evaluate_gates

    gates = evaluate_gates({"max_accuracy_drop_pt": 1.0, "min_speedup": 2.55}, metrics=metrics, baseline="dense_fp32",
                           primary="accuracy", latency=latency, runners=runners, diff=diff)
    return {"stage": "validate", "task": "rte", "baseline": "dense_fp32", "runners": runners, "metrics": metrics,
            "latency": latency, "latency_method": {"warmup_runs": 3, "timed_runs": 20}, "diff": diff, "gates": gates,
            "machine": "test machine", "runtime": "onnxruntime", "skipped": []}


def test_report_writes_markdown_json_and_plots(tmp_path) -> None:
    import json

    from nxm_deploy.validate.report import build_report

    run, recipe = _run_dir(tmp_path)
    recipe.validate_.plots = True  # the tiny recipe turns them off
    (run / "validation.json").write_text(json.dumps(_validation()))
    layers = [{"module": f"bert.encoder.layer.{i // 6}.{m}", "node": "n", "initializer": "w", "shape": [4, 4], "axis": 1,
               "groups_checked": 4, "groups_violating": 0, "density": 0.5, "status": "sparse", "expected_sparse": True}
              for i, m in enumerate(["attention.self.query", "attention.self.key", "attention.self.value",
                                     "attention.output.dense", "intermediate.dense", "output.dense"] * 2)]
    layers.append({"module": None, "node": "/model/classifier/Gemm", "initializer": "c", "shape": [2, 4], "axis": 1,
                   "groups_checked": 2, "groups_violating": 2, "density": 1.0, "status": "dense", "expected_sparse": False})
    (run / "onnx").mkdir()
    (run / "onnx" / "sparsity_report.json").write_text(json.dumps({"layers": layers}))
    report = build_report(recipe, run)
    assert set(report["plots"]) == {"latency", "speedup", "accuracy", "sparsity"}
    for rel in report["plots"].values():
        assert (run / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run / "report.md").read_text()
    for text in ("## Summary", "## Accuracy (dev set)", "## Latency", "## Output diff (Polygraphy Comparator)",
                 "## Gates", "(plots/latency.png)", "(plots/sparsity.png)", "polygraphy run onnx/sparse_int8_qdq.onnx",
                 "sparse 2:4 INT8 CPU ONNX", "+1.60 pt", "accuracy drop ≤ 1.0 pt: PASSED", "speedup ≥ 2.55×: FAILED",
                 "| speedup | min 2.55× | b1×s128 onnxruntime-cpu: best cpu_int8 | 2.50× | FAIL |"):
        assert text in md, text
    saved = json.loads((run / "report.json").read_text())
    assert saved["gates"]["latency"]["passed"] is False and saved["latency"][0]["batch_size"] == 1
    assert [r["name"] for r in saved["accuracy"]][-3:] == ["dense_fp32", "sparse_int8", "cpu_int8"]


def test_report_says_how_the_int8_tolerance_was_derived(tmp_path) -> None:
    import json

    from nxm_deploy.validate.diff import int8_tolerance
    from nxm_deploy.validate.report import build_report

    rng = np.random.default_rng(0)
    fp = [rng.normal(0, 0.3, (8, 2)) for _ in range(4)]
    fq = [a + rng.normal(0, 0.006, a.shape) for a in fp]
    fq64 = [a + rng.normal(0, 0.006, a.shape) for a in fq]
    ort = [a + rng.normal(0, 0.006, a.shape) for a in fq]
    validation = _validation()
    tol = int8_tolerance(fq, ort, fp, fakequant_fp64=fq64)
    validation["diff"]["tolerances"]["int8"] = tol
    run, recipe = _run_dir(tmp_path)
    (run / "validation.json").write_text(json.dumps(validation))
    build_report(recipe, run)
    (line,) = [l for l in (run / "report.md").read_text().splitlines() if l.startswith("- `int8`")]
    for text in (f"atol {tol['atol']:.3g}", "on the first 2 of 4 batches (d)", "√2 · z · s", "rms(torch fake-quant FP32 − FP64)",
                 f"rounding noise FP32 vs FP64 rms {tol['rounding_noise_rms']:.3g} (s) over all 4 batches, 64 logits",
                 f"bound √2 × {tol['z']:.3g} × s = {tol['noise_bound']:.3g}", "probability ≤ 0.001",
                 f"cap {tol['cap']:.3g}; limited by the {tol['limited_by']}."):
        assert text in line, (text, line)


def test_report_without_validation(tmp_path) -> None:
    from nxm_deploy.validate.report import build_report

    run, recipe = _run_dir(tmp_path)
    report = build_report(recipe, run)
    assert report["stages_done"]["validate"] is False and report["plots"] == {}
    assert "## Summary" in (run / "report.md").read_text()


# ----------------------------------------------------------------------------------------------- stage + CLI errors
def test_missing_task_data_is_a_data_error(tmp_path) -> None:
    import json

    from nxm_deploy.errors import DataError
    from nxm_deploy.validate.stage import validate_stage

    run, recipe = _run_dir(tmp_path)
    (run / "onnx").mkdir()
    (run / "onnx" / "manifest.json").write_text(json.dumps({"inputs": NAMES}))
    with pytest.raises(DataError):
        validate_stage(recipe, run, glue_dir=str(tmp_path / "no_glue_here"))


@pytest.mark.parametrize("error, code", [
    (AccuracyRegressionError("accuracy gate failed"), 4),
    (ValidationError("engine built for another GPU"), 2),
])
def test_cli_exit_codes_for_validation_errors(tmp_path, monkeypatch, capsys, error, code) -> None:
    import nxm_deploy.validate.stage as stage
    from nxm_deploy.cli.main import main

    run, _ = _run_dir(tmp_path)

    def fail(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(stage, "validate_stage", fail)
    rc = main(["-q", "validate", str(run)])
    err = capsys.readouterr().err
    assert rc == code  # the CLI's one exit-code table (nxm_deploy.errors.EXIT_CODES)
    assert f"error: {error.message}" in err and "Traceback" not in err
