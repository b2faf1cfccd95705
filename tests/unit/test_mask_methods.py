"""The mask-method registry (``sparsity.method``), Wanda's score and the seeded training subset."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nxm_deploy.config.recipe import load_recipe
from nxm_deploy.errors import ConfigError, MissingDependencyError, exit_code
from nxm_deploy.sparsity.mask import nm_mask
from nxm_deploy.sparsity.methods import METHODS, MaskMethod, get_method, unread_keys
from nxm_deploy.sparsity.methods.wanda import blocks_of, input_norms, wanda_mask

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "bench_accuracy.yaml"


def test_the_registry_names_every_method_and_the_recipe_checks_against_it():
    assert set(METHODS) == {"magnitude", "admm", "wanda", "sparsegpt"}
    for name in METHODS:
        assert load_recipe(RECIPE, [f"sparsity.method={name}"]).sparsity.method == name
    with pytest.raises(ConfigError, match=r"sparsity.method 'obs' is not a mask method; the methods are magnitude, "
                                          r"admm, wanda, sparsegpt") as err:
        load_recipe(RECIPE, ["sparsity.method=obs"])
    assert "\n" not in err.value.message and exit_code(err.value) == 2
    with pytest.raises(ConfigError):
        get_method("obs")


def test_the_old_spelling_train_admm_method_reads_as_sparsity_method():
    assert load_recipe(RECIPE, ["train.admm.method=magnitude"]).sparsity.method == "magnitude"
    with pytest.raises(ConfigError, match="disagree: give sparsity.method only"):
        load_recipe(RECIPE, ["train.admm.method=magnitude", "sparsity.method=wanda"])


def test_each_method_reads_only_its_own_keys_into_the_stage_key():
    from nxm_deploy.stages import recipe_key

    assert unread_keys("admm") == {"sparsity.calibration_batches"}
    assert "train.admm.rho" in unread_keys("wanda") and "sparsity.calibration_batches" not in unread_keys("wanda")
    assert {"train.admm.rho", "sparsity.calibration_batches"} <= unread_keys("magnitude")
    for method, moved in (("magnitude", False), ("admm", False), ("wanda", True), ("sparsegpt", True)):
        base = load_recipe(RECIPE, [f"sparsity.method={method}"])
        more = load_recipe(RECIPE, [f"sparsity.method={method}", "sparsity.calibration_batches=16"])
        assert (recipe_key(more, "admm") != recipe_key(base, "admm")) is moved, method


def test_a_method_whose_extra_is_missing_is_exit_3_with_the_install_line():
    method = MaskMethod("fake", "fake", "none", "nxm_deploy.sparsity.methods.magnitude:find_masks", extra="fakeextra",
                        module="nxm_deploy_no_such_module")
    with pytest.raises(MissingDependencyError, match=r"needs nxm_deploy_no_such_module") as err:
        method.function()
    assert exit_code(err.value) == 3 and "nxm-deploy[fakeextra]" in err.value.hint
    assert callable(get_method("wanda").function())  # no extra: imports


def test_the_cli_refuses_a_missing_extra_with_one_line_and_exit_3(tmp_path, monkeypatch, capsys, glue_dir):
    """A cell of a method whose extra is missing stops at the sparse stage's start: one line, exit 3 (the dense stage
    before it is trained for real, on a tiny model)."""
    from nxm_deploy.cli.main import main
    from nxm_deploy.sparsity import methods

    fake = MaskMethod("sparsegpt", "SparseGPT", "test", methods.METHODS["sparsegpt"].find, extra="modelopt",
                      module="nxm_deploy_no_such_module")
    monkeypatch.setitem(methods.METHODS, "sparsegpt", fake)
    recipe = ROOT / "recipes" / "tiny_smoke.yaml"
    code = main(["-q", "train", str(recipe), "--run-dir", str(tmp_path / "run"), "--glue-dir", str(glue_dir),
                 "--set", "sparsity.method=sparsegpt", "--set", "task.max_train_examples=32",
                 "--set", "task.max_eval_examples=16", "--set", "train.dense.epochs=0.25"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert any("sparsity.method sparsegpt needs nxm_deploy_no_such_module" in line for line in err)
    assert not any("Traceback" in line for line in err)


def test_wanda_scores_weights_by_their_input_norms():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([10.0, 10.0, 0.1, 0.1])
    assert wanda_mask(weight, norms, "2:4").tolist() == [[True, True, False, False], [True, True, False, False]]
    assert nm_mask(weight, "2:4").tolist() == [[False, False, True, True], [True, True, False, False]]


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, inputs_embeds=None, attention_mask=None):
        return self.lin(inputs_embeds)


def test_wanda_norms_leave_padding_tokens_out():
    model = _Toy()
    x = torch.tensor([[[1.0, 2.0, 0.0, 1.0], [3.0, 0.0, 1.0, 1.0], [1e3, 1e3, 1e3, 1e3]]])  # last token is padding
    mask = torch.tensor([[1, 1, 0]])

    def loop(m):
        m(inputs_embeds=x, attention_mask=mask)
        m(inputs_embeds=x, attention_mask=mask)

    norms = input_norms(model, ["lin"], loop)["lin"]
    expected = torch.sqrt(2 * (x[0, :2] ** 2).sum(dim=0)).double()
    assert torch.allclose(norms, expected)
    assert not model._forward_pre_hooks and not model.lin._forward_hooks  # hooks removed


def test_blocks_group_targets_in_order():
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.output.dense",
             "bert.encoder.layer.1.attention.self.query", "pooler.dense"]
    assert list(blocks_of(names).items()) == [
        ("bert.encoder.layer.0", names[:2]), ("bert.encoder.layer.1", names[2:3]), ("pooler.dense", names[3:])]


def test_the_seeded_training_subset_is_fixed_and_keeps_file_order(glue_dir):
    from nxm_deploy.data.glue import load_task_split

    head = load_task_split("sst2", "train", glue_dir, 200)
    sub = load_task_split("sst2", "train", glue_dir, 200, subset_seed=0)
    again = load_task_split("sst2", "train", glue_dir, 200, subset_seed=0)
    other = load_task_split("sst2", "train", glue_dir, 200, subset_seed=1)
    full = load_task_split("sst2", "train", glue_dir)
    assert len(sub.labels) == 200 and sub.texts_a == again.texts_a and sub.texts_a != other.texts_a
    assert sub.texts_a != head.texts_a
    # drawn from the whole file by numpy's seeded generator, kept in file order, labels with their texts
    expected = np.sort(np.random.default_rng(0).choice(len(full.labels), size=200, replace=False))
    assert expected[-1] > 10 * 200
    assert [full.texts_a[i] for i in expected] == sub.texts_a and np.array_equal(full.labels[expected], sub.labels)
    recipe = load_recipe(RECIPE, ["task.name=sst2", "task.max_train_examples=200", "task.train_subset_seed=0"])
    assert recipe.task.train_subset_seed == 0
    assert "train_subset_seed" not in load_recipe(RECIPE).to_dict()["task"]  # unset: the stage keys stay


def test_the_cli_refuses_an_unknown_method_with_one_line_and_exit_2(tmp_path, capsys):
    from nxm_deploy.cli.main import main

    code = main(["run", str(ROOT / "recipes" / "tiny_smoke.yaml"), "--run-dir", str(tmp_path / "run"),
                 "--set", "sparsity.method=obs"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not (tmp_path / "run").exists()
    assert "sparsity.method 'obs' is not a mask method" in err[0] and not any("Traceback" in line for line in err)
