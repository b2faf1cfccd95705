"""End to end: ``nxm-deploy run recipes/tiny_smoke.yaml`` once per module on real GLUE RTE, then every artifact.

The run (2-layer random BERT, 256 RTE examples) takes about half a minute to a minute on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from nxm_deploy.cli.main import main
from tiny_models import plant_third_nonzero

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = REPO_ROOT / "recipes" / "tiny_smoke.yaml"
SPARSE_ONNX = "sparse_int8_qdq.onnx"
DENSE_ONNX = "dense_fp32.onnx"
N_TARGETS = 12  # 2 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense)
TAMPERED_MODULE = "bert.encoder.layer.1.intermediate.dense"
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture
def smoke(tiny_run) -> tuple[int, Path]:
    """``(exit code, run dir)`` of the session's tiny run (``tests/conftest.py``)."""
    return tiny_run


@pytest.fixture
def run_dir(smoke) -> Path:
    rc, path = smoke
    assert rc == 0, f"`nxm-deploy run {RECIPE.name}` exited {rc}"
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------- the run
def test_run_writes_reports_and_verifies_every_target(run_dir) -> None:
    assert (run_dir / "report.md").is_file()
    report = read_json(run_dir / "report.json")
    check = report["sparsity_check"]
    assert check["ok"] is True
    assert check["sparse_layers"] == check["expected_sparse"] == N_TARGETS
    assert all(report["stages_done"].values()), report["stages_done"]
    assert "OK" in (run_dir / "report.md").read_text()


def test_training_manifests_say_where_they_ran(run_dir) -> None:
    """Same-seed CPU runs at another thread count can score differently (reduction order), so every training
    stage's manifest records the thread count it ran with, beside device and world size."""
    import torch

    for stage in ("dense", "sparse", "qat"):
        manifest = read_json(run_dir / stage / "manifest.json")
        assert manifest["cpu_threads"] == torch.get_num_threads(), stage
        assert manifest["device"] == "cpu" and manifest["world_size"] == 1, stage


def test_onnx_files_and_qdq_counts(run_dir) -> None:
    onnx_dir = run_dir / "onnx"
    for name in (DENSE_ONNX, SPARSE_ONNX, "manifest.json", "sparsity_report.json"):
        assert (onnx_dir / name).is_file(), name
    manifest = read_json(onnx_dir / "manifest.json")
    qdq = manifest["qdq"]
    assert qdq["per_channel_weight_quantizers"] == N_TARGETS
    # weights are INT8 initializers read by a DequantizeLinear (no QuantizeLinear); activations keep their pairs
    assert qdq["int8_weight_initializers"] == N_TARGETS == manifest["int8_weights"]["converted"]
    assert qdq["quantize_linear"] > 0
    assert qdq["dequantize_linear"] == qdq["quantize_linear"] + N_TARGETS
    assert len(manifest["sparse_modules"]) == N_TARGETS
    assert sorted(manifest["layer_map"].values()) == sorted(manifest["sparse_modules"])
    assert manifest["sparse_int8"]["file"] == SPARSE_ONNX


def test_engine_status_is_recorded(run_dir) -> None:
    records = read_json(run_dir / "engines" / "status.json")["engines"]
    assert [r["name"] for r in records] == ["tiny_smoke_2of4_int8"]
    if not HAS_TENSORRT:
        for record in records:
            assert record["status"].startswith("skipped: "), record
            assert "tensorrt" in record["status"].lower(), record
    else:  # TensorRT installed: built, or skipped with a reason (no GPU)
        for record in records:
            assert record["status"] == "built" or record["status"].startswith("skipped: "), record
    assert read_json(run_dir / "report.json")["engines"] == records


def test_validation_latency_covers_every_shape(run_dir, tiny_recipe_dict) -> None:
    validation = read_json(run_dir / "validation.json")
    shapes = [(row["batch_size"], row["sequence_length"]) for row in validation["latency"]]
    assert shapes == [tuple(s) for s in tiny_recipe_dict["validate"]["latency_shapes"]]
    for row in validation["latency"]:
        for model in ("dense_fp32", "sparse_int8"):
            assert row[model]["p50_ms"] > 0, (row, model)
    assert {"dense_fp32", "sparse_int8"} <= set(validation["metrics"])


