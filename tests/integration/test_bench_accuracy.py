"""tools/bench_accuracy.py drives only the public CLI: a tiny (task, seed) through exactly the cell commands the
table prints, the ADMM cell adopting the magnitude cell's dense model by hash, then one printed command run again
by hand is up to date, and so is the whole table run again (nothing retrains)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from nxm_deploy.cli.main import main
from nxm_deploy.run.layout import RunLayout
from nxm_deploy.stages import read_ledger
from tiny_models import tool_module

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.random_init={num_hidden_layers: 2, hidden_size: 64, num_attention_heads: 4, intermediate_size: 128}",
        "task.max_seq_length=64", "task.max_train_examples=64", "task.max_eval_examples=32", "train.dense.epochs=1",
        "train.admm.epochs=1", "train.admm.masked_finetune_epochs=0.5", "train.qat.epochs=0.5",
        "train.qat.calibration_batches=2", "validate.latency_shapes=[[1, 64]]", "validate.timed_runs=2",
        "validate.polygraphy_cli_checks=0", "validate.plots=false"]  # checked by the session's tiny run


def _load():
    return tool_module("bench_accuracy")


@pytest.mark.slow
def test_tiny_cells_through_the_printed_commands(tmp_path, glue_dir, monkeypatch):
    bench = _load()
    monkeypatch.chdir(ROOT)  # the cells name recipes/bench_accuracy.yaml relative to the repository
    work, out = tmp_path / "work", tmp_path / "acc"
    readme = tmp_path / "README.md"
    readme.write_text("intro\n" + bench.README_MARKERS[0] + "\nold table\n" + bench.README_MARKERS[1] + "\nrest\n")
    argv = ["--tasks", "rte", "--seeds", "0", "--work-dir", str(work), "--out", str(out), "--glue-dir", str(glue_dir),
            "--readme", str(readme), "--methods", "admm"]
    for item in TINY:
        argv += ["--set", item]
    assert bench.main(argv) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(c["method"], c["finished"]) for c in result["cells"]] == [("dense", True), ("admm", True)]
    methods = ("admm",)
    # one task, one seed: every variant complete, and the best deployed method named
    assert set(result["average"]) == {*bench.variants(methods), "best_int8"}
    best = result["average"]["best_int8"]
    assert best == {"method": "admm", "value": result["average"]["admm_int8"]}
    assert all(0 <= v <= 100 for k, v in result["average"].items() if k != "best_int8")
    dense, admm = (RunLayout(bench.run_dir(work, "rte", 0, m)) for m in ("dense", *methods))
    # every method starts from the dense cell's model: adopted byte for byte
    assert admm.stage_manifest("dense").read_bytes() == dense.stage_manifest("dense").read_bytes()
    assert "recipes/bench_accuracy.yaml" in out.with_suffix(".md").read_text()
    # the last epochs are reported too, and every cell names the machine that ran it
    assert {"dense_last", "admm_last"} <= set(result["per_task"]["rte"])
    assert set(result["average_last_epoch"]) == set(bench.last_epoch_variants(methods))  # complete: averaged
    assert "incomplete" not in out.with_suffix(".md").read_text()
    assert all(c["machine"] for c in result["cells"] if c["method"] != "dense")
    cells = {c["method"]: c for c in result["cells"]}
    assert 0.0 <= cells["admm"]["mask_differing"] < 1.0 and cells["admm"]["kept"]
    # the README block is the table, regenerated from the JSON, with one reproduce command per row
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old table" not in text
    block = text.split(bench.README_MARKERS[0])[1].split(bench.README_MARKERS[1])[0]
    assert f"{result['average']['admm_int8']:.2f}" in block
    # every target with its value and a verdict (one task, one seed: the table is complete)
    drop = best["value"] - result["average"]["dense"]
    assert (f"best deployed method ({best['method']}) within 0.5 of dense: {drop:+.2f}: "
            f"{'met' if drop >= -0.5 else '**missed**'}") in block
    assert "ADMM - magnitude >= -0.2 (deployed INT8): not measured yet" in block  # no magnitude cell here
    commands = {c["method"]: c["command"] for c in result["cells"]}
    assert block.count(commands["dense"]) == 1 and block.count(commands["admm"]) == 2
    # the command the table prints for the ADMM cell, run by hand: every stage up to date
    command = next(c["command"] for c in result["cells"] if c["method"] == "admm")
    ledger = read_ledger(admm.root)
    assert main(["-q", *shlex.split(command)[1:], "--glue-dir", str(glue_dir)]) == 0
    assert read_ledger(admm.root) == ledger
    # the table run again: nothing retrains, the finished dense cell (whose command forces its stage) included
    dense_ledger = read_ledger(dense.root)
    assert bench.main(argv) == 0
    assert read_ledger(dense.root) == dense_ledger and read_ledger(admm.root) == ledger

    # the KD-in-QAT study on the same ADMM cell: a QAT-only override adopts dense and ADMM (nothing retrains
    # before QAT) and its number is the deployed model's; the reference row is the ADMM cell itself
    study_qat_kd = tool_module("study_qat_kd")

    kd_out = tmp_path / "qat_kd"
    kd_argv = ["--tasks", "rte", "--seeds", "0", "--work-dir", str(tmp_path / "kd"), "--table-dir", str(work),
               "--out", str(kd_out), "--glue-dir", str(glue_dir), "--variants", "kd_dense"]
    for item in TINY:
        kd_argv += ["--set", item]
    table_variant = study_qat_kd.reference_variant(sets=TINY)
    assert table_variant not in (None, "kd_dense")  # the table's QAT loss is one of the study's variants
    assert study_qat_kd.main(kd_argv) == 0
    kd_dense = RunLayout(study_qat_kd.variant_dir(tmp_path / "kd", work, "rte", 0, "kd_dense", table_variant))
    assert kd_dense.stage_manifest("admm").read_bytes() == admm.stage_manifest("admm").read_bytes()
    assert json.loads(kd_dense.stage_manifest("qat").read_text())["kd_teacher"] == "dense"
    assert json.loads(admm.stage_manifest("qat").read_text())["kd_teacher"] != "dense"
    kd = json.loads(kd_out.with_suffix(".json").read_text())
    rows = kd["rows"]["rte"]
    assert kd["reference"] == table_variant and rows["kd_dense"]["n"] == 1 and rows[table_variant]["n"] == 1
    assert rows[table_variant]["int8_onnx"] == pytest.approx(result["average"]["admm_int8"])
    assert kd["average"]["kd_dense"] == pytest.approx(rows["kd_dense"]["int8_onnx"])  # one task: its own score
    reference = next(c["command"] for c in kd["cells"] if c["variant"] == table_variant)
    assert reference == command  # the table's ADMM cell, reproduced by the same command


def test_study_reference_is_the_variant_equal_to_the_recipe():
    """The KD study's reference row follows the recipe's QAT loss, and a loss outside the study has none."""
    study_qat_kd = tool_module("study_qat_kd")

    gamma0 = "train.qat.distillation={alpha: 1.0, beta: 10.0, gamma: 0.0, temperature: 2.0}"
    assert study_qat_kd.reference_variant(sets=["train.qat.distill=true", gamma0]) == "kd_logits_only"
    dense = ["train.qat.distill=true", "train.qat.teacher=dense"]
    assert study_qat_kd.reference_variant(sets=[*dense, "train.qat.distillation=null"]) == "kd_dense"
    assert study_qat_kd.reference_variant(sets=["train.qat.distill=false", "train.qat.distillation=null"]) == "no_kd"
    assert study_qat_kd.reference_variant(sets=[*dense, gamma0]) is None


def test_targets_of_protocol_v2_from_a_table():
    """Issue 30's targets from per-task means: the best deployed method against dense, ADMM - magnitude (FP and
    deployed), the data-aware mask's difference, SST-2-8k; undecided while a cell is missing."""
    bench = _load()
    seeds = [0, 1]

    def row(mean):
        return {"mean": mean, "std": 0.0, "n": len(seeds)}

    per_task = {t: {"dense": row(80.0), "magnitude": row(79.0), "admm": row(79.5), "wanda": row(79.8),
                    "magnitude_int8": row(78.0), "admm_int8": row(79.6), "wanda_int8": row(78.5)}
                for t in ("rte", "mrpc", "stsb")}
    per_task["sst2_8k"] = {"magnitude_int8": row(85.0), "admm_int8": {"mean": 85.2, "std": 0.0, "n": 1}}
    cells = [{"task": t, "seed": s, "method": "wanda", "mask_differing": 0.08} for t in per_task for s in seeds]
    result = {"tasks": ["rte", "mrpc", "stsb", "sst2_8k"], "seeds": seeds, "main_tasks": ["rte", "mrpc", "stsb"],
              "per_task": per_task, "cells": cells,
              "average": {"dense": 80.0, "magnitude": 79.0, "admm": 79.5, "wanda": 79.8, "magnitude_int8": 78.0,
                          "admm_int8": 79.6, "wanda_int8": 78.5, "best_int8": {"method": "admm", "value": 79.6}}}
    lines = bench.target_lines(result)
    assert lines[0] == "- best deployed method (admm) within 0.5 of dense: -0.40: met"
    assert lines[1] == "- ADMM - magnitude >= -0.2 (sparse FP): +0.50: met"
    assert lines[2] == "- ADMM - magnitude >= -0.2 (deployed INT8): +1.60: met"
    assert lines[3].startswith("- best data-aware method's mask (wanda) differs") and lines[3].endswith("8.0 %: met")
    assert lines[4] == "- SST-2-8k: ADMM - magnitude deployed >= +0.5: +0.20: not decided until every cell ran"
    result["average"]["best_int8"] = {"method": "admm", "value": 79.0}
    assert bench.target_lines(result)[0] == "- best deployed method (admm) within 0.5 of dense: -1.00: **missed**"


