"""Validation maths without models: percentiles, interleaving, speedups, metrics on known predictions,
INT8 tolerance rule, gates and their errors, engine manifest / profile checks, profile fitting."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from nxm_deploy.data.metrics import compute_metrics
from nxm_deploy.errors import ConfigError, NxmError
from nxm_deploy.validate.diff import (
    FAKEQUANT_FP64, INT8_ATOL_FLOOR, default_comparisons, gaussian_max_z, int8_tolerance,
)
from nxm_deploy.run.reader import built_engines
from nxm_deploy.runtimes.tensorrt import (
    check_engine_manifest, check_grid_in_profile, engine_runners, profile_range,
)
from nxm_deploy.errors import (
    AccuracyRegressionError, LatencyRegressionError, OutputMismatchError, ValidationError, exit_code,
)
from nxm_deploy.validate.gates import (
    accuracy_gate, delta_pt, diff_gate, evaluate_gates, gate_settings, latency_gate, raise_for_gates,
)
from nxm_deploy.timing import measure_ab, percentiles_ms, round_order, speedup_stats, summarize


# ----------------------------------------------------------------------------------------------- latency maths
def test_percentiles_of_known_durations() -> None:
    stats = percentiles_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["mean_ms"] == pytest.approx(50.5)
    with pytest.raises(ValueError):
        percentiles_ms([])


def test_round_order_rotates_every_round() -> None:
    names = ["a", "b", "c"]
    assert [round_order(names, i) for i in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    # over len(names) rounds every runner holds every position once
    for pos in range(3):
        assert sorted(round_order(names, i)[pos] for i in range(3)) == names
    assert round_order([], 5) == []


def test_speedup_stats_ratio_of_medians_and_per_round_spread() -> None:
    base = [10.0, 20.0, 30.0, 40.0, 50.0]
    model = [5.0, 10.0, 10.0, 20.0, 50.0]  # per-round ratios 2, 2, 3, 2, 1
    sp = speedup_stats(base, model)
    assert sp["speedup"] == pytest.approx(30.0 / 10.0)
    assert sp["speedup_p10"] == pytest.approx(np.percentile([2, 2, 3, 2, 1], 10))
    assert sp["speedup_p90"] == pytest.approx(np.percentile([2, 2, 3, 2, 1], 90))
    with pytest.raises(ValueError):
        speedup_stats([1.0, 2.0], [1.0])


class _ScriptedRunner:
    """Takes ``cost`` seconds times the machine's current slowdown; records the global call order."""

    def __init__(self, name: str, cost: float, machine: dict):
        self.name, self.cost, self.machine = name, cost, machine
        self.last_inference_s = 0.0

    def infer(self, feeds):
        self.machine["calls"].append(self.name)
        self.last_inference_s = self.cost * self.machine["slowdown"](len(self.machine["calls"]))
        return {"logits": np.zeros((next(iter(feeds.values())).shape[0], 2), np.float32)}


def test_measure_ab_interleaves_and_drift_cancels_in_per_round_ratios() -> None:
    # the machine gets 3x slower halfway through the timed rounds: medians are skewed, per-round ratios are not
    machine = {"calls": [], "slowdown": lambda n: 1.0 if n <= 2 * 2 + 2 * 10 else 3.0}
    runners = {"dense": _ScriptedRunner("dense", 0.020, machine), "sparse": _ScriptedRunner("sparse", 0.010, machine)}
    feeds = {"input_ids": np.zeros((4, 8), np.int64)}
    stats = measure_ab(runners, feeds, warmup_runs=2, timed_runs=20, baseline="dense")
    calls = machine["calls"]
    assert len(calls) == 2 * (2 + 20)
    timed = calls[4:]
    assert [timed[2 * i: 2 * i + 2] for i in range(3)] == [["dense", "sparse"], ["sparse", "dense"], ["dense", "sparse"]]
    s = stats["sparse"]
    assert s["speedup_p10"] == pytest.approx(2.0) and s["speedup_p90"] == pytest.approx(2.0)
    assert s["speedup"] == pytest.approx(2.0)
    assert s["speedup_vs_dense"] == s["speedup"] and s["baseline"] == "dense" and s["runs"] == 20
    assert stats["dense"]["speedup"] == pytest.approx(1.0)
    assert s["throughput_seq_per_s"] == pytest.approx(4 * 1e3 / s["p50_ms"])
    for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms"):
        assert stats["dense"][key] > 0


