"""ADMM n:m inside a Hugging Face Trainer: exact n:m at the end, the penalty in the loss, checkpoints, resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install accelerate)")


from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from nxm_deploy.config.recipe import recipe_from_dict  # noqa: E402
from nxm_deploy.errors import ConfigError  # noqa: E402
from nxm_deploy.integrations import (  # noqa: E402
    ADMM_STATE_NAME,
    ADMMCallback,
    ADMMTrainer,
    MaskedFinetuneCallback,
)
from nxm_deploy.sparsity import count_nm_violations, nm_mask  # noqa: E402
from nxm_deploy.sparsity.admm import ADMMSparsifier  # noqa: E402
from tiny_models import BATCH, tiny_bert, tiny_dataset, training_args  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class StopAt(TrainerCallback):
    """Ends training after optimizer step ``step`` (after its checkpoint is written): a run killed there."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _targets(model) -> set[str]:
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layer." in f".{name}."}


def test_trained_targets_are_exactly_nm_and_the_rest_stays_dense(tmp_path):
    model = tiny_bert()
    admm = ADMMCallback(pattern="2:4", rho=0.05)
    ADMMTrainer(model=model, args=training_args(tmp_path), train_dataset=tiny_dataset(), admm=admm).train()

    assert set(admm.masks) == _targets(model) and len(admm.masks) == 12  # Q K V O FFN1 FFN2 x 2 layers
    for fqn, mask in admm.masks.items():
        weight = model.get_parameter(fqn).detach()
        assert count_nm_violations(weight.numpy(), "2:4", axis=1)[1] == 0, fqn
        assert int((weight != 0).sum()) == weight.numel() // 2, fqn  # exactly 2 of 4 kept, no extra zeros
        assert torch.equal(weight != 0, mask), fqn
    for fqn in ("bert.pooler.dense.weight", "classifier.weight"):
        weight = model.get_parameter(fqn).detach().numpy()
        assert fqn not in admm.masks
        assert (weight != 0).all(), fqn  # never projected
    # authors' schedule: one Z/U update after the step completing each epoch (4 steps per epoch)
    assert [(r["update"], r["global_step"]) for r in admm.sparsifier.history] == [(1, 4), (2, 8), (3, 12)]
    assert not admm.active and admm.sparsifier.squashed
    with pytest.raises(ConfigError, match="already finished"):
        admm.setup(model)


def test_step_interval_schedule(tmp_path):
    admm = ADMMCallback(pattern="2:4", rho=0.05, update_interval=5)
    ADMMTrainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=tiny_dataset(), admm=admm).train()
    assert [r["global_step"] for r in admm.sparsifier.history] == [5, 10]


def test_loss_carries_the_penalty_and_its_gradient(tmp_path):
    rho = 0.5
    model = tiny_bert()
    admm = ADMMCallback(pattern="2:4", rho=rho)
    trainer = ADMMTrainer(model=model, args=training_args(tmp_path), train_dataset=tiny_dataset(), admm=admm)
    admm.setup(model)
    sp = admm.sparsifier
    gen = torch.Generator().manual_seed(3)
    for fqn in sp.tensor_fqns:  # nonzero U, so the gradient term rho * (W - Z + U) is not just rho * (W - Z)
        sp.admm_u[fqn] = 0.01 * torch.randn(sp.admm_u[fqn].shape, generator=gen)
    batch = {k: torch.stack([ex[k] for ex in tiny_dataset()[:BATCH]]) for k in ("input_ids", "attention_mask", "labels")}

    model.train()
    plain = model(**batch).loss
    plain_grads = torch.autograd.grad(plain, [model.get_parameter(f) for f in sp.tensor_fqns])
    loss = trainer.compute_loss(model, dict(batch))
    penalty = sum(0.5 * rho * (model.get_parameter(f) - sp.admm_z[f] + sp.admm_u[f]).pow(2).sum()
                  for f in sp.tensor_fqns)
    assert float(penalty.detach()) > 1e-3
    torch.testing.assert_close(loss, plain + penalty)
    grads = torch.autograd.grad(loss, [model.get_parameter(f) for f in sp.tensor_fqns])
    for fqn, grad, plain_grad in zip(sp.tensor_fqns, grads, plain_grads):
        weight = model.get_parameter(fqn).detach()
        expected = plain_grad + rho * (weight - sp.admm_z[fqn] + sp.admm_u[fqn])
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)

    # loss normalised by num_items_in_batch is not divided by the accumulation steps: the penalty is, instead
    trainer.current_gradient_accumulation_steps = 2
    loss_ga = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(2 * BATCH))
    if trainer.model_accepts_loss_kwargs:
        torch.testing.assert_close(loss_ga - model(**batch).loss, penalty / 2)

    model.eval()  # evaluation losses stay task-only
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), model(**batch).loss)


