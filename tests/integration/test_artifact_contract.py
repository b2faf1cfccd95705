"""Deployable artifacts carry their own contract: a copied ONNX is verified like one in its run directory, and
every consumer refuses a file that differs from the sha256 its producer recorded.

One tiny smoke run (every stage, real RTE data); each test works on a copy of it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from nxm_deploy.cli.main import main
from nxm_deploy.run.layout import DENSE_ONNX, SPARSE_ONNX
from nxm_deploy.export.verify import read_sparsity_metadata, write_sparsity_metadata
from nxm_deploy.stages import read_ledger
from tiny_models import build_tiny_qdq, plant_third_nonzero

pytestmark = pytest.mark.slow
MODULE = "bert.encoder.layer.1.intermediate.dense"


@pytest.fixture
def run(tiny_run) -> Path:
    """The session's tiny run (``tests/conftest.py``); the tests that change a run work on :func:`run_copy`."""
    rc, path = tiny_run
    assert rc == 0
    return path


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _errors(capsys) -> tuple[str, list[str]]:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.out, [line for line in captured.err.splitlines() if line.startswith("error:")]


def _copy_alone(src: Path, dst_dir: Path, *, strip_metadata: bool = False, flip: tuple[str, int] | None = None):
    """``src`` copied to ``dst_dir`` without any manifest; optionally one pruned weight made nonzero."""
    proto = onnx.load(str(src))
    bad = plant_third_nonzero(proto, *flip) if flip else None
    if strip_metadata:
        del proto.metadata_props[:]
    dst_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(dst_dir / src.name))
    return dst_dir / src.name, bad


def _initializer_of(onnx_dir: Path, module: str) -> tuple[str, int]:
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    (name,) = [n for n, m in manifest["layer_map"].items() if m == module]
    (row,) = [r for r in json.loads((onnx_dir / "sparsity_report.json").read_text())["layers"] if r["initializer"] == name]
    return name, row["axis"]


# ----------------------------------------------------------------------------------------------- the contract inside
def test_exported_files_carry_the_sparsity_contract(run):
    manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    contract = read_sparsity_metadata(run / "onnx" / SPARSE_ONNX)
    assert contract["pattern"] == "2:4" and contract["producer"].startswith("nxm-deploy")
    assert contract["layer_map"] == manifest["layer_map"] and contract["expected"] == sorted(manifest["sparse_modules"])
    cpu = read_sparsity_metadata(run / "onnx" / manifest["cpu_int8"]["file"])
    assert sorted(cpu["layer_map"].values()) == sorted(manifest["sparse_modules"])


@pytest.mark.parametrize("form", ["int8_initializers", "fp32_initializers"])
@pytest.mark.parametrize("manifest", ["with_manifest", "contract_in_file", "nothing"])
def test_copied_onnx_with_one_flipped_weight_exits_1_naming_layer_and_group(run, tmp_path, capsys, form, manifest):
    if form == "int8_initializers":
        src_dir = run / "onnx"
        init, axis = _initializer_of(src_dir, MODULE)
        src, module = src_dir / SPARSE_ONNX, MODULE
    else:  # the earlier form: float weights behind QuantizeLinear (a tiny 2:4 + INT8 BERT exported in the test)
        src_dir = tmp_path / "fp32"
        model, targets = build_tiny_qdq(src_dir / "model.onnx")
        proto = onnx.load(str(src_dir / "model.onnx"))
        from nxm_deploy.export.onnx import layer_map_for

        layer_map = layer_map_for(proto, model, targets)
        write_sparsity_metadata(proto, "2:4", layer_map, targets, "test")
        onnx.save(proto, str(src_dir / "model.onnx"))
        module = targets[0]
        (init,) = [n for n, m in layer_map.items() if m == module]
        axis = 1
        (src_dir / "manifest.json").write_text(json.dumps({"layer_map": layer_map, "sparse_modules": targets,
                                                           "pattern": "2:4", "sparse_int8": {"file": "model.onnx"}}))
        src = src_dir / "model.onnx"
        assert onnx.numpy_helper.to_array([t for t in proto.graph.initializer if t.name == init][0]).dtype.kind == "f"
    out_dir = tmp_path / "copied"
    path, bad = _copy_alone(src, out_dir, strip_metadata=manifest == "nothing", flip=(init, axis))
    if manifest == "with_manifest":
        shutil.copy(src.parent / "manifest.json", out_dir / "manifest.json")
    rc = main(["-q", "inspect", "sparsity", str(path)])
    _, errors = _errors(capsys)
    assert rc == 1 and len(errors) == 1, errors
    if manifest == "nothing":  # no contract: the layer is named by its graph node / initializer, status violating
        assert init in errors[0] and "violating" in errors[0] and str(bad) in errors[0], errors[0]
    else:
        assert module in errors[0] and str(bad) in errors[0], errors[0]


