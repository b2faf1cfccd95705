"""Engine specs: strict schema, the shipped specs, profile derivation from a recipe, engine file names."""

from pathlib import Path

import pytest

from nxm_deploy.engine.spec import (
    EngineSpec, derive_profile, engine_filename, load_engine_spec, resolve_run_dir,
)
from nxm_deploy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "engines").glob("*.yaml"))
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_specs(path):
    spec = load_engine_spec(path)
    assert spec.batch_size.min <= spec.batch_size.opt <= spec.batch_size.max
    assert spec.sparse_weights == (spec.precision == "int8-qdq")  # sparse INT8 engine vs dense baseline
    assert spec.run_dir and (ROOT / "recipes" / f"{Path(spec.run_dir).name}.yaml").is_file()
    profile = derive_profile(spec, INPUTS, max_seq_length=128)
    assert set(profile) == set(INPUTS)


def test_demo_specs_are_one_sparse_int8_and_one_dense_fp16():
    from nxm_deploy.config.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "minilm_mrpc_2of4_int8.yaml")
    specs = [load_engine_spec(ROOT / p) for p in recipe.engine.specs]
    assert sorted((s.precision, s.sparse_weights) for s in specs) == [("fp16", False), ("int8-qdq", True)]
    sparse = next(s for s in specs if s.sparse_weights)
    # the FFN layers must run sparse; attention projections are not required to
    assert sparse.requires_sparse("bert.encoder.layer.3.intermediate.dense")
    assert sparse.requires_sparse("bert.encoder.layer.3.output.dense")
    assert not sparse.requires_sparse("bert.encoder.layer.3.attention.output.dense")
    assert not sparse.requires_sparse("bert.encoder.layer.3.attention.self.query")
    assert not sparse.requires_sparse(None)


