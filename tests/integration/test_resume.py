"""A killed training stage resumes from its Trainer checkpoints to the same result as an uninterrupted run.

Real RTE data, tiny random BERT with dropout on (so the global RNG state matters), ADMM with Z/U updates every 4
steps, a checkpoint every 3 steps. Two kinds of kill, both injected through the Trainer's public callback API into
the Trainer that the stage builds (``nxm_deploy.training.stage.build_trainer``), never by patching a library
function the library may stop calling:

* an exception from ``on_pre_optimizer_step`` (after the forward/backward, before ``optimizer.step``), i.e. between
  two checkpoints: the work since the last checkpoint is lost and redone;
* a real ``SIGKILL`` of a subprocess while the Trainer writes a checkpoint: the folder exists, with weights,
  optimizer and RNG states, but without its ``trainer_state.json``.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import nxm_deploy.training.stage as stage_module
from nxm_deploy.config.recipe import recipe_from_dict
from nxm_deploy.fileio import read_json
from nxm_deploy.errors import RunDirError
from nxm_deploy.run.layout import RunLayout
from nxm_deploy.run.reader import load_masks
from nxm_deploy.training.stage import train_admm, train_dense, train_qat

pytestmark = pytest.mark.slow


class _Killed(Exception):
    pass


class _KillAtStep(TrainerCallback):
    """Raise in the ``step``-th optimizer step of this process, counted over every Trainer it is added to."""

    def __init__(self, step: int):
        self.step, self.calls = step, 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.calls += 1
        if self.calls == self.step:
            raise _Killed(f"killed in step {self.step}")


def _recipe(base: dict, **admm):
    data = {**base, "train": {**base["train"], "checkpoint_every_steps": 3,
                              "admm": {**base["train"]["admm"], **admm}}}
    return recipe_from_dict(data)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tiny_recipe_dict_module, glue_dir):
    run_dir = tmp_path_factory.mktemp("resume_dense")
    train_dense(_recipe(tiny_recipe_dict_module), run_dir, str(glue_dir))
    return run_dir


def _fresh_run(tmp_path, dense_dir, name):
    run_dir = tmp_path / name
    run_dir.mkdir()
    shutil.copytree(dense_dir / "dense", run_dir / "dense")
    return run_dir


def _kill_at_step(monkeypatch, step: int) -> _KillAtStep:
    """Raise inside the ``step``-th optimizer step of this process (counted over every training loop of the stages)."""
    killer, real = _KillAtStep(step), stage_module.build_trainer

    def build(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(killer)
        return trainer

    monkeypatch.setattr(stage_module, "build_trainer", build)
    return killer


def _weights(run_dir, sub="sparse"):
    return load_file(str(run_dir / sub / "model.safetensors"))


# ADMM: 2 epochs x 8 steps (+ 4 masked fine-tune steps). Kill at step 11 (ADMM epoch 2, after the checkpoint at
# step 9 and the Z/U update at step 8) and at step 20 (masked fine-tune step 4, after its checkpoint at step 3; the
# ADMM loop resumes at its end and must leave the data order and RNG as the full run did).
@pytest.mark.parametrize("penalty_mode,rho,kill_step", [("gradient", 1e-2, 11), ("proximal", 100.0, 20)])
def test_killed_admm_stage_resumes_to_the_same_weights(tmp_path, monkeypatch, dense_dir, tiny_recipe_dict_module,
                                                        glue_dir, kill_step, penalty_mode, rho):
    recipe = _recipe(tiny_recipe_dict_module, penalty_mode=penalty_mode, rho=rho)
    ref_dir = _fresh_run(tmp_path, dense_dir, "ref")
    ref = train_admm(recipe, ref_dir, str(glue_dir))
    assert not RunLayout(ref_dir).checkpoints().exists()  # checkpoints are dropped once the artifact exists

    run_dir = _fresh_run(tmp_path, dense_dir, "killed")
    with monkeypatch.context() as m:
        _kill_at_step(m, kill_step)
        with pytest.raises(_Killed):
            train_admm(recipe, run_dir, str(glue_dir))
    assert list((RunLayout(run_dir).checkpoints("admm")).glob("*/checkpoint-*/trainer_state.json"))
    resumed = train_admm(recipe, run_dir, str(glue_dir))

    ref_w, got_w = _weights(ref_dir), _weights(run_dir)
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], got_w[name]), name
    ref_masks, got_masks = load_masks(ref_dir), load_masks(run_dir)
    assert all(torch.equal(ref_masks[k], got_masks[k]) for k in ref_masks)
    assert resumed["admm_history"] == ref["admm_history"]  # Z/U updates (rho, residuals, mask change) identical
    assert resumed["epoch_metrics"] == ref["epoch_metrics"] and resumed["metrics"] == ref["metrics"]
    resumed_loop = resumed["train"] if kill_step == 11 else resumed["masked_finetune"]
    assert resumed_loop["resumed_from_step"] == 9 if kill_step == 11 else resumed_loop["resumed_from_step"] == 3
    assert not RunLayout(run_dir).checkpoints().exists()


def test_killed_qat_stage_resumes_to_the_same_weights(tmp_path, monkeypatch, dense_dir, tiny_recipe_dict_module,
                                                     glue_dir):
    data = {**tiny_recipe_dict_module}
    data["train"] = {**data["train"], "checkpoint_every_steps": 1, "qat": {**data["train"]["qat"], "epochs": 1}}
    recipe = recipe_from_dict(data)
    ref_dir = _fresh_run(tmp_path, dense_dir, "ref")
    train_admm(recipe, ref_dir, str(glue_dir))
    run_dir = tmp_path / "killed"
    shutil.copytree(ref_dir, run_dir)
    train_qat(recipe, ref_dir, str(glue_dir))
    with monkeypatch.context() as m:
        _kill_at_step(m, 5)
        with pytest.raises(_Killed):
            train_qat(recipe, run_dir, str(glue_dir))
    manifest = train_qat(recipe, run_dir, str(glue_dir))
    assert manifest["train"]["resumed_from_step"] == 4
    ref_w, got_w = _weights(ref_dir, "qat"), _weights(run_dir, "qat")
    for name in ref_w:  # includes every learned amax
        assert torch.equal(ref_w[name], got_w[name]), name


def test_killed_dense_stage_resumes_to_the_same_weights(tmp_path, monkeypatch, dense_dir, tiny_recipe_dict_module,
                                                         glue_dir):
    recipe = _recipe(tiny_recipe_dict_module)  # 8 steps, checkpoints after steps 3 and 6; kill in step 5
    run_dir = tmp_path / "killed"
    with monkeypatch.context() as m:
        _kill_at_step(m, 5)
        with pytest.raises(_Killed):
            train_dense(recipe, run_dir, str(glue_dir))
    assert (RunLayout(run_dir).checkpoints("dense", "finetune") / "checkpoint-3").is_dir()
    manifest = train_dense(recipe, run_dir, str(glue_dir))
    assert manifest["resumed_from_step"] == 3 and manifest["steps"] == 8
    ref_w, got_w = _weights(dense_dir, "dense"), _weights(run_dir, "dense")
    for name in ref_w:
        assert torch.equal(ref_w[name], got_w[name]), name
    assert manifest["epoch_metrics"] == read_json(dense_dir / "dense" / "manifest.json")["epoch_metrics"]


def test_checkpoint_of_another_recipe_is_refused(tmp_path, monkeypatch, dense_dir, tiny_recipe_dict_module, glue_dir):
    run_dir = _fresh_run(tmp_path, dense_dir, "other")
    with monkeypatch.context() as m:
        _kill_at_step(m, 5)
        with pytest.raises(_Killed):
            train_admm(_recipe(tiny_recipe_dict_module, rho=1e-2), run_dir, str(glue_dir))
    with pytest.raises(RunDirError, match="other settings") as err:
        train_admm(_recipe(tiny_recipe_dict_module, rho=2e-2), run_dir, str(glue_dir))
    assert "Delete" in err.value.hint


def test_checkpoint_trained_from_another_input_model_is_refused(tmp_path, monkeypatch, dense_dir,
                                                                tiny_recipe_dict_module, glue_dir):
    """A killed QAT stage whose sparse input was replaced since (another sparse model, same recipe keys for QAT)
    must not resume: its checkpoints were trained from the other model."""
    data = {**tiny_recipe_dict_module}
    data["train"] = {**data["train"], "checkpoint_every_steps": 1, "qat": {**data["train"]["qat"], "epochs": 1}}
    recipe = recipe_from_dict(data)
    other = recipe_from_dict({**data, "train": {**data["train"], "admm": {**data["train"]["admm"], "rho": 2e-2}}})
    run_dir, other_dir = _fresh_run(tmp_path, dense_dir, "run"), _fresh_run(tmp_path, dense_dir, "other")
    train_admm(recipe, run_dir, str(glue_dir))
    train_admm(other, other_dir, str(glue_dir))  # QAT reads no train.admm: the same QAT settings
    with monkeypatch.context() as m:
        _kill_at_step(m, 5)
        with pytest.raises(_Killed):
            train_qat(recipe, run_dir, str(glue_dir))
    assert list(RunLayout(run_dir).checkpoints("qat").glob("*/checkpoint-*"))
    shutil.rmtree(run_dir / "sparse")
    shutil.copytree(other_dir / "sparse", run_dir / "sparse")
    with pytest.raises(RunDirError, match="other settings"):
        train_qat(recipe, run_dir, str(glue_dir))


# The child trains the ADMM stage with a callback that SIGKILLs its own process from inside the Trainer's checkpoint
# save: ``Trainer._save_checkpoint`` asks every ``ExportableState`` callback for its state after writing the weights,
# optimizer, scheduler and RNG states, and before writing ``trainer_state.json``.
_KILL_WHILE_SAVING = textwrap.dedent("""
    import json, os, signal, sys

    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    import nxm_deploy.training.stage as stage
    from nxm_deploy.config.recipe import recipe_from_dict

    recipe_path, run_dir, glue_dir, kill_step, threads = sys.argv[1:6]
    torch.set_num_threads(int(threads))

    class KillWhileSaving(TrainerCallback, ExportableState):
        step = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.step = state.global_step

        def state(self):
            if self.step == int(kill_step):
                os.kill(os.getpid(), signal.SIGKILL)
            return {"args": {}, "attributes": {}}

    real = stage.build_trainer

    def build(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(KillWhileSaving())
        return trainer

    stage.build_trainer = build
    with open(recipe_path) as fh:
        stage.train_admm(recipe_from_dict(json.load(fh)), run_dir, glue_dir)
""")


def test_kill_9_while_a_checkpoint_is_written_resumes_to_the_same_weights(tmp_path, dense_dir,
                                                                          tiny_recipe_dict_module, glue_dir, caplog):
    """Kill -9 at the moment ``checkpoint-9`` exists without its trainer state (ADMM epoch 2, after the complete
    checkpoint at the end of epoch 1, step 8), then rerun: the incomplete folder is removed with a warning, the
    run resumes from step 8 and ends bit-identical to an uninterrupted run."""
    data = {**tiny_recipe_dict_module, "train": {**tiny_recipe_dict_module["train"], "checkpoint_every_steps": 3}}
    recipe = recipe_from_dict(data)
    ref_dir = _fresh_run(tmp_path, dense_dir, "ref")
    ref = train_admm(recipe, ref_dir, str(glue_dir))

    run_dir = _fresh_run(tmp_path, dense_dir, "killed")
    (tmp_path / "recipe.json").write_text(json.dumps(data))
    (tmp_path / "child.py").write_text(_KILL_WHILE_SAVING)
    child = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "recipe.json"), str(run_dir),
                            str(glue_dir), "9", str(torch.get_num_threads())], capture_output=True, text=True,
                           timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    phase = RunLayout(run_dir).checkpoints("admm", "admm")
    assert (phase / "checkpoint-9").is_dir() and not (phase / "checkpoint-9" / "trainer_state.json").exists()
    assert (phase / "checkpoint-8" / "trainer_state.json").is_file()

    with caplog.at_level("WARNING", logger="nxm_deploy.training"):
        resumed = train_admm(recipe, run_dir, str(glue_dir))
    assert any("checkpoint-9 is incomplete" in r.getMessage() for r in caplog.records)
    assert resumed["train"]["resumed_from_step"] == 8
    ref_w, got_w = _weights(ref_dir), _weights(run_dir)
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], got_w[name]), name
    assert resumed["admm_history"] == ref["admm_history"] and resumed["metrics"] == ref["metrics"]