def test_measure_ab_per_runner_baselines() -> None:
    machine = {"calls": [], "slowdown": lambda n: 1.0}
    runners = {name: _ScriptedRunner(name, cost, machine)
               for name, cost in (("dense_fp32", 0.04), ("sparse_int8", 0.02), ("trt_dense", 0.004), ("trt_sparse", 0.001))}
    stats = measure_ab(runners, {"input_ids": np.zeros((1, 8), np.int64)}, 0, 20, baseline="dense_fp32",
                       baselines={"trt_dense": "trt_dense", "trt_sparse": "trt_dense"})
    assert stats["sparse_int8"]["speedup"] == pytest.approx(2.0)
    assert stats["trt_sparse"]["baseline"] == "trt_dense" and stats["trt_sparse"]["speedup"] == pytest.approx(4.0)
    stats = summarize({"a": [0.001] * 3, "b": [0.002] * 3}, 2, {"a": None, "b": None})
    assert "speedup" not in stats["a"] and stats["b"]["throughput_seq_per_s"] == pytest.approx(1000.0)
    with pytest.raises(ValueError):
        measure_ab(runners, {"input_ids": np.zeros((1, 8), np.int64)}, 0, 1, baseline="nope")


# ----------------------------------------------------------------------------------------------- metrics
def _logits_for(classes, num_labels=2) -> np.ndarray:
    out = np.zeros((len(classes), num_labels), np.float32)
    out[np.arange(len(classes)), classes] = 1.0
    return out


def test_metric_values_on_known_predictions() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    preds = np.array([1, 1, 0, 0, 0, 1, 1, 0])  # TP 3, FN 1, TN 3, FP 1
    assert compute_metrics("rte", _logits_for(preds), labels) == {"accuracy": pytest.approx(6 / 8)}
    mrpc = compute_metrics("mrpc", _logits_for(preds), labels)
    assert mrpc["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1)) and mrpc["accuracy"] == pytest.approx(0.75)
    mcc = (3 * 3 - 1 * 1) / math.sqrt((3 + 1) * (3 + 1) * (3 + 1) * (3 + 1))
    assert compute_metrics("cola", _logits_for(preds), labels)["matthews_corr"] == pytest.approx(mcc)
    mnli = compute_metrics("mnli", _logits_for([0, 1, 2, 2], 3), np.array([0, 1, 2, 1]))
    assert mnli["accuracy"] == pytest.approx(0.75)
    stsb = compute_metrics("stsb", np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.5, 2.5, 3.5, 5.5]))
    assert stsb["pearson"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [1.5, 2.5, 3.5, 5.5])[0, 1])
    assert stsb["spearman"] == pytest.approx(1.0)


def test_delta_in_points() -> None:
    assert delta_pt({"accuracy": 0.556}, {"accuracy": 0.538}, "accuracy") == pytest.approx(1.8)
    assert delta_pt(None, {"accuracy": 0.5}, "accuracy") is None
    assert delta_pt({"f1": 0.5}, {"accuracy": 0.5}, "accuracy") is None


# ----------------------------------------------------------------------------------------------- INT8 tolerance
def test_int8_tolerance_rule() -> None:
    fq = [np.array([[1.0, -1.0]]), np.array([[2.0, 0.0]])]
    fp = [np.array([[1.2, -1.0]]), np.array([[2.0, 0.0]])]  # q = 0.2 -> lower 0.01, cap 0.1
    tol = int8_tolerance(fq, [fq[0] + 0.01, fq[1]], fp, factor=4)
    assert tol["atol"] == pytest.approx(0.04) and tol["limited_by"] == "factor" and tol["rtol"] == 0.0
    assert tol["observed_impl_max_abs_diff"] == pytest.approx(0.01)
    assert tol["quantization_max_abs_diff"] == pytest.approx(0.2)
    assert tol["lower"] == pytest.approx(0.01) and tol["cap"] == pytest.approx(0.1)
    broken = int8_tolerance(fq, [fq[0] + 0.5, fq[1]], fp, factor=4)  # a broken INT8 graph cannot widen its own tolerance
    assert broken["atol"] == pytest.approx(0.1) and broken["limited_by"] == "cap"
    identical = int8_tolerance(fq, fq, fp, factor=4)  # no flip seen in calibration: 5% of the INT8 perturbation
    assert identical["atol"] == pytest.approx(0.01) and identical["limited_by"] == "floor"
    tiny_q = int8_tolerance(fq, fq, [a + 1e-5 for a in fq], factor=4)
    assert tiny_q["atol"] == INT8_ATOL_FLOOR and tiny_q["cap"] == INT8_ATOL_FLOOR
    uncapped = int8_tolerance(fq, [fq[0] + 0.5, fq[1]], None, factor=2)
    assert uncapped["atol"] == pytest.approx(1.0) and uncapped["cap"] is None