def test_ort_peers_are_built_scored_timed_and_never_gated(run_dir) -> None:
    """ONNX Runtime's own CPU path for the dense model (optimizer, then quantize_dynamic) is exported beside ours,
    hash-recorded, scored on the dev set, timed in the same rounds, and our CPU rows carry a speedup against it."""
    manifest = read_json(run_dir / "onnx" / "manifest.json")
    peers = manifest["ort_peers"]
    opt, dyn = peers["dense_fp32_opt"], peers["dense_int8_dynamic"]
    assert opt["fused"].get("Attention") == 2 and opt["fused"].get("SkipLayerNormalization") == 4, opt["fused"]
    assert opt["optimizer"] == {"model_type": "bert", "num_heads": 4, "hidden_size": 64}
    assert opt["parity_vs_dense"]["max_abs_diff"] < 1e-4  # the optimizer fuses; it must not change the model
    assert dyn["quantize_dynamic"]["per_channel"] is True
    for record in (opt, dyn):
        assert manifest["files"][record["file"]] == record["sha256"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(run_dir / "onnx" / dyn["file"])).graph.node}
    assert {"QAttention", "DynamicQuantizeLinear"} <= ops, ops  # the fused attention's QKV GEMM in INT8 too

    validation = read_json(run_dir / "validation.json")
    assert {"dense_fp32_opt", "dense_int8_dynamic"} <= set(validation["metrics"])
    assert validation["runners"]["dense_int8_dynamic"]["peer"] is True
    assert all("peer" not in validation["runners"][n] for n in ("dense_fp32", "sparse_int8", "cpu_int8"))
    assert not {"dense_fp32_opt", "dense_int8_dynamic"} & {c["model"] for c in validation["gates"]["accuracy"]["checks"]}
    peer_rows = [c for c in validation["diff"]["comparisons"] if c["candidate"] in ("dense_fp32_opt", "dense_int8_dynamic")]
    assert len(peer_rows) == 2 and not any(c["gated"] for c in peer_rows)
    for row in validation["latency"]:
        cpu = row["cpu_int8"]
        for peer in ("dense_fp32_opt", "dense_int8_dynamic"):
            assert cpu[f"speedup_vs_{peer}"] == pytest.approx(row[peer]["p50_ms"] / cpu["p50_ms"], rel=1e-9)
    report = (run_dir / "report.md").read_text()
    assert "vs optimized FP32" in report and "peer: dense INT8 ONNX, ORT optimizer + quantize_dynamic" in report


