"""The mask methods of the sparse stage on real RTE data (tiny model): ADMM, the ASP magnitude baseline and Wanda,
each followed by the same masked fine-tune; the one selection rule of protocol v2 (a method's own candidate and the
PTQ model compete with the trained epochs)."""

import copy
import math

import pytest
import torch

from nxm_deploy.config.recipe import recipe_from_dict
from nxm_deploy.sparsity import count_nm_violations
from nxm_deploy.run.reader import load_masks, load_stage_model
from nxm_deploy.training.stage import train_admm, train_dense, train_qat

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, tiny_recipe_dict_module, glue_dir):
    run_dir = tmp_path_factory.mktemp("methods")
    recipe = recipe_from_dict(tiny_recipe_dict_module)
    train_dense(recipe, run_dir, str(glue_dir))
    return run_dir, tiny_recipe_dict_module


def _with(base: dict, **sections) -> dict:
    data = copy.deepcopy(base)
    for dotted, value in sections.items():
        node = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


@pytest.mark.parametrize("method", ["admm", "magnitude", "wanda", "sparsegpt"])
def test_sparse_method(dense_run, glue_dir, method):
    from transformers import AutoModelForSequenceClassification

    run_dir, base = dense_run
    recipe = recipe_from_dict(_with(base, sparsity__method=method))
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
    differing = manifest["mask_vs_magnitude"]["kept_positions_differing"]
    if method == "magnitude":
        assert differing == 0.0
    elif method in ("wanda", "sparsegpt"):  # activations reorder the kept weights of some groups
        assert 0.0 < differing < 1.0 and manifest["method_details"]["calibration_batches"] == 8
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "sparse")
    masks = load_masks(run_dir)
    assert len(masks) == 12
    for dense_layer in ("bert.pooler.dense", "classifier"):  # not targets: no method prunes them
        assert float((model.get_submodule(dense_layer).weight == 0).float().mean()) < 0.01
    for fqn, mask in masks.items():
        weight = model.get_submodule(fqn.rpartition(".")[0]).weight.detach()
        assert torch.all(weight[~mask] == 0)
        assert count_nm_violations(weight.numpy(), "2:4", axis=1)[1] == 0


def test_a_better_earlier_candidate_is_kept(tiny_recipe_dict, glue_dir, tmp_path):
    """Under ``select: best`` ADMM's hard projection competes with the masked fine-tune epochs, and the PTQ model with
    the QAT epochs (protocol v2). A fine-tune at a rate that blows the weights up (lr 1e10: STS-B predictions turn
    non-finite, Pearson undefined) loses to them, and the stage keeps the earlier model: its weights and its metrics."""
    from nxm_deploy.data import TaskData
    from nxm_deploy.run.reader import load_qat_model
    from nxm_deploy.training.trainer import evaluate_model

    data = _with(tiny_recipe_dict, task__name="stsb", task__max_train_examples=128, train__select="best",
                 sparsity__method="admm")
    data["train"]["admm"].update(epochs=1, masked_finetune_epochs=1)
    run_dir = tmp_path / "run"
    train_dense(recipe_from_dict(data), run_dir, str(glue_dir))
    wreck = copy.deepcopy(data)
    wreck["train"]["admm"]["learning_rate"] = 1e10  # both ADMM phases: the projection is scored before the fine-tune
    wreck["train"]["admm"]["epochs"] = 0.125
    recipe = recipe_from_dict(wreck)
    manifest = train_admm(recipe, run_dir, str(glue_dir))
    assert manifest["masked_finetune"]["epoch_metrics"]
    assert manifest["kept"].startswith("ADMM hard projection")
    assert manifest["metrics"] == manifest["metrics_after_projection"]
    model, tokenizer = load_stage_model(run_dir, "admm")
    task_data = TaskData.from_recipe(recipe, tokenizer, str(glue_dir))
    assert evaluate_model(model, task_data, recipe.train) == pytest.approx(manifest["metrics"])

    wreck["train"]["qat"].update(learning_rate=1e10, epochs=1)
    recipe = recipe_from_dict(wreck)
    manifest = train_qat(recipe, run_dir, str(glue_dir))
    assert manifest["train"]["epoch_metrics"] and manifest["kept"] == "PTQ"
    assert manifest["metrics"] == manifest["ptq_metrics"]
    model, _, _ = load_qat_model(run_dir)
    assert evaluate_model(model, task_data, recipe.train) == pytest.approx(manifest["metrics"])