def _deep_int8_outputs(rng, batches: int = 4, sigma: float = 0.006, ort_sigma: float | None = None):
    """Synthetic logits ``[8, 2]`` per batch in the regime of a deep INT8 model: the INT8 perturbation (twin vs
    quantizers off), the twin's own FP32-vs-FP64 rounding noise and ORT's are all Gaussian of rms ``sigma``;
    ORT's (``ort_sigma``, default ``sqrt(2) sigma``: independent of the twin's, the worst case) is drawn per logit.
    Returns (fakequant, ort, qat_fp32, fakequant_fp64)."""
    fp = [rng.normal(0, 0.3, (8, 2)) for _ in range(batches)]
    fq = [a + rng.normal(0, sigma, a.shape) for a in fp]
    fq64 = [a + rng.normal(0, sigma, a.shape) for a in fq]
    ort = [a + rng.normal(0, np.sqrt(2) * sigma if ort_sigma is None else ort_sigma, a.shape) for a in fq]
    return fq, ort, fp, fq64


def test_int8_noise_bound_holds_on_held_out_batches() -> None:
    """Deep-model regime (ORT-vs-twin noise as large as the INT8 perturbation): the former cap, half the calibration
    half's max |twin - FP32|, failed correct runtimes on held-out batches; the FP64 noise bound holds them."""
    rng = np.random.default_rng(0)
    trials, former_failed, failed = 300, 0, 0
    for _ in range(trials):
        fq, ort, fp, fq64 = _deep_int8_outputs(rng)
        tol = int8_tolerance(fq, ort, fp, fakequant_fp64=fq64)
        worst = max(float(np.max(np.abs(a - b))) for a, b in zip(ort, fq))  # every batch, held-out ones included
        failed += worst > tol["atol"]
        former_failed += worst > min(tol["atol"], 0.5 * max(float(np.max(np.abs(a - b))) for a, b in zip(fq[:2], fp[:2])))
    assert failed == 0 and former_failed > trials // 2, (failed, former_failed)
    z = gaussian_max_z(64)
    assert z == pytest.approx(4.32, abs=0.01) and gaussian_max_z(128) > z  # the max of more logits grows
    assert tol["logits_compared"] == 64 and tol["z"] == pytest.approx(z) and tol["calibration_batches"] == 2
    s = np.sqrt(np.mean(np.concatenate([(a - b).ravel() for a, b in zip(fq, fq64)]) ** 2))
    assert tol["rounding_noise_rms"] == pytest.approx(s) and tol["noise_bound"] == pytest.approx(np.sqrt(2) * z * s)
    assert "√2 · z · s" in tol["rule"] and "first 2 of 4 batches" in tol["rule"]


def test_int8_noise_bound_still_fails_a_real_error() -> None:
    rng = np.random.default_rng(1)
    fq, ort, fp, fq64 = _deep_int8_outputs(rng)
    broken = [a + 0.08 * np.sign(rng.normal(size=a.shape)) for a in ort]  # a real error: ~13 rms of the noise
    tol = int8_tolerance(fq, broken, fp, fakequant_fp64=fq64)
    assert tol["limited_by"] == "cap" and tol["factor"] * tol["observed_impl_max_abs_diff"] > tol["cap"]
    assert all(float(np.max(np.abs(a - b))) > tol["atol"] for a, b in zip(broken, fq))
    # the cap is the twin's alone: the same whatever the candidate
    assert tol["cap"] == int8_tolerance(fq, ort, fp, fakequant_fp64=fq64)["cap"]


