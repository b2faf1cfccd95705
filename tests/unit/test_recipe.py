"""Recipes: strict schema, shipped recipes valid, stable hash."""

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