def test_intact_copies_pass_and_a_dense_model_stays_dense(run, tmp_path, capsys):
    path, _ = _copy_alone(run / "onnx" / SPARSE_ONNX, tmp_path / "ok")
    assert main(["-q", "inspect", "sparsity", str(path)]) == 0
    _, errors = _errors(capsys)
    assert not errors
    dense, _ = _copy_alone(run / "onnx" / DENSE_ONNX, tmp_path / "dense")
    assert main(["-q", "inspect", "sparsity", str(dense), "--json"]) == 0
    out, errors = _errors(capsys)
    report = json.loads(out)
    assert not errors and report["layers"] and all(r["status"] == "dense" for r in report["layers"])
    assert read_sparsity_metadata(dense) is None


# ----------------------------------------------------------------------------------------------- INT8 as INT8
def test_int8_weights_are_stored_as_int8_and_the_file_shrinks(run):
    manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    store = manifest["int8_weights"]
    assert store["converted"] == len(manifest["sparse_modules"]) == manifest["qdq"]["int8_weight_initializers"]
    assert store["float_weight_bytes_removed"] == 4 * store["int8_weight_bytes"]
    saved = store["exported_bytes_qdq_float_weights"] - store["file_bytes"]
    assert saved >= 0.95 * (store["float_weight_bytes_removed"] - store["int8_weight_bytes"])
    assert store["bytes_vs_int8_weights_plus_embeddings"] <= 1.3  # the goal
    proto = onnx.load(str(run / "onnx" / SPARSE_ONNX))
    inits = {t.name: t for t in proto.graph.initializer}
    for name in manifest["layer_map"]:
        assert inits[name].data_type == onnx.TensorProto.INT8, name
    assert manifest["qdq_lint"]["ok"] and manifest["parity"]["ok"] and manifest["sparsity_check"]["ok"]
    assert "Sparse INT8 ONNX:" in (run / "report.md").read_text()


# ----------------------------------------------------------------------------------------------- hashes
def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target", ["onnx/" + SPARSE_ONNX, "sparse/masks.safetensors", "qat/model.safetensors"])
def test_validate_refuses_a_changed_file(run_copy, capsys, glue_dir, target):
    _flip_byte(run_copy / target)
    rc = main(["-q", "validate", str(run_copy), "--glue-dir", str(glue_dir)])
    _, errors = _errors(capsys)
    assert rc == 2 and len(errors) == 1
    assert Path(target).name in errors[0] and "manifest.json" in errors[0] and "sha256" in errors[0]


@pytest.mark.parametrize("target", ["sparse/masks.safetensors", "qat/model.safetensors", "dense/model.safetensors"])
def test_export_refuses_a_changed_training_artifact(run_copy, capsys, glue_dir, target):
    _flip_byte(run_copy / target)
    rc = main(["-q", "export", str(run_copy), "--glue-dir", str(glue_dir)])
    _, errors = _errors(capsys)
    assert rc == 2 and len(errors) == 1 and Path(target).name in errors[0] and "sha256" in errors[0]


def test_export_checks_the_saved_masks_against_the_weights(run_copy, capsys, glue_dir):
    """Masks replaced by other valid masks (manifest hash updated too): export still refuses them, exit 1."""
    from nxm_deploy.fileio import file_hashes

    masks = load_file(str(run_copy / "sparse" / "masks.safetensors"))
    key = f"{MODULE}.weight"
    masks[key] = torch.roll(masks[key], shifts=1, dims=1)  # still 2:4, but not where the weights are nonzero
    save_file(masks, str(run_copy / "sparse" / "masks.safetensors"))
    manifest_path = run_copy / "sparse" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = file_hashes(run_copy / "sparse")
    manifest_path.write_text(json.dumps(manifest))
    rc = main(["-q", "export", str(run_copy), "--glue-dir", str(glue_dir)])
    _, errors = _errors(capsys)
    assert rc == 1 and len(errors) == 1 and MODULE in errors[0]


def test_engine_build_refuses_a_changed_onnx(run_copy):
    from nxm_deploy.engine.spec import EngineSpec
    from nxm_deploy.engine.stage import prepare_inputs
    from nxm_deploy.errors import RunDirError

    spec = EngineSpec(name="s", onnx=SPARSE_ONNX, precision="int8-qdq", sparse_weights=True,
                      batch_size={"min": 1, "opt": 4, "max": 8})
    prepare_inputs(spec, run_copy)  # intact: accepted
    _flip_byte(run_copy / "onnx" / SPARSE_ONNX)
    with pytest.raises(RunDirError, match="does not match .*manifest.json") as err:
        prepare_inputs(spec, run_copy)
    assert "nxm-deploy export" in err.value.hint



@pytest.mark.parametrize("target", ["onnx/" + SPARSE_ONNX, "qat/tokenizer.json", "dense/config.json"])
def test_client_refuses_a_changed_file(run_copy, target):
    from nxm_deploy.client import TextClassifier
    from nxm_deploy.errors import RunDirError

    with TextClassifier.from_artifacts(run_copy, backend="onnxruntime") as clf:  # intact: accepted
        assert clf.predict(("A man sleeps.", "Someone sleeps."))
    path = run_copy / target
    path.write_bytes(path.read_bytes().replace(b'"', b"'", 1) if path.suffix == ".json" else path.read_bytes()[:-1] + b"x")
    with pytest.raises(RunDirError, match="does not match") as err:
        TextClassifier.from_artifacts(run_copy, backend="onnxruntime")
    assert path.name in str(err.value)