def test_int8_tolerance_calibration_split_and_inputs() -> None:
    rng = np.random.default_rng(2)
    fq, ort, fp, fq64 = _deep_int8_outputs(rng)
    late = ort[:2] + [a + 1.0 for a in ort[2:]]  # only held-out batches are off: d does not see them
    assert int8_tolerance(fq, late, fp, fakequant_fp64=fq64)["atol"] == int8_tolerance(fq, ort, fp, fakequant_fp64=fq64)["atol"]
    all_cal = int8_tolerance(fq, late, fp, fakequant_fp64=fq64, n_calibration=4)
    assert all_cal["calibration_batches"] == 4 and all_cal["observed_impl_max_abs_diff"] > 1.0
    noisy_tail = int8_tolerance(fq, ort, fp, fakequant_fp64=fq64[:2] + [a + 0.05 for a in fq[2:]])
    assert noisy_tail["rounding_noise_rms"] > 0.02  # s uses every batch (the twin only)
    with pytest.raises(ValueError, match="same number"):
        int8_tolerance(fq, ort[:3], fp)
    with pytest.raises(ValueError, match="different shapes"):
        int8_tolerance(fq, [a[:, :1] for a in ort], fp)


def test_default_comparisons_follow_runner_labels() -> None:
    def r(backend, precision, sparse=False):
        return SimpleNamespace(backend=backend, precision=precision, sparse=sparse)

    runners = {"torch_dense_fp32": r("pytorch-cpu", "fp32"), "torch_int8_fakequant": r("pytorch-cpu", "int8", True),
               "torch_qat_fp32": r("pytorch-cpu", "fp32", True), "dense_fp32": r("onnxruntime-cpu", "fp32"),
               "sparse_int8": r("onnxruntime-cpu", "int8", True), "cpu_int8": r("onnxruntime-cpu", "int8", True),
               "trt_dense": r("tensorrt", "fp16"), "trt_sparse": r("tensorrt", "int8", True)}
    comps = {(c.reference, c.candidate): c for c in default_comparisons(runners)}
    assert comps[("torch_dense_fp32", "dense_fp32")].tolerance == "fp32"
    assert comps[("torch_int8_fakequant", "sparse_int8")].tolerance == "int8"
    assert comps[("sparse_int8", "cpu_int8")].tolerance == "int8"
    assert comps[("sparse_int8", "trt_sparse")].tolerance == "int8"
    assert comps[("dense_fp32", "trt_dense")].tolerance == "gpu_float"
    assert comps[("dense_fp32", "sparse_int8")].gated is False
    assert comps[("torch_int8_fakequant", "torch_qat_fp32")].gated is False
    fp64 = default_comparisons({**runners, FAKEQUANT_FP64: r("pytorch-cpu", "int8", True)})
    assert [(c.reference, c.gated) for c in fp64 if c.candidate == FAKEQUANT_FP64] == [("torch_int8_fakequant", False)]


# ----------------------------------------------------------------------------------------------- gates
METRICS = {"dense_fp32": {"accuracy": 0.60}, "sparse_int8": {"accuracy": 0.585}, "cpu_int8": {"accuracy": 0.55}}
RUNNERS = {"dense_fp32": {"backend": "onnxruntime-cpu", "sparse": False},
           "sparse_int8": {"backend": "onnxruntime-cpu", "sparse": True},
           "cpu_int8": {"backend": "onnxruntime-cpu", "sparse": True}}
LATENCY = [{"batch_size": 1, "sequence_length": 128,
            "dense_fp32": {"speedup": 1.0, "baseline": "dense_fp32"},
            "sparse_int8": {"speedup": 0.7, "speedup_p10": 0.6, "speedup_p90": 0.8, "baseline": "dense_fp32"},
            "cpu_int8": {"speedup": 1.9, "speedup_p10": 1.5, "speedup_p90": 2.2, "baseline": "dense_fp32"}},
           {"batch_size": 32, "sequence_length": 128,
            "dense_fp32": {"speedup": 1.0, "baseline": "dense_fp32"},
            "sparse_int8": {"speedup": 1.2, "speedup_p10": 1.1, "speedup_p90": 1.3, "baseline": "dense_fp32"},
            "cpu_int8": {"speedup": 1.4, "speedup_p10": 1.3, "speedup_p90": 1.5, "baseline": "dense_fp32"}}]


def test_accuracy_gate() -> None:
    gate = accuracy_gate(METRICS, "dense_fp32", "accuracy", max_drop_pt=2.0)
    by_model = {c["model"]: c for c in gate["checks"]}
    assert by_model["sparse_int8"]["delta_pt"] == pytest.approx(-1.5) and by_model["sparse_int8"]["passed"]
    assert by_model["cpu_int8"]["delta_pt"] == pytest.approx(-5.0) and not by_model["cpu_int8"]["passed"]
    assert gate["enabled"] and not gate["passed"]
    assert accuracy_gate(METRICS, "dense_fp32", "accuracy", max_drop_pt=None)["passed"]
    assert accuracy_gate(METRICS, "dense_fp32", "accuracy", max_drop_pt=5.0)["passed"]  # exactly at the limit