def test_rho_changes_training(tmp_path):
    """The penalty reaches the optimizer: rho = 1 drives the to-be-pruned weights down, rho = 1e-8 does not."""
    pruned_share = {}
    for rho in (1e-8, 1.0):
        model = tiny_bert()
        admm = ADMMCallback(pattern="2:4", rho=rho, squash_at_end=False)
        ADMMTrainer(model=model, args=training_args(tmp_path / str(rho)), train_dataset=tiny_dataset(),
                    admm=admm).train()
        weights = [model.get_parameter(fqn).detach() for fqn in admm.masks]
        pruned = sum(float((w * ~nm_mask(w, "2:4")).pow(2).sum()) for w in weights)
        pruned_share[rho] = (pruned / sum(float(w.pow(2).sum()) for w in weights)) ** 0.5
    # measured: about 0.37 (rho = 1e-8, like dense training) vs 0.23 (rho = 1)
    assert pruned_share[1.0] < 0.75 * pruned_share[1e-8]


def test_plain_trainer_without_penalty_is_refused(tmp_path):
    admm = ADMMCallback(pattern="2:4", rho=0.05)
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=tiny_dataset(),
                      callbacks=[admm])
    with pytest.raises(ConfigError, match="without the ADMM penalty"):
        trainer.train()


def test_evaluate_scores_the_hard_projected_model(tmp_path):
    model = tiny_bert()
    admm = ADMMCallback(pattern="2:4", rho=0.05)
    data = tiny_dataset()
    trainer = ADMMTrainer(model=model, args=training_args(tmp_path), train_dataset=data, eval_dataset=data,
                          admm=admm)
    admm.setup(model)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    projected_loss = trainer.evaluate()["eval_loss"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, dense[key]), key  # dense W restored
    with torch.no_grad():
        for fqn in admm.sparsifier.tensor_fqns:
            weight = model.get_parameter(fqn)
            weight.mul_(nm_mask(weight, "2:4"))
    trainer.evaluate_hard_projected = False
    assert trainer.evaluate()["eval_loss"] == pytest.approx(projected_loss, rel=1e-6)


def test_checkpoint_holds_the_admm_state(tmp_path):
    model = tiny_bert()
    admm = ADMMCallback(pattern="2:4", rho=0.05)
    ADMMTrainer(model=model, args=training_args(tmp_path, save_strategy="steps", save_steps=3),
                train_dataset=tiny_dataset(), admm=admm).train()
    state = torch.load(tmp_path / "checkpoint-6" / ADMM_STATE_NAME, weights_only=True)
    assert state["global_step"] == 6 and state["epochs_done"] == 1
    sp = state["sparsifier"]
    assert sp["num_updates"] == 1 and len(sp["history"]) == 1 and sp["pattern"] == "2:4"
    assert set(sp["admm_z"]) == set(sp["admm_u"]) == set(sp["masks"]) == _targets(model)
    for fqn, z in sp["admm_z"].items():
        assert z.shape == model.get_parameter(fqn).shape and sp["masks"][fqn].dtype == torch.bool
        assert count_nm_violations(z.numpy(), "2:4", axis=1)[1] == 0
        assert torch.equal(z != 0, sp["masks"][fqn])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*/" + ADMM_STATE_NAME)) == [ADMM_STATE_NAME] * 4
    assert not list(tmp_path.glob("checkpoint-*/*.tmp"))


def _run(out: Path, *, stop_at: int | None = None, resume=None, update_interval="epoch"):
    """One ADMM run of 12 steps (3 epochs), checkpoints every 2 steps; Z/U and weights before the projection."""
    model = tiny_bert(seed=0 if resume is None else 7)  # a resumed run must get its weights from the checkpoint
    admm = ADMMCallback(pattern="2:4", rho=0.2, rho_factor=1.5, update_interval=update_interval,
                        squash_at_end=False)
    trainer = ADMMTrainer(model=model, args=training_args(out, save_strategy="steps", save_steps=2),
                          train_dataset=tiny_dataset(), admm=admm,
                          callbacks=[StopAt(stop_at)] if stop_at else None)
    trainer.train(resume_from_checkpoint=resume)
    return model, admm


