"""The shared training loop: AdamW + linear warm-up/decay + gradient clipping, with hooks for ADMM, KD and masks.

The loop is deliberately small: everything method-specific (ADMM penalty, KD teacher forward, mask
enforcement) enters through ``compute_loss`` and ``after_step``/``on_epoch_end`` hooks, which is where
``transformers.Trainer`` would need subclassing in several places.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from nxm_deploy.data.metrics import compute_metrics

LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "LayerNorm" in name or "layernorm" in name or name.endswith("amax"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_loop(
    model: nn.Module,
    loader,
    *,
    epochs: float,
    learning_rate: float,
    weight_decay: float,
    warmup_ratio: float,
    max_grad_norm: float,
    compute_loss: LossFn,
    after_step: Callable[[int], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    desc: str = "train",
    bf16: bool = False,
) -> dict:
    """Train ``model`` for ``epochs`` (fractional allowed) over ``loader``.

    Args:
        compute_loss: ``(model, batch) -> (loss, logs)``; ``logs`` are floats shown in the progress bar.
        after_step: called with the global step after every ``optimizer.step()`` (e.g. re-apply masks).
        on_epoch_end: called with the epoch index after every full pass (e.g. ADMM Z/U update).
        bf16: run forward/backward under ``torch.autocast(device_type="cpu", dtype=torch.bfloat16)``
            (mixed precision: weights, optimizer state and the ADMM penalty stay float32).

    Returns:
        dict: ``steps``, ``seconds``, ``final_loss`` (mean over the last 20 steps).
    """
    from transformers import get_linear_schedule_with_warmup

    steps_per_epoch = len(loader)
    total_steps = max(1, math.ceil(epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
    model.train()
    step, recent, start = 0, [], time.perf_counter()
    with tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True) as bar:
        epoch = 0
        while step < total_steps:
            in_epoch = 0
            for batch in loader:
                with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss, logs = compute_loss(model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                in_epoch += 1
                if after_step is not None:
                    after_step(step)
                recent = (recent + [float(loss.detach())])[-20:]
                bar.set_postfix({"loss": f"{np.mean(recent):.4f}", **{k: f"{v:.3g}" for k, v in logs.items()}})
                bar.update(1)
                if step >= total_steps:
                    break
            if in_epoch == steps_per_epoch and on_epoch_end is not None:
                on_epoch_end(epoch)
            epoch += 1
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - start, 2), "final_loss": float(np.mean(recent))}


@torch.no_grad()
def predict(model: nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``[B, C]`` float32 and labels ``[B]`` of a whole loader, in loader order (model in eval mode)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        batch = dict(batch)
        labels.append(batch.pop("labels").numpy())
        logits.append(model(**batch).logits.float().numpy())
    model.train(was_training)
    return np.concatenate(logits), np.concatenate(labels)


def evaluate(model: nn.Module, loader, task) -> dict[str, float]:
    """Task metrics (GLUE registry) of ``model`` on ``loader``."""
    logits, labels = predict(model, loader)
    return compute_metrics(task, logits, labels)
