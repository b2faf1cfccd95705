"""Recipes: strict schema, shipped recipes valid, stable hash."""

import re
from pathlib import Path

import pytest
import yaml

from nxm_deploy.config.recipe import load_recipe, recipe_from_dict
from nxm_deploy.engine.spec import load_engine_spec
from nxm_deploy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_and_name_their_engine_specs(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    for spec in recipe.engine.specs:
        assert load_engine_spec(ROOT / spec).onnx in ("sparse_int8_qdq.onnx", "dense_fp32.onnx")


def test_unknown_nested_key_named():
    with pytest.raises(ConfigError, match="unknown key 'train.admm.rhoo'"):
        recipe_from_dict({"name": "x", "train": {"admm": {"rhoo": 1}}})


def test_bad_values_named():
    with pytest.raises(ConfigError, match="train.batch_size"):
        recipe_from_dict({"name": "x", "train": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="did you mean '2:4'"):
        recipe_from_dict({"name": "x", "sparsity": {"pattern": "4:2"}})
    with pytest.raises(ConfigError, match="update_interval"):
        recipe_from_dict({"name": "x", "train": {"admm": {"update_interval": 0}}})


@pytest.mark.parametrize("name", [".", "..", "", "a/b", "../x", "/abs", "a\\b", "a b", "x\n"])
def test_name_must_be_a_plain_directory_name(name):
    with pytest.raises(ConfigError, match=r"'name': .* is not a plain directory name") as info:
        recipe_from_dict({"name": name})
    assert "runs/<name>" in info.value.message and info.value.hint.startswith("e.g. name:")
    with pytest.raises(ValueError, match="not a plain directory name"):  # pydantic's ValidationError
        recipe_from_dict({"name": "ok"}).name = name  # assignment is validated too


@pytest.mark.parametrize("name", ["x", "tiny_smoke", "minilm-rte.v2", "...", ".hidden"])
def test_plain_directory_names_pass(name):
    assert recipe_from_dict({"name": name}).name == name


def test_yaml_errors_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_hash_ignores_formatting_but_not_values(tmp_path):
    a = recipe_from_dict({"name": "x", "train": {"seed": 1}})
    b = recipe_from_dict(yaml.safe_load("train:\n  seed: 1\nname: x\n"))
    c = recipe_from_dict({"name": "x", "train": {"seed": 2}})
    assert a.sha256() == b.sha256() != c.sha256()


# ----------------------------------------------------------------------------------------------- overrides
def test_set_overrides_apply_dotted_keys_and_validate(tmp_path, tiny_recipe_dict):
    import yaml

    from nxm_deploy.config.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict))
    recipe = load_recipe(path, ["train.seed=7", "sparsity.pattern=1:4", "train.admm.rho=2e-2", "train.select=best",
                                "validate.latency_shapes=[[1, 32]]"])
    assert recipe.train.seed == 7 and recipe.sparsity.pattern == "1:4" and recipe.train.admm.rho == 0.02
    assert recipe.train.select == "best" and recipe.validate_.latency_shapes == [(1, 32)]
    assert recipe.sha256() != load_recipe(path).sha256()
    # the stored recipe reproduces the overridden one
    stored = tmp_path / "stored.yaml"
    stored.write_text(yaml.safe_dump(recipe.to_dict()))
    assert load_recipe(stored).sha256() == recipe.sha256()


@pytest.mark.parametrize("override,needle", [
    ("train.bogus=1", "unknown key 'train.bogus'"),
    ("train.seed", "KEY=VALUE"),
    ("train..seed=1", "KEY=VALUE"),
    ("train.seed.x=1", "'train.seed' is a value"),
    ("train.batch_size=-1", "train.batch_size"),
])
def test_bad_overrides_are_one_line_config_errors(tmp_path, tiny_recipe_dict, override, needle):
    import yaml

    from nxm_deploy.config.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_recipe(path, [override])


def test_old_bf16_key_reads_as_precision(tiny_recipe_dict):
    tiny_recipe_dict["train"]["bf16"] = True
    assert recipe_from_dict(tiny_recipe_dict).train.precision == "bf16"
    tiny_recipe_dict["train"]["precision"] = "fp32"
    with pytest.raises(ConfigError, match="precision only"):
        recipe_from_dict(tiny_recipe_dict)