@pytest.mark.parametrize("stop_at,interval,resume_arg", [(4, "epoch", "path"), (6, "epoch", True), (6, 4, "path")])
def test_resumed_run_matches_uninterrupted_run(tmp_path, stop_at, interval, resume_arg):
    ref_model, ref = _run(tmp_path / "ref", update_interval=interval)

    out = tmp_path / "killed"
    _, killed = _run(out, stop_at=stop_at, update_interval=interval)
    assert killed.sparsifier.num_updates < ref.sparsifier.num_updates
    resume = str(out / f"checkpoint-{stop_at}") if resume_arg == "path" else True
    model, resumed = _run(out, resume=resume, update_interval=interval)

    # one thread, same machine, same data order (the Trainer restores RNG and skips seen batches): bit-identical
    assert resumed.sparsifier.history == ref.sparsifier.history
    assert resumed.sparsifier.rho == ref.sparsifier.rho
    for fqn in ref.sparsifier.tensor_fqns:
        assert torch.equal(resumed.masks[fqn], ref.masks[fqn]), fqn
        torch.testing.assert_close(resumed.sparsifier.admm_z[fqn], ref.sparsifier.admm_z[fqn], rtol=0, atol=0)
        torch.testing.assert_close(resumed.sparsifier.admm_u[fqn], ref.sparsifier.admm_u[fqn], rtol=0, atol=0)
    ref_masks, masks = ref.finish(), resumed.finish()
    assert all(torch.equal(masks[k], ref_masks[k]) for k in ref_masks)
    ref_state = ref_model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=0, atol=0, msg=key)


def test_resume_without_admm_state_is_refused(tmp_path):
    _run(tmp_path, stop_at=4)
    os.remove(tmp_path / "checkpoint-4" / ADMM_STATE_NAME)
    with pytest.raises(ConfigError, match=ADMM_STATE_NAME):
        _run(tmp_path, resume=str(tmp_path / "checkpoint-4"))


def test_masked_finetune_keeps_the_pattern(tmp_path):
    model = tiny_bert()
    admm = ADMMCallback(pattern="2:4", rho=0.05)
    ADMMTrainer(model=model, args=training_args(tmp_path / "admm"), train_dataset=tiny_dataset(), admm=admm).train()
    before = {fqn: model.get_parameter(fqn).detach().clone() for fqn in admm.masks}
    Trainer(model=model, args=training_args(tmp_path / "ft", num_train_epochs=1), train_dataset=tiny_dataset(),
            callbacks=[MaskedFinetuneCallback(admm.masks)]).train()
    for fqn, mask in admm.masks.items():
        weight = model.get_parameter(fqn).detach()
        assert not torch.equal(weight, before[fqn]), fqn  # it trained
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask])), fqn
    with pytest.raises(ConfigError, match="no masks"):
        MaskedFinetuneCallback({})


def test_bad_inputs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="rho=0"):
        ADMMCallback(rho=0.0)
    with pytest.raises(ConfigError, match="rho=-1"):
        ADMMCallback({"pattern": "2:4", "rho": -1.0})
    with pytest.raises(ConfigError, match="unknown key"):
        ADMMCallback({"pattern": "2:4", "rh0": 1.0})
    with pytest.raises(ConfigError, match="keyword"):
        ADMMCallback(ADMMSparsifier("2:4"), rho=1.0)
    with pytest.raises(ConfigError, match="update_interval=0"):
        ADMMCallback(update_interval=0)
    with pytest.raises(ConfigError, match="ddp_sync"):
        ADMMCallback(ddp_sync="allreduce")
    with pytest.raises(ConfigError, match="admm=ADMMCallback"):
        ADMMTrainer(model=tiny_bert(), args=training_args(tmp_path))

    admm = ADMMCallback(include=["*.layer.*", "*.encoder.block.*"])
    with pytest.raises(ConfigError, match=r"\*\.encoder\.block\.\*") as info:
        admm.setup(tiny_bert())
    assert "*.layer.*'" not in str(info.value).split("match no")[0]  # only the glob that matched nothing is named
    trainer = ADMMTrainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=tiny_dataset(),
                          admm=ADMMCallback(include=["*.decoder.*"]))
    with pytest.raises(ConfigError, match=r"\*\.decoder\.\*"):
        trainer.train()
    with pytest.raises(ConfigError, match="No nn.Linear of .* is eligible for 2:4"):
        ADMMCallback(exclude=["*"]).setup(tiny_bert())


