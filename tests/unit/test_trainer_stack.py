"""The pipeline's Trainer pieces: KD loss in float32, weight-decay rule, resumable sampler, device/precision rules,
checkpoint fingerprints, best-epoch selection."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install accelerate)")

from nxm_deploy.config.recipe import recipe_from_dict  # noqa: E402
from nxm_deploy.data import get_task  # noqa: E402
from nxm_deploy.distillation import DistillationConfig, distillation_loss  # noqa: E402
from nxm_deploy.errors import ConfigError, RunDirError  # noqa: E402
from nxm_deploy.quantization import quantize_model_  # noqa: E402
from transformers.trainer import TRAINER_STATE_NAME  # noqa: E402

from nxm_deploy.training import trainer as tr  # noqa: E402
from tiny_models import tiny_bert, tiny_dataset, training_args  # noqa: E402


def _train_cfg(tiny_recipe_dict, **train):
    tiny_recipe_dict["train"].update(train)
    return recipe_from_dict(tiny_recipe_dict).train


def test_kd_loss_is_the_gpusq_loss_in_float32_under_bf16_autocast(tmp_path):
    student, teacher = tiny_bert(0), tiny_bert(1)
    cfg = DistillationConfig(alpha=0.5, beta=3.0, gamma=2.0, temperature=1.5)
    trainer = tr.NxmTrainer(model=student, args=training_args(tmp_path, bf16=True), train_dataset=tiny_dataset(),
                            teacher=teacher, distillation=cfg)
    batch = {k: torch.stack([row[k] for row in tiny_dataset()[:8]]) for k in ("input_ids", "attention_mask", "labels")}
    student.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.compute_loss(student, dict(batch))
    assert loss.dtype == torch.float32
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        s_out = student(**inputs, output_hidden_states=True)
        t_out = teacher(**inputs, output_hidden_states=True)
    expected, _ = distillation_loss(s_out.logits.float(), t_out.logits.float(), batch["labels"], cfg,
                                    [h.float() for h in s_out.hidden_states[1:]],
                                    [h.float() for h in t_out.hidden_states[1:]])
    # dropout is 0 in tiny_bert: the same forward, so the same float32 loss
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    student.eval()  # evaluation scores the model's own task loss, not KD
    assert torch.allclose(trainer.compute_loss(student, dict(batch)).detach(), student(**batch).loss.detach())


def test_teacher_with_another_label_set_is_refused(tmp_path):
    teacher = tiny_bert(1)
    teacher.config.id2label = {0: "yes", 1: "no"}
    student = tiny_bert(0)
    student.config.id2label = {0: "no", 1: "yes"}
    with pytest.raises(ConfigError, match="label set"):
        tr.NxmTrainer(model=student, args=training_args(tmp_path), train_dataset=tiny_dataset(), teacher=teacher)


def test_weight_decay_skips_bias_layernorm_and_amax():
    model = tiny_bert()
    quantize_model_(model, ["bert.encoder.layer.0.attention.self.query"])
    names = set(tr.decay_parameter_names(model))
    assert "bert.encoder.layer.0.attention.self.query.weight" in names
    assert "bert.embeddings.word_embeddings.weight" in names
    assert not any(n.endswith(".bias") or "LayerNorm" in n or n.endswith("amax") for n in names)
    assert any(n.endswith("amax") for n, _ in model.named_parameters())  # there was an amax to leave out


def test_sampler_order_depends_only_on_seed_and_epoch():
    lengths = [int(x) for x in torch.randint(3, 60, (200,), generator=torch.Generator().manual_seed(0))]
    sampler = tr.EpochSeededLengthGroupedSampler(lengths, batch_size=8, seed=3)
    first = list(sampler)
    torch.manual_seed(123)  # the global RNG must not matter
    assert list(sampler) == first and sorted(first) == list(range(200))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    other = tr.EpochSeededLengthGroupedSampler(lengths, batch_size=8, seed=3)
    other.set_epoch(1)
    assert list(other) == second


def test_device_and_precision_rules(monkeypatch):
    assert tr.resolve_precision("auto", "cpu") == "fp32"
    assert tr.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        tr.resolve_precision("fp16", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tr.resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device"):
        tr.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert tr.resolve_precision("auto", "cuda") == "bf16"
    assert tr.resolve_precision("auto", "cuda", quantized=True) == "fp32"  # INT8 QAT stays float32


def test_global_batch_is_split_over_processes():
    assert tr.per_device_batch_size(32, 2) == 16 and tr.per_device_batch_size(32, 1) == 32
    with pytest.raises(ConfigError, match="world size 3"):
        tr.per_device_batch_size(32, 3)


def test_checkpoints_of_another_recipe_or_world_size_are_refused(tmp_path, monkeypatch):
    tr.check_fingerprint(tmp_path, "abc")
    assert json.loads((tmp_path / tr.FINGERPRINT_FILE).read_text()) == {"fingerprint": "abc", "world_size": 1}
    tr.check_fingerprint(tmp_path, "abc")  # same run: accepted
    with pytest.raises(RunDirError, match="other settings"):
        tr.check_fingerprint(tmp_path, "xyz")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunDirError, match="another world size") as err:
        tr.check_fingerprint(tmp_path, "abc")
    assert "Delete" in err.value.hint


@pytest.mark.parametrize("select", ["best", "last"])
def test_select_keeps_the_best_or_the_last_epoch(tmp_path, tiny_recipe_dict, monkeypatch, select):
    """Dev scores 0.5, 0.9, 0.6 over three epochs: ``best`` keeps epoch 2's weights, ``last`` epoch 3's."""
    scores = iter([0.5, 0.9, 0.6, 0.0])
    monkeypatch.setattr(tr.TaskMetrics, "__call__", lambda self, p: {"accuracy": next(scores)})
    snapshots = {}

    class Snapshot(tr.TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            snapshots[round(state.epoch)] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    cfg = _train_cfg(tiny_recipe_dict, select=select, batch_size=8, seed=0)
    data = SimpleNamespace(task=get_task("rte"), train=tiny_dataset(), dev=tiny_dataset(16, seed=2), collator=None)
    model = tiny_bert()
    trainer = tr.build_trainer(model, data, cfg, output_dir=tmp_path, epochs=3, learning_rate=1e-3,
                               callbacks=[Snapshot()], disable_tqdm=True)
    stats = tr.train_resumable(trainer, "fp")
    assert [e["accuracy"] for e in stats["epoch_metrics"]] == [0.5, 0.9, 0.6]
    kept = 2 if select == "best" else 3
    assert stats["selected_epoch"] == kept and stats["steps"] == 12
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[kept][key]), key


def test_kd_and_admm_terms_reach_the_training_log(tmp_path):
    """The loss parts the old loop showed in its progress bar: KD hard/soft/feature and the ADMM penalty, as means
    over the steps since the last log, in the Trainer's log history (one log per epoch here)."""
    admm = tr.ADMMCallback(pattern="2:4", rho=0.05, squash_at_end=False)
    trainer = tr.NxmTrainer(model=tiny_bert(0), args=training_args(tmp_path, num_train_epochs=2, logging_strategy="epoch"),
                            train_dataset=tiny_dataset(), teacher=tiny_bert(1), admm=admm)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2
    for entry in logs:
        assert {"kd_hard", "kd_soft", "kd_feature", "admm_penalty"} <= set(entry), entry
        assert entry["kd_hard"] > 0 and entry["admm_penalty"] > 0
    # the mean of each epoch's terms (the accumulators are reset after each log)
    assert logs[0]["admm_penalty"] != logs[1]["admm_penalty"]