def test_qat_model_keeps_exact_zeros(run_dir) -> None:
    import torch

    from nxm_deploy.run.reader import load_masks, load_qat_model

    model, _, info = load_qat_model(run_dir)
    masks = load_masks(run_dir)
    assert len(masks) == N_TARGETS
    assert sorted(name.rpartition(".")[0] for name in masks) == sorted(info["quantized_modules"])
    for fqn, mask in masks.items():
        assert fqn.endswith(".weight"), fqn
        module = model.get_submodule(fqn.rpartition(".")[0])
        weight = module.weight.detach()
        assert mask.dtype == torch.bool and mask.shape == weight.shape, fqn
        assert torch.count_nonzero(weight[~mask]) == 0, f"{fqn}: pruned weights are not exactly 0"
        codes = module.weight_quantizer.int8_codes(weight)
        assert torch.count_nonzero(codes[~mask]) == 0, f"{fqn}: INT8 codes of pruned weights are not 0"
        # 2:4 along the input (reduction) axis: weight [out, in] -> groups of 4 consecutive inputs
        out_features, in_features = weight.shape
        per_group = (weight != 0).reshape(out_features, in_features // 4, 4).sum(-1)
        assert int(per_group.max()) <= 2, f"{fqn}: a group of 4 holds {int(per_group.max())} nonzeros"
        assert int((mask.reshape(out_features, in_features // 4, 4).sum(-1)).max()) <= 2, fqn


def test_qat_kd_teacher_dense_or_sparse(run_dir, glue_dir, tiny_recipe_dict, tmp_path) -> None:
    """``train.qat.teacher``: the KD target changes (the same student, data and seed train to other weights with
    the other teacher); masks stay exact; no dense stage -> RunDirError."""
    from nxm_deploy.config.recipe import recipe_from_dict
    from nxm_deploy.errors import RunDirError
    from nxm_deploy.training.stage import train_qat

    losses = {}
    for teacher in ("sparse", "dense"):
        work = tmp_path / teacher
        for stage in ("dense", "sparse"):
            shutil.copytree(run_dir / stage, work / stage)
        tiny_recipe_dict["train"]["qat"]["teacher"] = teacher
        manifest = train_qat(recipe_from_dict(tiny_recipe_dict, "test"), work, str(glue_dir))
        assert manifest["kd_teacher"] == teacher
        assert manifest["mask_check"]["ok"] is True
        losses[teacher] = manifest["train"]["train_loss"]
    assert losses["dense"] != losses["sparse"], losses
    import torch
    from safetensors.torch import load_file

    weights = {t: load_file(str(tmp_path / t / "qat" / "model.safetensors")) for t in losses}
    assert any(not torch.equal(weights["dense"][k], weights["sparse"][k]) for k in weights["dense"])

    shutil.rmtree(tmp_path / "dense" / "dense")
    shutil.rmtree(tmp_path / "dense" / "qat")
    with pytest.raises(RunDirError, match="Stage 'dense'"):
        train_qat(recipe_from_dict(tiny_recipe_dict, "test"), tmp_path / "dense", str(glue_dir))


def test_same_recipe_reuses_the_run_dir(run_dir) -> None:
    from conftest import TINY_RUN_SETS
    from nxm_deploy.config.recipe import load_recipe
    from nxm_deploy.pipeline import prepare_run_dir

    manifest_before = (run_dir / "onnx" / "manifest.json").read_bytes()
    assert prepare_run_dir(load_recipe(RECIPE, TINY_RUN_SETS), run_dir, overwrite=False) == run_dir
    assert (run_dir / "onnx" / "manifest.json").read_bytes() == manifest_before  # nothing removed


# ----------------------------------------------------------------------------------------------- inspect
def test_inspect_sparsity_table_names_every_target(run_dir, capsys) -> None:
    manifest = read_json(run_dir / "onnx" / "manifest.json")
    rc = main(["-q", "inspect", "sparsity", str(run_dir / "onnx" / SPARSE_ONNX)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for module in manifest["sparse_modules"]:
        assert module in out, module
    assert f"{N_TARGETS} of " in out and "0 failing" in out


def test_inspect_sparsity_json(run_dir, capsys) -> None:
    rc = main(["-q", "inspect", "sparsity", str(run_dir / "onnx" / SPARSE_ONNX), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert report["ok"] is True and report["pattern"] == "2:4"
    sparse_expected = [row for row in report["layers"] if row["status"] == "sparse" and row["expected_sparse"]]
    assert len(sparse_expected) == N_TARGETS
    assert {row["module"] for row in sparse_expected} == set(read_json(run_dir / "onnx" / "manifest.json")["sparse_modules"])


def _tamper(run_dir: Path, out_dir: Path) -> tuple[int, int]:
    """Copy the sparse ONNX + manifest to ``out_dir`` with one 2:4 group of TAMPERED_MODULE given a 3rd nonzero.

    Returns the (row, column) of the first element of that group in the initializer's coordinates.
    """
    import onnx

    manifest = read_json(run_dir / "onnx" / "manifest.json")
    (init_name,) = [name for name, module in manifest["layer_map"].items() if module == TAMPERED_MODULE]
    (row,) = [r for r in read_json(run_dir / "onnx" / "sparsity_report.json")["layers"] if r["initializer"] == init_name]
    axis = row["axis"]
    assert axis in (0, 1) and len(row["shape"]) == 2, row

    proto = onnx.load(str(run_dir / "onnx" / SPARSE_ONNX))
    bad = plant_third_nonzero(proto, init_name, axis)

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out_dir / SPARSE_ONNX))
    shutil.copy(run_dir / "onnx" / "manifest.json", out_dir / "manifest.json")
    return bad


def test_inspect_sparsity_names_a_tampered_layer(run_dir, tmp_path, capsys) -> None:
    bad = _tamper(run_dir, tmp_path / "tampered")
    model = tmp_path / "tampered" / SPARSE_ONNX

    rc = main(["-q", "inspect", "sparsity", str(model)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    assert TAMPERED_MODULE in errors[0] and str(bad) in errors[0], errors[0]

    rc = main(["-q", "inspect", "sparsity", str(model), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert report["ok"] is False and report["failures"] == [TAMPERED_MODULE]
    (row,) = [r for r in report["layers"] if r["module"] == TAMPERED_MODULE]
    assert row["status"] == "dense" and row["groups_violating"] == 1
    assert tuple(row["first_bad"]) == bad
    others = [r for r in report["layers"] if r["expected_sparse"] and r["module"] != TAMPERED_MODULE]
    assert len(others) == N_TARGETS - 1 and all(r["status"] == "sparse" for r in others)


# ----------------------------------------------------------------------------------------------- stages alone
def test_validate_stage_reruns_alone(run_dir, glue_dir, capsys, monkeypatch) -> None:
    monkeypatch.setenv("NXM_GLUE_DIR", str(glue_dir))  # the stored recipe has no glue_dir
    before = (run_dir / "validation.json").stat().st_mtime_ns
    assert main(["-q", "validate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "nxm-deploy report: tiny_smoke" in out
    assert (run_dir / "validation.json").stat().st_mtime_ns >= before
    assert read_json(run_dir / "report.json")["sparsity_check"]["ok"] is True


def test_build_engine_reruns_alone(run_dir, capsys, monkeypatch) -> None:
    from nxm_deploy.engine.trt import tensorrt_unavailable_reason

    monkeypatch.chdir(REPO_ROOT)  # the recipe's engine spec path is relative to the repository root
    rc = main(["-q", "build-engine", str(run_dir)])
    out, err = capsys.readouterr()
    if tensorrt_unavailable_reason() is not None:
        assert rc == 3 and err.count("\n") == 1 and "nxm-deploy[trt]" in err
    else:
        assert rc in (0, 5) and "tiny_smoke_2of4_int8" in out  # 5: a post-build check failed (reported)

# ----------------------------------------------------------------------------------------------- the stage chain
def test_second_run_is_up_to_date_and_a_qat_change_reruns_qat_onwards(run_dir, glue_dir, caplog, tmp_path) -> None:
    """``nxm-deploy run`` again skips every stage (the ledger's keys hold); a changed QAT setting reruns qat,
    export, engines and validate, and keeps dense and admm (nxm_deploy.stages). On a copy of the session's run."""
    import shutil

    from conftest import TINY_RUN_SETS
    from nxm_deploy.stages import STAGES, read_ledger

    run_dir = shutil.copytree(run_dir, tmp_path / "tiny_smoke")
    first = read_ledger(run_dir)
    assert list(first) == [s.name for s in STAGES]
    argv = ["-q", "run", str(RECIPE), "--glue-dir", str(glue_dir), "--run-dir", str(run_dir),
            *(arg for item in TINY_RUN_SETS for arg in ("--set", item))]
    with pytest.MonkeyPatch.context() as mp, caplog.at_level("INFO", logger="nxm_deploy.stages"):
        mp.chdir(REPO_ROOT)
        assert main(argv) == 0
        assert read_ledger(run_dir) == first  # nothing ran again
        assert sum("up to date" in r.getMessage() for r in caplog.records) == len(STAGES)
        assert main([*argv, "--set", "train.qat.learning_rate=2.0e-5"]) == 0
    after = read_ledger(run_dir)
    kept = {name for name in first if after[name] == first[name]}
    assert kept == {"dense", "admm"}, kept
    assert all(after[name]["key"] != first[name]["key"] for name in ("qat", "export", "engines", "validate"))
    assert "learning_rate: 2.0e-05" in (run_dir / "recipe.yaml").read_text()


def test_bench_ort_times_our_artifact_against_the_peers(run_dir, glue_dir, tmp_path) -> None:
    """``tools/bench_ort.py`` on an exported run: the export stage's files (peers included), interleaved timings,
    one goal entry per target with value, target and met, and an operator profile where a goal is missed."""
    spec = importlib.util.spec_from_file_location("bench_ort", REPO_ROOT / "tools" / "bench_ort.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--run-dir", str(run_dir), "--glue-dir", str(glue_dir), "--runs", "3", "--warmup", "1",
                       "--batches", "1,32", "--seq", "32", "--out-dir", str(tmp_path)]) == 0
    result = read_json(tmp_path / "ort_cpu.json")
    (run,) = result["runs"]
    assert run["shape"] == "2x64" and set(run["models"]) == set(bench.MODELS)
    for key, batch, ref, target in bench.GOALS:
        ratio = run["latency"][f"b{batch}"][ref]["p50_ms"] / run["latency"][f"b{batch}"]["cpu_int8"]["p50_ms"]
        assert run["ratios"][key] == pytest.approx(ratio, abs=1e-4)
        goal = result["goals"][key]
        assert goal["target"] == target and goal["value"] is None and goal["met"] is False  # no BERT-base run here
        assert goal["other_shapes"]["2x64"] == run["ratios"][key]
        if ratio < target:
            assert "cpu_int8" in run["profiles"][f"b{batch}"]
    assert run["cpu_int8_vs_sparse_int8"]["argmax_agreement"] == 1.0
    assert "goal cpu_int8_vs_dense_fp32_opt_b32: not measured" in (tmp_path / "ort_cpu.md").read_text()