def test_seed0_cells_adopt_the_finished_pilot_cell_of_their_method(tmp_path, monkeypatch):
    """A seed-0 magnitude / ADMM cell names the pilot cell picked for its method as ``--from-run`` once that cell has
    finished (``nxm-deploy`` then adopts only the stages whose keys equal the cell's); every other cell, and a pilot
    cell that has not finished or was not picked, keeps the dense cell as its source."""
    bench = _load()
    work, pilots = tmp_path / "work", tmp_path / "pilots_v2.json"
    dense = work / "rte" / "seed0" / "dense"
    assert bench.pilot_source(work, "rte", 0, "magnitude", pilots) is None  # no pilots report
    pilots.write_text(json.dumps({"p2": {"pick": "qat1ep_lr1.0e-5"}, "p3": {"pick": None}}))
    p2 = work / "rte" / "seed0" / "p2" / "qat1ep_lr1.0e-5"
    assert bench.pilot_source(work, "rte", 0, "magnitude", pilots) is None  # picked, not finished
    RunLayout(p2).validation.parent.mkdir(parents=True)
    RunLayout(p2).validation.write_text("{}")
    assert bench.pilot_source(work, "rte", 0, "magnitude", pilots) == p2
    assert bench.pilot_source(work, "rte", 1, "magnitude", pilots) is None  # pilots ran seed 0 only
    assert bench.pilot_source(work, "sst2_8k", 0, "magnitude", pilots) is None  # and the main tasks only
    assert bench.pilot_source(work, "rte", 0, "wanda", pilots) is None  # no pilot for the data-aware masks
    assert bench.pilot_source(work, "rte", 0, "admm", pilots) is None  # P3 has not picked
    monkeypatch.setattr(bench, "PILOTS_JSON", pilots)
    argv = bench.cell_argv(work, "rte", 0, "magnitude")
    assert argv[argv.index("--from-run") + 1] == str(p2)
    argv = bench.cell_argv(work, "rte", 0, "admm")
    assert argv[argv.index("--from-run") + 1] == str(dense)
    assert "--from-run" not in bench.cell_argv(work, "rte", 0, "dense")
