"""The shared training loop: step budget for fractional epochs, hook calls, bf16 autocast."""

import math

import pytest
import torch
from torch import nn

from nxm_deploy.training.loop import train_loop


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 2)

    def forward(self, x):
        return self.linear(x)


def _loader(batches=5):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, 8, generator=g), "y": torch.randint(0, 2, (4,), generator=g)} for _ in range(batches)]


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"]), {}


@pytest.mark.parametrize("epochs", [1.0, 2.4, 0.2])
def test_step_budget_and_hooks(epochs):
    steps, epoch_ends = [], []
    stats = train_loop(_Model(), _loader(), epochs=epochs, learning_rate=1e-2, weight_decay=0.0, warmup_ratio=0.0,
                       max_grad_norm=1.0, compute_loss=_loss, after_step=lambda s, _lr: steps.append(s), on_epoch_end=epoch_ends.append)
    assert stats["steps"] == math.ceil(epochs * 5) == len(steps)
    assert steps == list(range(1, stats["steps"] + 1))
    assert epoch_ends == list(range(int(stats["steps"] // 5)))  # only complete passes end an epoch


def test_training_reduces_loss_and_bf16_runs():
    for bf16 in (False, True):
        torch.manual_seed(0)
        model, data = _Model(), _loader()
        before = sum(float(_loss(model, b)[0]) for b in data)
        train_loop(model, data, epochs=20, learning_rate=5e-2, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=1.0,
                   compute_loss=_loss, bf16=bf16)
        after = sum(float(_loss(model, b)[0]) for b in data)
        assert after < before and model.linear.weight.dtype == torch.float32