def test_from_recipe(tiny_recipe_dict):
    recipe = recipe_from_dict(tiny_recipe_dict)
    admm = ADMMCallback.from_recipe(recipe)
    acfg = recipe.train.admm
    assert str(admm.sparsifier.pattern) == recipe.sparsity.pattern and admm.sparsifier.rho == acfg.rho
    assert admm.update_interval == acfg.update_interval and admm.include is recipe.sparsity.include is None  # registry


def test_readme_trainer_example_runs_as_written(tmp_path, monkeypatch):
    """The README's "Use ADMM in your own Trainer script" block, with a tiny model and dataset supplied."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("## Use ADMM in your own Trainer script", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) <= 15
    monkeypatch.chdir(tmp_path)
    model = tiny_bert()
    namespace = {"model": model, "train_dataset": tiny_dataset(),
                 "args": training_args(tmp_path / "out", num_train_epochs=2)}
    exec(compile(block, "README.md", "exec"), namespace)
    for fqn in namespace["admm"].masks:
        assert count_nm_violations(model.get_parameter(fqn).detach().numpy(), "2:4", axis=1)[1] == 0


@pytest.mark.skipif(not hasattr(ADMMSparsifier, "proximal_step"), reason="ADMMSparsifier has no proximal mode")
def test_proximal_mode_runs_in_a_plain_trainer(tmp_path):
    """penalty_mode='proximal': no loss term, the callback's prox step after each optimizer step pulls W to Z - U."""
    pruned_share = {}
    for rho in (1e-8, 200.0):  # lr 1e-3 * rho 200: 20 % of the way to Z - U per step
        model = tiny_bert()
        admm = ADMMCallback(pattern="2:4", rho=rho, penalty_mode="proximal", squash_at_end=False)
        Trainer(model=model, args=training_args(tmp_path / str(rho)), train_dataset=tiny_dataset(),
                callbacks=[admm]).train()
        weights = [model.get_parameter(fqn).detach() for fqn in admm.masks]
        pruned = sum(float((w * ~nm_mask(w, "2:4")).pow(2).sum()) for w in weights)
        pruned_share[rho] = (pruned / sum(float(w.pow(2).sum()) for w in weights)) ** 0.5
        admm.finish()
        for fqn in admm.masks:
            assert count_nm_violations(model.get_parameter(fqn).detach().numpy(), "2:4", axis=1)[1] == 0
    # measured: about 0.37 (rho = 1e-8) vs 0.05 (rho = 200)
    assert pruned_share[200.0] < 0.5 * pruned_share[1e-8]


@pytest.mark.skipif(not hasattr(ADMMSparsifier, "proximal_step"), reason="ADMMSparsifier has no proximal mode")
def test_plain_trainer_resume_finds_the_state_in_output_dir(tmp_path):
    """Without ADMMTrainer.train, a resumed run (global step > 0) reads output_dir/checkpoint-<step>/admm_state.pt."""

    def run(out, stop_at=None, resume=None):
        model = tiny_bert(seed=0 if resume is None else 7)
        admm = ADMMCallback(pattern="2:4", rho=200.0, penalty_mode="proximal", update_interval=3)
        Trainer(model=model, args=training_args(out, save_strategy="steps", save_steps=2),
                train_dataset=tiny_dataset(), callbacks=[admm] + ([StopAt(stop_at)] if stop_at else [])
                ).train(resume_from_checkpoint=resume)
        return model, admm

    ref_model, ref = run(tmp_path / "ref")
    run(tmp_path / "killed", stop_at=8)
    model, resumed = run(tmp_path / "killed", resume=str(tmp_path / "killed" / "checkpoint-8"))
    assert resumed.sparsifier.history == ref.sparsifier.history
    assert all(torch.equal(resumed.masks[k], ref.masks[k]) for k in ref.masks)
    ref_state = ref_model.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
