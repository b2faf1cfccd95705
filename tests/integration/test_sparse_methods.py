"""Both sparse methods of the training stage on real RTE data (tiny model): ADMM and the ASP magnitude baseline."""

import math

import pytest
import torch

from nxm_deploy.config.recipe import recipe_from_dict
from nxm_deploy.sparsity import count_nm_violations
from nxm_deploy.training.stage import load_masks, train_admm, train_dense

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, tiny_recipe_dict_module, glue_dir):
    run_dir = tmp_path_factory.mktemp("methods")
    recipe = recipe_from_dict(tiny_recipe_dict_module)
    train_dense(recipe, run_dir, str(glue_dir))
    return run_dir, tiny_recipe_dict_module


@pytest.mark.parametrize("method", ["admm", "magnitude"])
def test_sparse_method(dense_run, glue_dir, method):
    from transformers import AutoModelForSequenceClassification

    run_dir, base = dense_run
    data = {**base, "train": {**base["train"], "admm": {**base["train"]["admm"], "method": method}}}
    recipe = recipe_from_dict(data)
    manifest = train_admm(recipe, run_dir, str(glue_dir))
    assert manifest["method"] == method and manifest["mask_check"]["ok"]
    steps_per_epoch = math.ceil(256 / 32)
    acfg = recipe.train.admm
    if method == "admm":
        assert manifest["admm_history"] and manifest["train"]["steps"] == math.ceil(acfg.epochs * steps_per_epoch)
        assert manifest["masked_finetune"]["steps"] == math.ceil(acfg.masked_finetune_epochs * steps_per_epoch)
    else:  # same budget, all of it masked fine-tune
        assert not manifest["admm_history"] and manifest["train"] is None
        assert manifest["masked_finetune"]["steps"] == math.ceil((acfg.epochs + acfg.masked_finetune_epochs) * steps_per_epoch)
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "sparse")
    masks = load_masks(run_dir)
    assert len(masks) == 12
    for fqn, mask in masks.items():
        weight = model.get_submodule(fqn.rpartition(".")[0]).weight.detach()
        assert torch.all(weight[~mask] == 0)
        assert count_nm_violations(weight.numpy(), "2:4", axis=1)[1] == 0