def test_latency_gate_uses_the_best_sparse_model_per_grid_point() -> None:
    gate = latency_gate(LATENCY, RUNNERS, min_speedup=1.5)
    assert [(c["batch_size"], c["model"], c["passed"]) for c in gate["checks"]] == [(1, "cpu_int8", True), (32, "cpu_int8", False)]
    assert not gate["passed"]
    assert latency_gate(LATENCY, RUNNERS, min_speedup=1.4)["passed"]
    assert latency_gate(LATENCY, RUNNERS, min_speedup=None)["passed"]


def test_raise_for_gates_picks_the_error_and_exit_code() -> None:
    diff = {"comparisons": [{"reference": "a", "candidate": "b", "max_abs_diff": 0.5, "atol": 0.1, "passed": False, "gated": True}]}
    both = evaluate_gates({"max_accuracy_drop_pt": 2.0, "min_speedup": 1.5, "diff_gate": True}, metrics=METRICS,
                          baseline="dense_fp32", primary="accuracy", latency=LATENCY, runners=RUNNERS, diff=diff)
    assert not both["passed"]
    with pytest.raises(AccuracyRegressionError) as info:
        raise_for_gates(both, report="runs/x/report.md")
    assert "cpu_int8 -5.00 pt" in info.value.message and "min speedup 1.5x" in info.value.message
    assert len(info.value.failures) == 3 and exit_code(info.value) == 4
    assert "report.md" in info.value.hint
    latency_only = evaluate_gates({"min_speedup": 1.5}, metrics=METRICS, baseline="dense_fp32", primary="accuracy",
                                  latency=LATENCY, runners=RUNNERS, diff=diff)
    with pytest.raises(LatencyRegressionError) as info:
        raise_for_gates(latency_only)
    assert exit_code(info.value) == 5 and "b32xs128" in info.value.message
    with pytest.raises(OutputMismatchError):
        raise_for_gates({"diff": diff_gate(diff, True)})
    assert diff_gate(diff, False)["passed"]  # reported, not gated
    raise_for_gates(evaluate_gates({}, metrics=METRICS, baseline="dense_fp32", primary="accuracy", latency=LATENCY,
                                   runners=RUNNERS, diff=diff))  # nothing set: no error
    for cls in (AccuracyRegressionError, LatencyRegressionError, OutputMismatchError, ValidationError):
        assert issubclass(cls, NxmError)
    assert issubclass(ValidationError, ConfigError) and exit_code(ValidationError("x")) == 2
    assert exit_code(RuntimeError("x")) == 1 and exit_code(OutputMismatchError("x")) == 1


def test_gate_settings_default_when_the_recipe_lacks_them() -> None:
    assert gate_settings(SimpleNamespace()) == {"max_accuracy_drop_pt": None, "min_speedup": None, "diff_gate": False}
    assert gate_settings(SimpleNamespace(min_speedup=1.2))["min_speedup"] == 1.2


# ----------------------------------------------------------------------------------------------- engines
MANIFEST = {"name": "eng", "engine": "eng__trt10.3.0__sm90__sparse.plan", "tensorrt": "10.3.0",
            "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0", "sm": "90"}, "precision": "int8-qdq",
            "sparse_weights": True,
            "profiles": [{"input_ids": {"min": [1, 8], "opt": [32, 128], "max": [64, 128]},
                          "attention_mask": {"min": [1, 8], "opt": [32, 128], "max": [64, 128]}}]}


def test_engine_manifest_must_match_this_machine() -> None:
    check_engine_manifest(MANIFEST, "10.3.0", "90")
    with pytest.raises(ValidationError, match=r"TensorRT 10\.3\.0 \(this machine: 10\.8\.0\)"):
        check_engine_manifest(MANIFEST, "10.8.0", "90")
    with pytest.raises(ValidationError, match=r"SM 90 NVIDIA H100 \(this machine: SM 80 A100\)"):
        check_engine_manifest(MANIFEST, "10.3.0", "80", "A100")


