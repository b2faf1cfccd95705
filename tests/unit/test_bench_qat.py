"""tools/bench_qat.py: plan, variants, fingerprints, aggregation ("average" keys), targets, resumability (no training)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from nxm_deploy.fileio import atomic_write_json

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_qat", ROOT / "tools" / "bench_qat.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_qat"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bq = _load()

SETTINGS = {"sparse_method": "magnitude", "qat_epochs": 1.0, "qat_lr": 1e-5, "calib_method": "percentile",
            "calib_batches": 16, "percentile": 99.99, "max_train_examples": None, "max_eval_examples": None,
            "threads": 1}


def _rec(task, variant, seed, score, **extra):
    return {"cell": {"task": task, "variant": variant, "seed": seed}, "score": score, **extra}


# -- plan / variants ------------------------------------------------------------------------------------------
def test_plan_order_and_references_always_present():
    variants = bq.parse_variants(["qat_kd", "ptq"])
    assert variants == ["dense", "sparse_fp", "ptq", "qat_kd"]
    cells = bq.plan_cells(["rte", "mrpc"], variants, [0, 1])
    assert [c.key for c in cells[:4]] == ["rte/dense/seed0", "rte/sparse_fp/seed0", "rte/ptq/seed0", "rte/qat_kd/seed0"]
    assert len(cells) == 2 * 2 * 4
    assert cells[0].filename == "rte__dense__seed0.json"


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown variant.*qat_magic"):
        bq.parse_variants(["qat_magic"])


def test_variant_distillation_weights():
    assert bq.variant_distill("qat_kd")["distillation"] == {"alpha": 1.0, "beta": 10.0, "gamma": 1.0, "temperature": 2.0}
    assert bq.variant_distill("qat_kd_no_feature")["distillation"]["gamma"] == 0.0
    assert bq.variant_distill("qat_kd_no_soft")["distillation"]["beta"] == 0.0
    assert bq.variant_distill("qat_no_kd")["distill"] is False
    r = bq.build_recipe_dict(SETTINGS, "mrpc", 2, "qat_kd_no_soft")
    assert r["task"]["name"] == "mrpc" and r["train"]["seed"] == 2 and r["train"]["precision"] == "fp32"
    assert r["train"]["distillation"]["beta"] == 0.0 and r["train"]["qat"]["distill"] is True
    assert r["train"]["qat"]["calibration_method"] == "percentile" and r["train"]["qat"]["calibration_batches"] == 16


def test_recipe_dicts_validate():
    from nxm_deploy.config.recipe import recipe_from_dict

    for v in bq.QAT_VARIANTS:
        recipe = recipe_from_dict(bq.build_recipe_dict(SETTINGS, "rte", 0, v), "test")
        assert recipe.train.qat.epochs == 1.0


def test_diagnostic_variants_only_when_named():
    from nxm_deploy.config.recipe import recipe_from_dict

    assert not set(bq.DIAGNOSTIC_VARIANTS) & set(bq.parse_variants(list(bq.VARIANTS)))  # default plan unchanged
    variants = bq.parse_variants(["qat_kd_dense_teacher", "fp_finetune"])
    assert variants == ["dense", "sparse_fp", "fp_finetune", "qat_kd_dense_teacher"]
    teacher = bq.build_recipe_dict(SETTINGS, "mrpc", 1, "qat_kd_dense_teacher")
    assert recipe_from_dict(teacher, "test").train.qat.teacher == "dense"
    assert teacher["train"]["distillation"] == bq.DISTILL and teacher["train"]["qat"]["distill"] is True
    assert recipe_from_dict(bq.build_recipe_dict(SETTINGS, "mrpc", 1, "qat_kd"), "test").train.qat.teacher == "sparse"
    # each diagnostic cell has its own fingerprint; the control does not depend on calibration settings
    fps = {v: bq.cell_fingerprint(SETTINGS, v, "src") for v in ("qat_kd", "qat_kd_dense_teacher", "fp_finetune")}
    assert len(set(fps.values())) == 3
    assert fps["fp_finetune"] == bq.cell_fingerprint({**SETTINGS, "calib_batches": 4}, "fp_finetune", "src")
    assert fps["fp_finetune"] != bq.cell_fingerprint({**SETTINGS, "qat_lr": 2e-5}, "fp_finetune", "src")


def test_report_lists_only_targets_of_planned_variants():
    variants = bq.parse_variants(["fp_finetune"])
    records = {f"rte/{v}/seed0": _rec("rte", v, 0, 50.0 + i) for i, v in enumerate(variants)}
    report = bq.build_report(records=records, plan=bq.plan_cells(["rte"], variants, [0]), tasks=["rte"], seeds=[0],
                             variants=variants, settings={**SETTINGS, "sparsity_work_dir": "runs/x"}, waiting={},
                             failed={}, stopped=None,
                             env={"versions": {}, "machine": {"line": "test"}}, command="test")
    assert [t["target"] for t in report["targets"]] == ["zero mask violations after QAT, every run (ours)"]
    assert report["average"]["fp_finetune"] == 52.0 and report["complete"] is True
    assert "fp_finetune" in bq.render_markdown(report)


def test_fingerprint_ignores_threads_but_not_settings_or_source():
    fp = bq.cell_fingerprint(SETTINGS, "qat_kd", "src1")
    assert fp == bq.cell_fingerprint({**SETTINGS, "threads": 2}, "qat_kd", "src1")
    assert fp != bq.cell_fingerprint({**SETTINGS, "qat_lr": 2e-5}, "qat_kd", "src1")
    assert fp != bq.cell_fingerprint(SETTINGS, "qat_kd", "src2")
    assert fp != bq.cell_fingerprint(SETTINGS, "qat_kd_no_soft", "src1")
    # the dense/sparse reference cells do not depend on the QAT settings
    assert bq.cell_fingerprint(SETTINGS, "dense", "d") == bq.cell_fingerprint({**SETTINGS, "qat_lr": 1.0}, "dense", "d")


# -- aggregation ----------------------------------------------------------------------------------------------
def test_average_keys_always_present_and_complete_only():
    variants = list(bq.VARIANTS)
    records = {f"{t}/{v}/seed{s}": _rec(t, v, s, 50.0 + s) for t in ("rte", "mrpc") for v in ("dense", "sparse_fp", "qat_kd")
               for s in (0, 1)}
    records.pop("mrpc/qat_kd/seed1")
    agg = bq.aggregate(records, ["rte", "mrpc"], [0, 1], variants)
    for key in ("dense", "sparse_fp", "ptq", "qat_no_kd", "qat_kd", "qat_kd_no_feature", "qat_kd_no_soft", "modelopt"):
        assert key in agg["average"]
    assert agg["average"]["dense"] == pytest.approx(50.5)
    assert agg["average"]["qat_kd"] is None  # mrpc seed 1 missing
    assert agg["average_detail"]["qat_kd"]["tasks"] == {"rte": pytest.approx(50.5)}
    assert "mrpc/qat_kd/seed1" in agg["missing"]
    assert agg["per_task"]["rte"]["dense"]["std"] == pytest.approx(0.7071, abs=1e-4)


def test_targets_pass_miss_incomplete_and_mask_target():
    tasks, seeds = ["rte"], [0]
    scores = {"dense": 60.0, "sparse_fp": 59.0, "qat_kd": 58.7, "qat_no_kd": 58.0, "modelopt": 50.0}
    records = {f"rte/{v}/seed0": _rec("rte", v, 0, s, mask_violations=0 if v.startswith("qat") else None)
               for v, s in scores.items()}
    agg = bq.aggregate(records, tasks, seeds, list(bq.VARIANTS))
    res = {t["target"]: t for t in bq.targets_check(agg, records)}
    assert res["QAT + KD within 0.5 of sparse FP"]["result"] == "PASS"
    assert res["QAT + KD within 1.5 of dense"]["result"] == "PASS"
    assert res["QAT + KD beats QAT without KD"]["result"] == "PASS"
    assert res["QAT + KD beats the ModelOpt peer"]["result"] == "PASS"
    assert res["QAT + KD (static scales) no worse than ORT quantize_dynamic"]["result"] == "INCOMPLETE"
    mask = res["zero mask violations after QAT, every run (ours)"]
    assert mask["result"] == "PASS" and mask["runs_checked"] == 2
    records["rte/qat_kd/seed0"]["score"] = 58.0  # ties QAT without KD: "beats" needs a strictly higher score
    agg = bq.aggregate(records, tasks, seeds, list(bq.VARIANTS))
    res = {t["target"]: t for t in bq.targets_check(agg, records)}
    assert res["QAT + KD beats QAT without KD"]["result"] == "MISS"
    assert res["QAT + KD within 0.5 of sparse FP"]["result"] == "MISS"


def test_partial_target_uses_complete_tasks_only():
    per_task = {"rte": {"a": {"complete": True, "mean": 3.0}, "b": {"complete": True, "mean": 1.0}},
                "mrpc": {"a": {"complete": False, "mean": 0.0}, "b": {"complete": True, "mean": 9.0}}}
    diff, tasks = bq.paired_average(per_task, "a", "b")
    assert diff == pytest.approx(2.0) and tasks == ["rte"]


# -- resumability -------------------------------------------------------------------------------------------
def test_cell_status_done_mismatch_missing(tmp_path):
    cell = bq.Cell("rte", "qat_kd", 0)
    assert bq.cell_status(tmp_path, cell, "fp") == "missing"
    atomic_write_json(tmp_path / cell.filename, {"score": 55.0, "fingerprint": "fp"})
    assert bq.cell_status(tmp_path, cell, "fp") == "done"
    assert bq.cell_status(tmp_path, cell, "other") == "mismatch"
    (tmp_path / cell.filename).write_text("{broken")
    assert bq.cell_status(tmp_path, cell, "fp") == "missing"


def test_rerun_skips_finished_cells_and_waits_for_missing_sparse_model(tmp_path, monkeypatch):
    """main(): finished cells are not rerun, cells without a sparse model are reported as waiting."""
    swd = tmp_path / "sparsity"
    (swd / "rte" / "seed0" / "dense_run" / "dense").mkdir(parents=True)
    atomic_write_json(swd / "rte" / "seed0" / "dense_run" / "dense" / "manifest.json", {"metrics": {"accuracy": 0.6}})
    out = tmp_path / "out"
    calls = []
    monkeypatch.setattr(bq, "run_ptq", lambda *a, **k: calls.append("ptq") or {"metrics": {"accuracy": 0.5}})
    argv = ["--tasks", "rte", "--seeds", "0", "--variants", "ptq", "--sparsity-work-dir", str(swd),
            "--out", str(out), "--work-dir", str(tmp_path / "w")]
    assert bq.main(argv) == 0
    report = bq.read_json(tmp_path / "out.json")
    assert report["per_task"]["rte"]["dense"]["scores"]["0"] == pytest.approx(60.0)
    assert set(report["waiting_on_bench_sparsity"]) == {"rte/sparse_fp/seed0", "rte/ptq/seed0"}
    assert calls == []
    assert "waiting on bench_sparsity" in (tmp_path / "out.md").read_text()
    # the sparse model appears: only the new cells run, the dense cell is skipped
    sparse = swd / "rte" / "seed0" / "magnitude_2of4" / "sparse"
    sparse.mkdir(parents=True)
    atomic_write_json(sparse / "manifest.json", {"metrics": {"accuracy": 0.58}, "mask_check": {"ok": True}})
    (sparse / "masks.safetensors").write_bytes(b"")
    dense_file = tmp_path / "out_cells" / "rte__dense__seed0.json"
    mtime = dense_file.stat().st_mtime_ns
    assert bq.main(argv) == 0
    assert calls == ["ptq"] and dense_file.stat().st_mtime_ns == mtime
    report = bq.read_json(tmp_path / "out.json")
    assert report["per_task"]["rte"]["ptq"]["scores"]["0"] == pytest.approx(50.0)
    assert report["average"]["sparse_fp"] == pytest.approx(58.0)
    assert bq.main(argv) == 0 and calls == ["ptq"]  # third sitting: nothing to do


def test_bad_input_messages(tmp_path, capsys):
    assert bq.main(["--tasks", "nosuchtask", "--sparsity-work-dir", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err
    assert bq.main(["--tasks", "rte", "--sparsity-work-dir", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- quantizer groups ---------------------------------------------------------------------------------------
def test_layer_type_and_sensitivity_configs():
    targets = [f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")]
    assert [bq.layer_type(t) for t in targets[:6]] == list(bq.LAYER_TYPES)
    assert bq.layer_type("bert.pooler.dense") is None and bq.layer_index(targets[7]) == 1
    heads = ["bert.pooler.dense", "classifier"]
    cfgs = {c["name"]: c for c in bq.sensitivity_configs(targets, heads)}
    assert set(cfgs["ffn2 inputs FP"]["fp_inputs"]) == {targets[5], targets[11], *heads}
    assert cfgs["all + pooler/classifier quantized"]["fp_inputs"] == []
    only = cfgs["only layer 1 inputs quantized"]["fp_inputs"]
    assert set(only) == set(targets[:6]) | set(heads)


def test_modelopt_quantizer_groups():
    assert bq.modelopt_group("bert.encoder.layer.3.output.LayerNorm.input_quantizer") == "FFN LayerNorm inputs (residual sum)"
    assert bq.modelopt_group("bert.encoder.layer.3.attention.output.LayerNorm.input_quantizer") == \
        "attention LayerNorm inputs (residual sum)"
    assert bq.modelopt_group("bert.embeddings.LayerNorm.input_quantizer") == "embeddings LayerNorm input"
    assert bq.modelopt_group("bert.encoder.layer.0.output.dense.input_quantizer") == "ffn2 inputs"
    assert bq.modelopt_group("bert.encoder.layer.0.output.dense.weight_quantizer") == "encoder Linear weights"
    assert bq.modelopt_group("classifier.input_quantizer") == "pooler + classifier (W + A)"
    assert bq.modelopt_group("bert.embeddings.word_embeddings.weight_quantizer") is None
