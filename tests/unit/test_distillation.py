"""KD loss terms of GPUSQ-TLM: hard CE, soft KL with T^2, feature MSE; regression and unlabeled paths."""

import math

import pytest
import torch
import torch.nn.functional as F

from nxm_deploy.distillation import DistillationConfig, distillation_loss


def _logits(seed, shape=(4, 3)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_terms_match_definitions():
    s, t = _logits(0), _logits(1)
    labels = torch.tensor([0, 2, 1, 1])
    hs = [torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ht = [torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]
    cfg = DistillationConfig(alpha=1.0, beta=10.0, gamma=1.0, temperature=2.0)
    loss, parts = distillation_loss(s, t, labels, cfg, hs, ht)
    hard = F.cross_entropy(s, labels)
    p_t = F.softmax(t / 2, -1)
    soft = (p_t * (p_t.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4  # KL(t||s) * T^2
    feature = F.mse_loss(s, t) + sum(F.mse_loss(a, b) for a, b in zip(hs, ht))
    assert parts["hard"] == pytest.approx(float(hard), rel=1e-5)
    assert parts["soft"] == pytest.approx(10 * float(soft), rel=1e-5)
    assert parts["feature"] == pytest.approx(float(feature), rel=1e-5)
    assert float(loss) == pytest.approx(float(hard + 10 * soft + feature), rel=1e-5)


def test_soft_loss_zero_for_identical_logits_and_weights_zero_terms():
    s = _logits(0)
    loss, parts = distillation_loss(s, s.clone(), torch.tensor([0, 1, 2, 0]), DistillationConfig(alpha=0, gamma=0))
    assert parts["soft"] == pytest.approx(0.0, abs=1e-6) and parts["hard"] == 0 and parts["feature"] == 0
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_unlabeled_uses_teacher_argmax():
    s, t = _logits(0), _logits(1)
    _, parts = distillation_loss(s, t, None, DistillationConfig(beta=0, gamma=0))
    assert parts["hard"] == pytest.approx(float(F.cross_entropy(s, t.argmax(-1))), rel=1e-6)


def test_regression_uses_mse():
    s, t = _logits(0, (4, 1)), _logits(1, (4, 1))
    y = torch.tensor([0.5, 1.0, 4.0, 2.5])
    _, parts = distillation_loss(s, t, y, DistillationConfig(beta=1.0, gamma=0))
    assert parts["hard"] == pytest.approx(float(F.mse_loss(s.squeeze(-1), y)), rel=1e-6)
    assert parts["soft"] == pytest.approx(float(F.mse_loss(s, t)), rel=1e-6)


def test_gradient_flows_to_student_only():
    s = _logits(0).requires_grad_()
    t = _logits(1).requires_grad_()
    loss, _ = distillation_loss(s, t, torch.tensor([0, 1, 2, 0]), DistillationConfig())
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="teacher logits"):
        distillation_loss(_logits(0, (4, 3)), _logits(1, (4, 2)), None, DistillationConfig())


def test_temperature_must_be_positive():
    with pytest.raises(Exception):
        DistillationConfig(temperature=0)
    assert math.isclose(DistillationConfig().beta, 10.0)


def test_teacher_with_another_label_set_is_refused():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from nxm_deploy.distillation import check_teacher
    from nxm_deploy.errors import ConfigError

    def model(**kw):
        cfg = AutoConfig.for_model("bert", vocab_size=50, num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                   intermediate_size=32, **kw)
        return AutoModelForSequenceClassification.from_config(cfg)

    student = model(num_labels=2, id2label={0: "entailment", 1: "not_entailment"})
    check_teacher(student, model(num_labels=2, id2label={0: "entailment", 1: "not_entailment"}))  # same: fine
    with pytest.raises(ConfigError, match="teacher label set 3 labels") as err:
        check_teacher(student, model(num_labels=3))
    assert "same task" in err.value.hint
    with pytest.raises(ConfigError, match="'not_entailment'"):  # same count, other order
        check_teacher(student, model(num_labels=2, id2label={0: "not_entailment", 1: "entailment"}))
    with pytest.raises(ConfigError, match="1 labels"):  # regression teacher for a classifier
        check_teacher(student, model(num_labels=1))