def test_progress_bars_stay_on_unless_quiet(tmp_path, tiny_recipe_dict, monkeypatch):
    """The CLI keeps transformers' own log level at "error", which would turn the Trainer's bars off."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
        cfg = _train_cfg(tiny_recipe_dict)
        assert tr.training_arguments(tmp_path, cfg, epochs=1, learning_rate=1e-4).disable_tqdm is False
        monkeypatch.setenv("TQDM_DISABLE", "1")  # nxm-deploy -q
        assert tr.training_arguments(tmp_path, cfg, epochs=1, learning_rate=1e-4).disable_tqdm is True
    finally:
        hf_logging.set_verbosity(previous)


def test_last_complete_checkpoint_skips_folders_a_kill_while_saving_left(tmp_path, caplog):
    """The newest usable checkpoint: ``trainer_state.json`` whole, and the files callbacks write in ``on_save``."""
    def checkpoint(step, state='{"global_step": %d}', extra=()):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if state is not None:
            (path / TRAINER_STATE_NAME).write_text(state % step if "%d" in state else state)
        for name in extra:
            (path / name).write_bytes(b"x")
        return path

    checkpoint(3, extra=(tr.ADMM_STATE_NAME,))
    checkpoint(6)  # trainer state written, killed before the ADMM callback's on_save
    checkpoint(9, state='{"global_step": 9, "log_hi')  # killed while trainer_state.json was written
    checkpoint(12, state=None)  # killed while the weights were written
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name: ignored
    assert tr.last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    assert tr.last_complete_checkpoint(tmp_path / "absent") is None
    caplog.clear()
    with caplog.at_level("WARNING", logger="nxm_deploy.training"):
        found = tr.last_complete_checkpoint(tmp_path, (tr.ADMM_STATE_NAME,), remove_incomplete=True)
    assert found == str(tmp_path / "checkpoint-3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-x"]
    assert sum("incomplete" in r.getMessage() for r in caplog.records) == 3
