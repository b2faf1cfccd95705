"""The shared training loop: AdamW + linear warm-up/decay + gradient clipping, with hooks for ADMM, KD and masks.

The loop is deliberately small: everything method-specific (ADMM penalty, KD teacher forward, mask
enforcement) enters through ``compute_loss`` and ``after_step``/``on_epoch_end`` hooks, which is where
``transformers.Trainer`` would need subclassing in several places.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from nxm_deploy.data.metrics import compute_metrics
from nxm_deploy.errors import RunDirError

log = logging.getLogger("nxm_deploy.training")

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


CHECKPOINT_FILE = "loop_state.pt"


def _loader_generator(loader) -> torch.Generator | None:
    """The ``torch.Generator`` that drives the loader's shuffling (sampler's first, then the loader's), if any."""
    for owner in (getattr(loader, "sampler", None), loader):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator):
            return gen
    return None


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write the loop state atomically (temp file + ``os.replace``): a kill never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, fingerprint: str | None) -> dict | None:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        raise RunDirError(
            f"Checkpoint {path} was written by a run with other settings (fingerprint {state.get('fingerprint')}, "
            f"this run {fingerprint}); resuming from it would mix two trainings.",
            hint=f"Delete {path.parent} to start this stage over, or rerun with the recipe that wrote it.",
        )
    return state


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
    after_step: Callable[[int, float], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    desc: str = "train",
    bf16: bool = False,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    checkpoint_fingerprint: str | None = None,
    extra_state: tuple[Callable[[], dict], Callable[[dict], None]] | None = None,
) -> dict:
    """Train ``model`` for ``epochs`` (fractional allowed) over ``loader``; resumable from its own checkpoints.

    Args:
        compute_loss: ``(model, batch) -> (loss, logs)``; ``logs`` are floats shown in the progress bar.
        after_step: called with ``(global step, learning rate used by that step)`` after every
            ``optimizer.step()`` (e.g. re-apply masks, ADMM proximal step).
        on_epoch_end: called with the epoch index after every full pass (e.g. ADMM Z/U update).
        bf16: run forward/backward under ``torch.autocast(device_type="cpu", dtype=torch.bfloat16)``
            (mixed precision: weights, optimizer state and the ADMM penalty stay float32).
        checkpoint_dir: where ``loop_state.pt`` is written after every ``checkpoint_every`` steps (default: at
            the end of every epoch) and at the end: model, AdamW and scheduler state, step, epoch, position in
            the epoch, the shuffling generator's state at the start of the epoch, the global torch RNG state
            (dropout), and ``extra_state[0]()`` (e.g. ADMM Z, U, rho, masks). When the file exists at the start,
            training resumes from it (the batches already seen in the current epoch are skipped, in the same
            shuffled order), so a killed run ends with the same weights as an uninterrupted one.
        checkpoint_fingerprint: stored in the checkpoint; a checkpoint with another value is refused.
        extra_state: ``(get, set)`` callables for caller state saved with / restored from the checkpoint.

    Returns:
        dict: ``steps``, ``seconds`` (this process only), ``final_loss`` (mean over the last 20 steps),
        ``resumed_from_step`` (0 for a fresh start).

    Raises:
        RunDirError: the checkpoint in ``checkpoint_dir`` has another fingerprint.
    """
    from transformers import get_linear_schedule_with_warmup

    steps_per_epoch = len(loader)
    total_steps = max(1, math.ceil(epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
    generator = _loader_generator(loader)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    step, epoch, skip, recent, pending_rng = 0, 0, 0, [], None
    epoch_gen_state = generator.get_state() if generator is not None else None
    resumed = ckpt_path is not None and (state := _load_checkpoint(ckpt_path, checkpoint_fingerprint)) is not None
    if resumed:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, skip, recent = state["step"], state["epoch"], state["in_epoch"], list(state["recent"])
        epoch_gen_state = state["generator"]
        # The global RNG (dropout; DataLoader draws a base seed from it when an iterator is created) is restored
        # where it was saved: before the next epoch's iterator at an epoch boundary, after skipping mid-epoch.
        pending_rng = state["torch_rng"]
        if skip == 0:
            torch.set_rng_state(pending_rng)
            pending_rng = None
        if extra_state is not None:
            extra_state[1](state["extra"])
        log.info("%s: resumed from %s at step %d/%d (epoch %d, batch %d)", desc, ckpt_path, step, total_steps,
                 epoch + 1, skip)
    resumed_from = step

    def save(in_epoch: int, gen_state) -> None:
        if ckpt_path is None:
            return
        _save_checkpoint(ckpt_path, {
            "fingerprint": checkpoint_fingerprint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch, "in_epoch": in_epoch,
            "recent": recent, "generator": gen_state, "torch_rng": torch.get_rng_state(),
            "extra": extra_state[0]() if extra_state is not None else None, "total_steps": total_steps,
        })

    model.train()
    start = time.perf_counter()
    with tqdm(total=total_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True) as bar:
        while step < total_steps:
            if generator is not None:
                generator.set_state(epoch_gen_state)
            in_epoch = 0
            for batch in loader:
                if in_epoch < skip:  # resume: batches this epoch already trained on, same order
                    in_epoch += 1
                    continue
                if pending_rng is not None:
                    torch.set_rng_state(pending_rng)
                    pending_rng = None
                with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss, logs = compute_loss(model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                lr_used = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                in_epoch += 1
                if after_step is not None:
                    after_step(step, lr_used)
                recent = (recent + [float(loss.detach())])[-20:]
                bar.set_postfix({"loss": f"{np.mean(recent):.4f}", **{k: f"{v:.3g}" for k, v in logs.items()}})
                bar.update(1)
                if step >= total_steps:
                    break
                if checkpoint_every and step % checkpoint_every == 0 and in_epoch < steps_per_epoch:
                    save(in_epoch, epoch_gen_state)
            skip = 0
            if in_epoch == steps_per_epoch and on_epoch_end is not None:
                on_epoch_end(epoch)
            epoch += 1
            epoch_gen_state = generator.get_state() if generator is not None else None
            save(0, epoch_gen_state)  # epoch boundary (and the end): the next epoch starts from this state
    if generator is not None:  # a loop resumed at its end leaves the shuffling state as the full run did
        generator.set_state(epoch_gen_state)
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - start, 2), "final_loss": float(np.mean(recent)),
            "resumed_from_step": resumed_from}


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