# ------------------------------------------------------------------- quantizer groups, sparse INT8, --from-run


def test_default_export_is_sparse_int8_eligible(run, capsys):
    manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    assert manifest["quantizer_groups"] == {"gemm_outputs": True, "attention": True}
    eligibility = manifest["sparse_int8_eligibility"]
    assert eligibility["nm_layers"] == eligibility["eligible"] == len(manifest["sparse_modules"]) == 12
    assert eligibility["attention_int8"] == eligibility["attention_matmuls"] == 4
    capsys.readouterr()
    assert main(["-q", "inspect", "qdq", str(run / "onnx" / SPARSE_ONNX), "--json"]) == 0
    gemms = json.loads(capsys.readouterr().out)["gemms"]
    assert all(g["eligible"] for g in gemms) and len(gemms) == 16


def test_qat_variant_from_run_adopts_dense_and_sparse(run, tmp_path, tiny_recipe_dict_module, glue_dir, capsys):
    data = json.loads(json.dumps(tiny_recipe_dict_module))
    data["engine"] = {"specs": []}
    recipe = tmp_path / "variant.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    common = ["--glue-dir", str(glue_dir), "--runs-root", str(tmp_path / "runs"), "--stage", "qat", "--from-run", str(run)]
    capsys.readouterr()
    assert main(["-q", "train", str(recipe), "--set", "name=noattn", "--set", "train.qat.quantizers.attention=false",
                 *common]) == 0
    variant = tmp_path / "runs" / "noattn"
    for stage in ("dense", "sparse"):
        assert (variant / stage / "manifest.json").read_bytes() == (run / stage / "manifest.json").read_bytes()
    placement = json.loads((variant / "qat" / "quant.json").read_text())["placement"]
    assert placement["attention"] == [] and len(placement["gemm_outputs"]) == 12
    assert "adopted from" in capsys.readouterr().out

    # a recipe that trains the sparse model differently cannot borrow it
    assert main(["-q", "train", str(recipe), "--set", "name=other", "--set", "train.admm.rho=0.5", *common]) == 2
    _, errors = _errors(capsys)
    assert len(errors) == 1 and "train.admm.rho" in errors[0]
    assert not (tmp_path / "runs" / "other").exists()  # refused before the run directory was created

    # --run-dir names the variant's directory directly
    assert main(["-q", "train", str(recipe), "--set", "name=noattn", "--set", "train.qat.quantizers.attention=false",
                 "--glue-dir", str(glue_dir), "--run-dir", str(tmp_path / "elsewhere"), "--stage", "qat",
                 "--from-run", str(run)]) == 0
    assert (tmp_path / "elsewhere" / "qat" / "manifest.json").is_file()


def test_from_run_replaces_a_stale_stage_by_the_sources_up_to_date_one(run, tmp_path, tiny_recipe_dict_module,
                                                                        glue_dir, capsys):
    """A run directory whose QAT was trained under other QAT settings adopts the source's QAT once the recipe
    matches the source again (``run --from-run``), instead of training it a second time."""
    data = json.loads(json.dumps(tiny_recipe_dict_module))
    data["engine"] = {"specs": []}
    recipe = tmp_path / "variant.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    variant = tmp_path / "variant"
    common = ["--glue-dir", str(glue_dir), "--run-dir", str(variant), "--from-run", str(run)]
    assert main(["-q", "train", str(recipe), "--set", "train.qat.quantizers.attention=false", "--stage", "qat",
                 *common]) == 0
    ours = (variant / "qat" / "manifest.json").read_bytes()
    assert ours != (run / "qat" / "manifest.json").read_bytes()
    assert read_ledger(variant)["qat"]["seconds"] > 0  # trained here
    assert main(["-q", "run", str(recipe), *common]) == 0
    for stage in ("dense", "sparse", "qat"):
        assert (variant / stage / "manifest.json").read_bytes() == (run / stage / "manifest.json").read_bytes()
    ledger = read_ledger(variant)
    assert ledger["qat"]["key"] == read_ledger(run)["qat"]["key"]
    assert ledger["qat"]["seconds"] == 0.0  # adopted (copied), not trained a second time


def test_from_run_refuses_a_changed_source(run_copy, tmp_path, tiny_recipe_dict_module, glue_dir, capsys):
    data = json.loads(json.dumps(tiny_recipe_dict_module))
    data["engine"] = {"specs": []}
    recipe = tmp_path / "variant.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    masks = run_copy / "sparse" / "masks.safetensors"
    tensors = load_file(str(masks))
    name = next(iter(tensors))
    tensors[name] = ~tensors[name]
    save_file(tensors, str(masks))
    capsys.readouterr()
    assert main(["-q", "train", str(recipe), "--set", "name=v2", "--glue-dir", str(glue_dir), "--runs-root",
                 str(tmp_path / "runs"), "--stage", "qat", "--from-run", str(run_copy)]) == 2
    _, errors = _errors(capsys)
    assert len(errors) == 1 and "masks.safetensors" in errors[0]