def test_recipe_schema_imports_no_torch():
    """The client and the engine builder read recipes through the schema; it must not pull in torch."""
    import subprocess
    import sys

    code = ("import sys; from nxm_deploy.config.recipe import load_recipe; "
            "load_recipe('recipes/minilm_mrpc_2of4_int8.yaml'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_base_recipe_is_merged_section_by_section(tmp_path):
    from nxm_deploy.config.recipe import load_recipe

    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(
        "name: base\nmodel: {source: minilm}\ntask: {name: rte, max_seq_length: 96}\n"
        "train: {seed: 3, admm: {rho: 500.0, epochs: 3}}\nvalidate: {latency_shapes: [[1, 64], [8, 64]]}\n")
    (tmp_path / "sub" / "demo.yaml").write_text(
        "base: ../base.yaml\nname: demo\ntask: {name: mrpc}\ntrain: {admm: {epochs: 2}}\n"
        "validate: {latency_shapes: [[1, 32]]}\n")
    recipe = load_recipe(tmp_path / "sub" / "demo.yaml", ["train.seed=5"])
    assert recipe.name == "demo" and recipe.task.name == "mrpc"
    assert recipe.task.max_seq_length == 96  # kept from the base: sections merge key by key
    assert recipe.train.admm.rho == 500.0 and recipe.train.admm.epochs == 2
    assert recipe.train.seed == 5  # --set applies after the base chain
    assert recipe.validate_.latency_shapes == [(1, 32)]  # lists replace
    assert "base" not in recipe.to_dict()  # a run directory saves the resolved recipe


def test_base_recipe_errors_are_named(tmp_path):
    from nxm_deploy.config.recipe import load_recipe

    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\nname: c\n")
    with pytest.raises(ConfigError, match="missing.yaml not found"):
        load_recipe(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [1]\nname: d\n")
    with pytest.raises(ConfigError, match="must be a recipe path"):
        load_recipe(tmp_path / "d.yaml")


def test_qat_distillation_weights_are_the_qat_stage_own():
    """``train.qat.distillation`` changes QAT's key only (an ADMM stage can be adopted across it), QAT's trainer
    gets those weights, and a recipe without it keeps the key it had before the field existed."""
    from nxm_deploy.stages import recipe_key
    from nxm_deploy.training.stage import _kd

    path = ROOT / "recipes" / "bench_accuracy.yaml"
    base = load_recipe(path, ["train.qat.distillation=null"])  # unset: QAT takes train.distillation
    soft_only = load_recipe(path, ["train.qat.distillation={gamma: 0.0}"])
    assert "distillation" not in base.to_dict()["train"]["qat"]
    assert recipe_key(soft_only, "qat") != recipe_key(base, "qat")
    assert recipe_key(soft_only, "admm") == recipe_key(base, "admm")
    weights = _kd(soft_only, object(), True, soft_only.train.qat.distillation)["distillation"]
    assert (weights.alpha, weights.beta, weights.gamma) == (1.0, 10.0, 0.0)
    assert _kd(base, object(), True, base.train.qat.distillation)["distillation"] == base.train.distillation


def test_an_admm_only_change_leaves_the_magnitude_stage_up_to_date():
    """Magnitude pruning reads no ADMM-only field (rho, its schedule, U0, the penalty form): changing one changes the
    ADMM stage's key, not the magnitude stage's; a field magnitude does read (epochs) changes both."""
    from nxm_deploy.stages import differing_keys, recipe_key

    path = ROOT / "recipes" / "bench_accuracy.yaml"
    admm_change = ["train.admm.rho=200", "train.admm.rho_factor=3", "train.admm.u_init=residual"]
    for method, moved in (("magnitude", False), ("admm", True)):
        base = load_recipe(path, [f"train.admm.method={method}"])
        other = load_recipe(path, [f"train.admm.method={method}", *admm_change])
        assert (recipe_key(other, "admm") != recipe_key(base, "admm")) is moved
        assert bool(differing_keys(other, base, ("admm",))) is moved
        longer = load_recipe(path, [f"train.admm.method={method}", "train.admm.epochs=4"])
        assert recipe_key(longer, "admm") != recipe_key(base, "admm")
    magnitude = load_recipe(path, ["train.admm.method=magnitude"])
    assert "train.admm.rho" in magnitude.unread_keys() and "train.admm.epochs" not in magnitude.unread_keys()
    assert load_recipe(path).unread_keys() == {"sparsity.calibration_batches"}  # ADMM reads no calibration


def test_a_recipe_or_engine_spec_that_is_not_utf8_is_one_config_error(tmp_path):
    from nxm_deploy.engine.spec import load_engine_spec

    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: x\ndescription: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"Recipe file .* is not UTF-8 text: .*byte offset 24 \(line 2\)") as err:
        load_recipe(path)
    assert "iconv" in err.value.hint
    with pytest.raises(ConfigError, match=r"Engine spec .* is not UTF-8 text"):
        load_engine_spec(path)
