"""tools/bench_sparsity.py: task scores, mean ± std, averages with missing cells, targets, resumability (no training)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from nxm_deploy.fileio import atomic_write_json

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_sparsity", ROOT / "tools" / "bench_sparsity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_sparsity"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bs = _load()


# -- scores ----------------------------------------------------------------------------------------------------
def test_task_score_primary_metric_times_100():
    assert bs.task_score("rte", {"accuracy": 0.6534}) == (pytest.approx(65.34), None)


def test_task_score_mrpc_is_mean_of_f1_and_accuracy():
    score, note = bs.task_score("MRPC", {"f1": 0.90, "accuracy": 0.80})
    assert score == pytest.approx(85.0) and note is None


def test_task_score_stsb_is_mean_of_pearson_and_spearman():
    score, _ = bs.task_score("STS-B", {"pearson": 0.88, "spearman": 0.86})
    assert score == pytest.approx(87.0)


def test_task_score_nan_correlation_counts_as_zero_and_is_flagged():
    score, note = bs.task_score("stsb", {"pearson": math.nan, "spearman": math.nan})
    assert score == 0.0 and "pearson" in note


def test_mean_std_sample_std_and_small_n():
    assert bs.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert bs.mean_std([5.0]) == {"mean": 5.0, "std": None, "n": 1}
    assert bs.mean_std([]) == {"mean": None, "std": None, "n": 0}
    assert bs.fmt_mean_std({"mean": 2.0, "std": 1.0}) == "2.00 ± 1.00"
    assert bs.fmt_mean_std({"mean": 5.0, "std": None}) == "5.00 (n=1)"


# -- plan ------------------------------------------------------------------------------------------------------
def test_variant_names_and_plan_order():
    assert bs.variant_name("dense", None) == "dense"
    assert bs.variant_name("admm", "2:4") == "admm"
    assert bs.variant_name("magnitude", "1:4") == "magnitude_1:4"
    plan = bs.plan_cells(["rte"], ["dense", "magnitude", "admm"], ["2:4", "1:4"], [0])
    assert [c.key for c in plan] == ["rte/dense/seed0", "rte/magnitude/seed0", "rte/admm/seed0",
                                     "rte/magnitude_1:4/seed0", "rte/admm_1:4/seed0"]
    assert plan[4].filename == "rte__admm__1of4__seed0.json" and plan[0].filename == "rte__dense__seed0.json"
    # dense is always planned: it is the starting point of both sparse methods
    assert [c.variant for c in bs.plan_cells(["rte"], ["admm"], ["2:4"], [0, 1])] == ["dense", "admm"] * 2


# -- aggregation -----------------------------------------------------------------------------------------------
TASKS, SEEDS = ["rte", "stsb"], [0, 1]
VARIANTS = ["dense", "magnitude", "admm", "magnitude_1:4", "admm_1:4"]
BASE_SCORE = {"dense": 70.0, "magnitude": 66.0, "admm": 69.0, "magnitude_1:4": 60.0, "admm_1:4": 62.0}


def _records(drop=()):
    recs = {}
    for t_i, task in enumerate(TASKS):
        for variant in VARIANTS:
            for seed in SEEDS:
                key = f"{task}/{variant}/seed{seed}"
                if key not in drop:
                    recs[key] = {"score": BASE_SCORE[variant] + 10 * t_i + seed, "minutes": 1.0 + seed,
                                 "relative_residual_last": 0.01 if variant.startswith("admm") else None}
    return recs


def test_aggregate_complete_table():
    agg = bs.aggregate(_records(), TASKS, SEEDS, VARIANTS)
    row = agg["per_task"]["stsb"]["admm"]
    assert row["scores"] == {"0": 79.0, "1": 80.0} and row["mean"] == 79.5
    assert row["std"] == pytest.approx(math.sqrt(0.5)) and row["complete"] and row["minutes_mean"] == 1.5
    assert row["relative_residual_last"] == {"0": 0.01, "1": 0.01}
    # average over tasks of the per-task seed means: ((69.5) + (79.5)) / 2
    assert agg["average"]["admm"] == pytest.approx(74.5)
    assert agg["average"]["dense"] == pytest.approx(75.5)
    assert agg["missing"] == []


def test_aggregate_missing_cell_gives_null_average_and_lists_it():
    agg = bs.aggregate(_records(drop={"stsb/admm_1:4/seed1"}), TASKS, SEEDS, VARIANTS)
    assert agg["average"]["admm_1:4"] is None
    detail = agg["average_detail"]["admm_1:4"]
    assert detail["missing"] == ["stsb/admm_1:4/seed1"]
    assert detail["partial_tasks"] == ["rte"] and detail["partial_mean"] == pytest.approx(62.5)
    assert agg["per_task"]["stsb"]["admm_1:4"]["scores"]["1"] is None
    assert agg["per_task"]["stsb"]["admm_1:4"]["mean"] == 72.0  # seed 0 only, not complete
    assert not agg["per_task"]["stsb"]["admm_1:4"]["complete"]
    assert agg["missing"] == ["stsb/admm_1:4/seed1"]
    assert agg["average"]["admm"] is not None  # other variants unaffected


def test_aggregate_standard_variants_always_present():
    agg = bs.aggregate(_records(), TASKS, SEEDS, ["dense", "magnitude", "admm"])
    assert set(bs.STANDARD_VARIANTS) <= set(agg["average"])
    assert agg["average"]["admm_1:4"] is None and agg["average_detail"]["admm_1:4"]["note"]


def test_targets_pass_miss_incomplete():
    avg = {"dense": 70.0, "magnitude": 68.0, "admm": 69.6, "magnitude_1:4": 60.0, "admm_1:4": 61.0}
    res = {t["target"]: t["result"] for t in bs.targets_check(avg)}
    assert list(res.values()) == ["PASS", "PASS", "MISS"]  # +1.6 >= 0.5; -0.4 >= -0.5; +1.0 < 1.5
    avg.update({"admm": 69.4, "admm_1:4": None})
    assert [t["result"] for t in bs.targets_check(avg)] == ["PASS", "MISS", "INCOMPLETE"]


# -- resumability ----------------------------------------------------------------------------------------------
def _plan_and_fps():
    plan = bs.plan_cells(["rte"], ["dense", "magnitude", "admm"], ["2:4"], [0, 1])
    return plan, {c.key: f"fp-{c.key}" for c in plan}


def test_finished_cell_files_are_skipped(tmp_path):
    plan, fps = _plan_and_fps()
    done = plan[0], plan[2]
    for cell in done:
        atomic_write_json(tmp_path / cell.filename, {"score": 50.0, "fingerprint": fps[cell.key]})
    todo, mismatched = bs.cells_to_run(tmp_path, plan, fps)
    assert [c.key for c in todo] == [c.key for c in plan if c not in done] and mismatched == []
    assert set(bs.load_records(tmp_path, plan, fps)) == {c.key for c in done}


def test_cell_written_with_other_settings_is_not_counted(tmp_path):
    plan, fps = _plan_and_fps()
    atomic_write_json(tmp_path / plan[1].filename, {"score": 50.0, "fingerprint": "other settings"})
    (tmp_path / plan[2].filename).write_text("{not json")  # unreadable: treated as not finished
    assert bs.cell_status(tmp_path, plan[1], fps[plan[1].key]) == "mismatch"
    assert bs.cell_status(tmp_path, plan[2], fps[plan[2].key]) == "missing"
    todo, mismatched = bs.cells_to_run(tmp_path, plan, fps)
    assert [c.key for c in mismatched] == [plan[1].key] and plan[1] not in todo and plan[2] in todo
    todo, _ = bs.cells_to_run(tmp_path, plan, fps, redo_mismatched=True)
    assert plan[1] in todo and len(todo) == len(plan)
    assert bs.load_records(tmp_path, plan, fps) == {}


def test_fingerprints_track_the_settings_that_matter():
    settings = {"model": "minilm", "bf16": True, "kd": True}
    dense = bs.build_recipe_dict(bs.BASE_RECIPE, settings, "rte", 0)
    admm = bs.build_recipe_dict(bs.BASE_RECIPE, settings, "rte", 0, "admm", "1:4")
    assert admm["train"]["admm"]["method"] == "admm" and admm["sparsity"]["pattern"] == "1:4"
    assert dense["train"]["seed"] == 0 and dense["task"]["name"] == "rte"
    other_rho = {**settings, "rho": 1e-2}
    # rho changes sparse cells only; threads change nothing; seed / epochs change the dense cell
    assert bs.fingerprint(bs.build_recipe_dict(bs.BASE_RECIPE, other_rho, "rte", 0), dense=True) == bs.fingerprint(dense, dense=True)
    assert bs.fingerprint(bs.build_recipe_dict(bs.BASE_RECIPE, other_rho, "rte", 0, "admm", "1:4"), dense=False) != bs.fingerprint(admm, dense=False)
    assert bs.fingerprint(bs.build_recipe_dict(bs.BASE_RECIPE, {**settings, "threads": 1}, "rte", 0), dense=True) == bs.fingerprint(dense, dense=True)
    assert bs.fingerprint(bs.build_recipe_dict(bs.BASE_RECIPE, settings, "rte", 1), dense=True) != bs.fingerprint(dense, dense=True)
    assert bs.fingerprint(bs.build_recipe_dict(bs.BASE_RECIPE, {**settings, "epochs_dense": 1}, "rte", 0), dense=True) != bs.fingerprint(dense, dense=True)
    mag = bs.build_recipe_dict(bs.BASE_RECIPE, settings, "rte", 0, "magnitude", "1:4")
    assert bs.fingerprint(mag, dense=False) != bs.fingerprint(admm, dense=False)


def test_report_renders_missing_cells_and_incomplete_targets():
    records = _records(drop={"rte/admm/seed1"})
    plan = bs.plan_cells(TASKS, ["dense", "magnitude", "admm"], ["2:4", "1:4"], SEEDS)
    env = {"versions": {"torch": "x", "transformers": "y", "python": "z"}, "machine": {"line": "test machine"}}
    report = bs.build_report(records=records, plan=plan, tasks=TASKS, seeds=SEEDS, variants=VARIANTS,
                             settings={"bf16": True, "kd": True}, base_source="built-in", step_cost=None,
                             mismatched=[], stopped=None, command="cmd", env=env)
    assert report["average"]["admm"] is None and report["missing"] == ["rte/admm/seed1"]
    assert [t["result"] for t in report["targets"]][:2] == ["INCOMPLETE", "INCOMPLETE"]
    md = bs.render_markdown(report)
    assert "- rte/admm/seed1" in md and "INCOMPLETE" in md and "test machine" in md and "missing" in md


def test_out_paths():
    assert bs.out_paths("benchmarks/sparsity_glue") == (Path("benchmarks/sparsity_glue.json"),
                                                         Path("benchmarks/sparsity_glue.md"),
                                                         Path("benchmarks/sparsity_glue_cells"))
    assert bs.out_paths("/tmp/x/out.json")[2] == Path("/tmp/x/out_cells")


def test_planned_steps_follow_the_train_loop_budget():
    settings = {"epochs_dense": 0.25, "epochs_sparse": 0.25, "masked_finetune_epochs": 0}
    cells = {c.method: c for c in bs.plan_cells(["rte"], ["dense", "magnitude", "admm"], ["2:4"], [0])}
    steps = {m: bs.planned_steps(c, bs.build_recipe_dict(bs.BASE_RECIPE, settings, "rte", 0,
                                                         None if m == "dense" else m, c.pattern), 64)
             for m, c in cells.items()}
    assert steps == {"dense": 1, "magnitude": 1, "admm": 1}
    full = bs.build_recipe_dict(bs.BASE_RECIPE, {}, "rte", 0, "admm", "2:4")  # 3 ADMM + 1 masked epochs
    assert bs.planned_steps(cells["admm"], full, 2490) == 3 * 78 + 78
    assert bs.planned_steps(cells["magnitude"], full, 2490) == 4 * 78


def test_admm_only_settings_leave_magnitude_cells_valid_but_not_admm_cells():
    base = {"penalty_mode": None}
    mag_a = bs.build_recipe_dict(bs.BASE_RECIPE, base, "mrpc", 0, "magnitude", "2:4")
    mag_b = bs.build_recipe_dict(bs.BASE_RECIPE, {"penalty_mode": "proximal", "rho": 200.0, "update_interval": 20},
                                 "mrpc", 0, "magnitude", "2:4")
    assert bs.fingerprint(mag_a, dense=False) == bs.fingerprint(mag_b, dense=False)
    adm_a = bs.build_recipe_dict(bs.BASE_RECIPE, base, "mrpc", 0, "admm", "2:4")
    adm_b = bs.build_recipe_dict(bs.BASE_RECIPE, {"penalty_mode": "gradient"}, "mrpc", 0, "admm", "2:4")
    assert adm_b["train"]["admm"]["penalty_mode"] == "gradient"
    assert bs.fingerprint(adm_a, dense=False) != bs.fingerprint(adm_b, dense=False)
    lr = bs.build_recipe_dict(bs.BASE_RECIPE, {"lr": 3e-4}, "mrpc", 0, "magnitude", "2:4")  # shared fields still count
    assert bs.fingerprint(lr, dense=False) != bs.fingerprint(mag_a, dense=False)