@pytest.mark.parametrize("text, match", [
    ("name: e\nonnx: x.onnx\nprecision: int8-qdq\nbatch_size: {min: 4, opt: 2, max: 8}\n", "min <= opt <= max"),
    ("name: e\nonnx: x.onnx\nprecision: int8\n", "precision"),
    ("name: e\nonnx: x.onnx\nprecision: fp16\nfp16: true\n", "fp16"),
    ("name: e\nonnx: x.onnx\nprecision: fp16\nbatch_size: {min: 1, opt: auto, max: auto}\n", "batch_size"),
    ("name: e\nonnx: x.onnx\nprecision: fp16\nsequence_length: {min: 8, opt: auto, max: 64}\n", "opt: auto"),
    ("name: e\nonnx: x.onnx\nprecision: fp16\nrequire_sparse: ['*']\n", "require_sparse"),
    ("name: e\nonnx: x.onnx\nprecision: int8-qdq\nremainder: fp32\nkeep_fp32_ops: [Softmax]\n", "keep_fp32_ops"),
    ("name: e\nonnx: x.onnx\nprecision: fp32\nkeep_fp32_ops: [Softmax]\n", "keep_fp32_ops"),
    ("name: e\nonnx: x.onnx\nprecision: fp16\nremainder: fp32\n", "remainder"),
    ("name: e\nonnx: x.onnx\nprecision: int8-qdq\nremainder: bf16\n", "remainder"),
    ("name: e\nonnx: sub/x.onnx\nprecision: fp32\n", "absolute path"),
    ("name: 'bad name'\nonnx: x.onnx\nprecision: fp32\n", "name"),
    ("name: e\nonnx: x.onnx\nprecision: fp32\nworkspace_bytes: 10\n", "workspace_bytes"),
    ("name: e\nonnx: x.onnx\nprecision: fp32\nbuilder_optimization_level: 6\n", "builder_optimization_level"),
    ("- a\n- b\n", "mapping"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_bad_specs(tmp_path, text, match):
    bad = tmp_path / "e.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_engine_spec(bad)


def test_missing_spec(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_engine_spec(tmp_path / "nope.yaml")


def test_profile_from_recipe_auto_and_overrides():
    spec = EngineSpec(name="e", onnx="m.onnx", precision="int8-qdq", sparse_weights=True,
                      batch_size={"min": 1, "opt": 16, "max": 32},
                      sequence_length={"min": 8, "opt": "auto", "max": "auto"},
                      per_input={"token_type_ids": {"sequence_length": {"min": 8, "opt": 32, "max": "auto"}}})
    profile = derive_profile(spec, INPUTS, max_seq_length=64, model_max_positions=512)
    assert profile["input_ids"] == {"min": [1, 8], "opt": [16, 64], "max": [32, 64]}
    assert profile["token_type_ids"] == {"min": [1, 8], "opt": [16, 32], "max": [32, 64]}
    with pytest.raises(ConfigError, match="task.max_seq_length"):
        derive_profile(spec, INPUTS, max_seq_length=None)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        derive_profile(spec, INPUTS, max_seq_length=1024, model_max_positions=512)
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        derive_profile(spec, INPUTS, max_seq_length=4)
    with pytest.raises(ConfigError, match="per_input"):
        derive_profile(spec, ["input_ids", "attention_mask"], max_seq_length=64)


def test_fixed_profile_ignores_recipe():
    spec = EngineSpec(name="e", onnx="m.onnx", precision="fp32", batch_size={"min": 1, "opt": 2, "max": 4},
                      sequence_length={"min": 8, "opt": 16, "max": 32})
    assert derive_profile(spec, ["input_ids"], max_seq_length=None) == {
        "input_ids": {"min": [1, 8], "opt": [2, 16], "max": [4, 32]}}


def test_engine_names_carry_recipe_trt_sm_and_kind():
    sparse = EngineSpec(name="minilm_mrpc_2of4_int8", onnx="m.onnx", precision="int8-qdq", sparse_weights=True)
    dense = EngineSpec(name="minilm_mrpc_dense_fp16", onnx="m.onnx", precision="fp16")
    assert sparse.engine_filename("10.13.0.35", "90") == "minilm_mrpc_2of4_int8__trt10.13.0.35__sm90__sparse.plan"
    assert dense.engine_filename("11.4.0.106", "86") == "minilm_mrpc_dense_fp16__trt11.4.0.106__sm86__dense.plan"
    with pytest.raises(ConfigError):
        engine_filename("x", "10/1", "90", True)
    with pytest.raises(ConfigError):
        engine_filename("x", "10.1", "", True)
    cache = sparse.timing_cache_path(Path("/runs/r"), "10.13.0.35", "90")
    assert cache == Path("/runs/r/engines/timing__trt10.13.0.35__sm90.cache")


def test_spec_hash_ignores_comments_and_key_order(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("name: e\nonnx: m.onnx\nprecision: fp16\n")
    b.write_text("# a comment\nprecision: fp16   # same\nonnx: m.onnx\nname: e\n")
    assert load_engine_spec(a).sha256() == load_engine_spec(b).sha256()
    b.write_text("name: e\nonnx: m.onnx\nprecision: fp16\nbuilder_optimization_level: 4\n")
    assert load_engine_spec(a).sha256() != load_engine_spec(b).sha256()


def test_resolve_run_dir(tmp_path, monkeypatch):
    spec = EngineSpec(name="e", onnx="m.onnx", precision="fp32", run_dir="runs/r")
    assert resolve_run_dir(spec, None, tmp_path / "given") == tmp_path / "given"
    project = tmp_path / "proj"
    (project / "engines").mkdir(parents=True)
    (project / "runs" / "r").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # not the project root: found relative to the spec's project
    assert resolve_run_dir(spec, project / "engines" / "e.yaml", None) == (project / "runs" / "r").resolve()
    with pytest.raises(ConfigError, match="no run_dir"):
        resolve_run_dir(EngineSpec(name="e", onnx="m.onnx", precision="fp32"), None, None)