def test_grid_outside_the_profile_is_named() -> None:
    lo, hi = profile_range(MANIFEST["profiles"][0])
    assert (lo, hi) == ((1, 8), (64, 128))
    check_grid_in_profile([(1, 128), (32, 128)], lo, hi, "eng")
    with pytest.raises(ValidationError, match=r"\[\(128, 128\), \(1, 256\)\].*batch 1\.\.64, sequence 8\.\.128"):
        check_grid_in_profile([(1, 128), (128, 128), (1, 256)], lo, hi, "eng")


def _engine_run(tmp_path, plan_bytes=b"plan", recorded=None):
    from nxm_deploy.fileio import sha256_file

    engines = tmp_path / "engines"
    engines.mkdir(parents=True)
    plan = engines / MANIFEST["engine"]
    plan.write_bytes(plan_bytes)
    manifest = {**MANIFEST, "engine_sha256": recorded or sha256_file(plan)}
    plan.with_suffix(".json").write_text(json.dumps(manifest))
    (engines / "status.json").write_text(json.dumps({"engines": [
        {"name": "eng", "status": "built", "engine": plan.name, "manifest": plan.with_suffix(".json").name},
        {"name": "other", "status": "skipped: no GPU"}]}))
    return tmp_path


def test_built_engines_and_skips(tmp_path) -> None:
    run = _engine_run(tmp_path)
    (found,) = built_engines(run)
    assert found["name"] == "eng" and found["plan_path"].endswith(".plan")
    from nxm_deploy.engine.trt import Environment, GpuInfo

    def gpu(sm):
        return GpuInfo(name="GPU", compute_capability=f"{sm[0]}.{sm[1]}", driver=None, cuda_driver_api="12.4",
                       cuda_runtime=None)

    no_trt = Environment(tensorrt_error="TensorRT is not installed", gpu=gpu("90"), cuda={"cuda_python": "12.6"})
    runners, skipped = engine_runners(run, [(1, 128)], env=no_trt)
    assert runners == {} and len(skipped) == 1 and skipped[0]["name"] == "eng"
    assert skipped[0]["reason"].startswith("cannot run TensorRT engines here: TensorRT is not installed")
    no_cuda_python = Environment(tensorrt_version="10.3.0", gpu=gpu("90"), cuda={"cuda_python": None})
    runners, skipped = engine_runners(run, [(1, 128)], env=no_cuda_python)
    assert runners == {} and "cuda-python is not installed" in skipped[0]["reason"]
    other_gpu = Environment(tensorrt_version="10.3.0", gpu=gpu("80"), cuda={"cuda_python": "12.6"})
    with pytest.raises(ValidationError, match="SM 90"):
        engine_runners(run, [(1, 128)], env=other_gpu)
    same = Environment(tensorrt_version="10.3.0", gpu=gpu("90"), cuda={"cuda_python": "12.6"})
    with pytest.raises(ValidationError, match="outside engine eng's profile"):
        engine_runners(run, [(1, 512)], env=same)
    runners, skipped = engine_runners(run, [(1, 128), (32, 128)], env=same)
    assert list(runners) == ["trt_eng"] and runners["trt_eng"].precision == "int8" and runners["trt_eng"].sparse
    assert built_engines(tmp_path / "nothing") == []


def test_altered_plan_is_refused(tmp_path) -> None:
    run = _engine_run(tmp_path, recorded="0" * 64)
    with pytest.raises(ValidationError, match="does not match the sha256"):
        built_engines(run)


# ----------------------------------------------------------------------------------------------- profile fitting
def test_fit_to_profile_splits_and_pads() -> None:
    from nxm_deploy.validate.stage import fit_to_profile

    feed = {"input_ids": np.arange(10 * 4).reshape(10, 4), "attention_mask": np.ones((10, 4), np.int64)}
    assert fit_to_profile(feed, None, None)[0][1] == 10
    pieces = fit_to_profile(feed, (2, 8), (4, 128))
    assert [keep for _, keep in pieces] == [4, 4, 2]
    assert [p["input_ids"].shape for p, _ in pieces] == [(4, 8), (4, 8), (2, 8)]
    assert (pieces[2][0]["input_ids"][:, :4] == feed["input_ids"][8:]).all()
    last, keep = fit_to_profile({k: v[:1] for k, v in feed.items()}, (2, 8), (4, 128))[0]
    assert keep == 1 and last["input_ids"].shape == (2, 8) and (last["attention_mask"][:, 4:] == 0).all()
    with pytest.raises(ValidationError, match="exceed"):
        fit_to_profile(feed, (1, 1), (4, 3))
