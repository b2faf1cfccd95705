"""The one training stack: nxm-deploy's methods as ``transformers.Trainer`` pieces (CPU, CUDA, DDP under torchrun).

Used by the pipeline's stages (:mod:`nxm_deploy.training.stage`) and by users' own Trainer scripts
(:mod:`nxm_deploy.integrations` re-exports the public pieces):

* :class:`ADMMCallback` + :class:`ADMMTrainerMixin` / :class:`ADMMTrainer`: ADMM n:m (below);
* :class:`MaskedFinetuneCallback`: fixed masks re-applied after every optimizer step (masked fine-tune, QAT);
* :class:`DistillationTrainerMixin`: GPUSQ-TLM hard/soft/feature KD with a frozen teacher, losses in float32;
* :class:`NxmTrainer`: all of the above in one Trainer, our weight-decay rule and a resumable length-grouped order;
* :func:`build_trainer` / :func:`training_arguments` / :func:`train_resumable` / :func:`dev_metrics`: one
  training phase of a stage from the recipe's ``train`` section (device, precision, epoch selection, checkpoints
  with a fingerprint), and the device / precision / world-size rules (:func:`resolve_device`,
  :func:`resolve_precision`, :func:`per_device_batch_size`).

ADMM n:m sparsification inside a Hugging Face ``transformers.Trainer`` run (single process or DDP).

A run_glue-style script becomes an ADMM n:m run by swapping ``Trainer`` for :class:`ADMMTrainer`::

    admm = ADMMCallback(pattern="2:4", rho=4e-3)           # targets: every Linear under "*.layer.*"
    trainer = ADMMTrainer(model=model, args=args, train_dataset=train_ds, admm=admm)
    trainer.train()                                        # afterwards every target weight is exactly n:m
    masks = admm.masks                                     # tensor fqn -> bool mask (True = keep)

Method: NxMTransformer (Holmes, Zhang, He, Wu, "NxMTransformer: Semi-Structured Sparsification for Natural
Language Understanding via ADMM", NeurIPS 2021), scaled-form ADMM on ``min f(W) s.t. W in S`` (S = n:m set;
method-notes 1.2-1.3):

* W-step, every optimizer step: :meth:`ADMMTrainerMixin.compute_loss` adds ``rho/2 * sum_i ||W_i - Z_i + U_i||^2``
  to the task loss, so the gradient ``rho * (W - Z + U)`` joins the task gradient (the authors' code does this).
  With the sparsifier's ``penalty_mode="proximal"`` the loss stays task-only and the callback applies the exact
  proximal step ``W <- (W + lr*rho*(Z - U)) / (1 + lr*rho)`` after each optimizer step instead (any Trainer).
* Z/U-step: :class:`ADMMCallback` runs ``Z <- Proj(W + U)``, ``U <- U + W - Z`` after the optimizer step that
  completes an epoch (the authors' schedule), or every ``update_interval`` optimizer steps.
* End: ``on_train_end`` hard-projects ``W <- Proj(W)`` (:meth:`ADMMSparsifier.squash_mask`).
* Evaluation during ADMM scores the hard-projected model, dense W restored afterwards (the authors' evaluation).

Checkpoints: each ``output_dir/checkpoint-<step>/`` gets ``admm_state.pt`` (Z, U, rho, update count, masks,
history, schedule position), written by the main process only. ``trainer.train(resume_from_checkpoint=...)``
restores it, so a run killed after a checkpoint resumes to the same final weights.

DDP (``torchrun``): the Trainer trains the wrapped model (``DistributedDataParallel``); the sparsifier holds
tensor fqns of the *unwrapped* model (``trainer.model``), whose parameters are the very tensors DDP trains and
all-reduces. The penalty's gradient is the same on every rank (identical W, Z, U), so the DDP mean keeps it.
After each Z/U update, ``ddp_sync`` broadcasts Z, U and masks from rank 0 (default) or checks they agree.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, get_args

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME  # the Trainer's last write in a checkpoint; on_save comes after
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from nxm_deploy.ranks import barrier, is_main_process, world_size
from nxm_deploy.config.recipe import TrainConfig
from nxm_deploy.data.loader import EpochSeededLengthGroupedSampler
from nxm_deploy.distillation.losses import DistillationConfig, check_teacher, distillation_loss
from nxm_deploy.errors import ConfigError, NxmError, RunDirError
from nxm_deploy.sparsity.admm import ADMMSparsifier, apply_masks_
from nxm_deploy.sparsity.targets import DEFAULT_INCLUDE, LayerDecision, require_targets, target_names

log = logging.getLogger("nxm_deploy.training")

#: File name of the ADMM state inside each Trainer checkpoint directory.
ADMM_STATE_NAME = "admm_state.pt"
_STATE_FORMAT = 1
_SYNC_MODES = ("broadcast", "check", "off")
_SPARSIFIER_KEYS = ("pattern", "rho", "rho_factor", "rho_max", "u_init", "penalty_mode")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def _globs(value: Iterable[str] | str, what: str) -> tuple[str, ...]:
    globs = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(g, str) and g for g in globs):
        raise ConfigError(f"ADMMCallback {what}={value!r}: every rule must be a non-empty fnmatch glob string.",
                          hint="e.g. include=['*.layer.*'], exclude=['*.attention.output.dense'].")
    return globs


class ADMMCallback(TrainerCallback):
    """Trainer callback that runs the ADMM n:m schedule: prepare, Z/U updates, checkpoint state, hard projection.

    In ``penalty_mode="gradient"`` (default) use it with :class:`ADMMTrainer` (or a Trainer subclass with
    :class:`ADMMTrainerMixin`), which adds the penalty to the loss; with a plain ``Trainer`` the first optimizer
    step raises :class:`ConfigError`.

    Args:
        sparsifier (ADMMSparsifier | Mapping | None): an unprepared :class:`ADMMSparsifier`, or a mapping of its
            arguments (``pattern``, ``rho``, ``rho_factor``, ``rho_max``, ``u_init``). Defaults to None: built
            from the keyword arguments below.
        pattern (str | NMPattern | None): n:m pattern, e.g. ``"2:4"`` (2 nonzeros kept in every 4 consecutive
            weights along the input axis). Defaults to ``"2:4"``.
        rho (float | None): penalty weight (> 0). Defaults to ``DEFAULT_RHO`` (4e-3, as the recipe).
        rho_factor (float | None): rho is multiplied by this after each Z/U update (>= 1). Defaults to 1.0.
        rho_max (float | None): cap of the increasing rho schedule. Defaults to no cap.
        u_init (str | None): ``"zero"`` or ``"residual"`` (see :class:`ADMMSparsifier`). Defaults to ``"zero"``.
        penalty_mode (str | None): ``"gradient"`` (penalty in the loss; needs :class:`ADMMTrainer`) or
            ``"proximal"`` (prox step after each optimizer step, by this callback; any Trainer). Defaults to the
            sparsifier's default, ``"gradient"``.
        include (Iterable[str] | None): fnmatch globs over module fqns of the (unwrapped) model; every glob must
            match at least one ``nn.Linear``. Defaults to None: the architecture registry's Q, K, V, attention
            output, MLP up and down of every block (:mod:`nxm_deploy.architectures`); pooler and classifier stay
            dense.
        exclude (Iterable[str]): globs removed from the targets. Defaults to none.
        update_interval (str | int): ``"epoch"`` (Z/U update after the optimizer step that completes each epoch,
            the authors' schedule) or a number of optimizer steps >= 1. Defaults to ``"epoch"``.
        squash_at_end (bool): hard-project the targets in ``on_train_end``. Defaults to True; with False call
            :meth:`finish` yourself.
        ddp_sync (str): after each Z/U update under ``torch.distributed``: ``"broadcast"`` Z, U and masks from
            rank 0, ``"check"`` that all ranks hold the same (raises :class:`NxmError` otherwise), or ``"off"``.
            Defaults to ``"broadcast"``.
        resume_from_checkpoint (str | None): checkpoint directory to restore the ADMM state from at the next
            ``on_train_begin``. :meth:`ADMMTrainer.train` sets it; with neither, a resumed run (global step > 0)
            reads ``args.output_dir/checkpoint-<step>``. Defaults to None.

    Attributes:
        sparsifier (ADMMSparsifier): the ADMM state; prepared on ``on_train_begin``.
        decisions (list[LayerDecision]): every ``nn.Linear`` and why it is or is not a target.

    Raises:
        ConfigError: for a non-positive rho (and every other bad sparsifier argument), a sparsifier given together
            with sparsifier keywords, an unknown key in the mapping, empty or non-string globs, a bad
            ``update_interval`` or ``ddp_sync``.
    """

    def __init__(
        self,
        sparsifier: ADMMSparsifier | Mapping[str, Any] | None = None,
        *,
        pattern=None,
        rho: float | None = None,
        rho_factor: float | None = None,
        rho_max: float | None = None,
        u_init: str | None = None,
        penalty_mode: str | None = None,
        include: Iterable[str] | None = DEFAULT_INCLUDE,
        exclude: Iterable[str] = (),
        update_interval: str | int = "epoch",
        squash_at_end: bool = True,
        ddp_sync: str = "broadcast",
        resume_from_checkpoint: str | None = None,
    ):
        given = {"pattern": pattern, "rho": rho, "rho_factor": rho_factor, "rho_max": rho_max, "u_init": u_init,
                 "penalty_mode": penalty_mode}
        given = {k: v for k, v in given.items() if v is not None}
        if sparsifier is None:
            sparsifier = ADMMSparsifier(**given)
        elif isinstance(sparsifier, Mapping):
            unknown = sorted(set(sparsifier) - set(_SPARSIFIER_KEYS))
            if unknown:
                raise ConfigError(f"ADMMCallback sparsifier config has unknown key(s) {unknown}: allowed keys are "
                                  f"{list(_SPARSIFIER_KEYS)}.")
            sparsifier = ADMMSparsifier(**{**dict(sparsifier), **given})
        elif isinstance(sparsifier, ADMMSparsifier):
            if given:
                raise ConfigError(f"ADMMCallback got an ADMMSparsifier and the keyword(s) {sorted(given)}: the "
                                  "sparsifier already fixes them.", hint="Pass either the sparsifier or keywords.")
            if sparsifier.model is not None:
                raise ConfigError("ADMMCallback got an ADMMSparsifier that is already prepared: the callback "
                                  "prepares it on on_train_begin.", hint="Pass a fresh ADMMSparsifier.")
        else:
            raise ConfigError(f"ADMMCallback sparsifier={type(sparsifier).__name__}: must be an ADMMSparsifier, a "
                              "mapping of its arguments, or None.")
        if isinstance(update_interval, bool) or not (
            update_interval == "epoch" or (isinstance(update_interval, int) and update_interval >= 1)
        ):
            raise ConfigError(f"ADMMCallback update_interval={update_interval!r}: must be 'epoch' or a number of "
                              "optimizer steps >= 1.", hint="'epoch' is the authors' schedule.")
        if ddp_sync not in _SYNC_MODES:
            raise ConfigError(f"ADMMCallback ddp_sync={ddp_sync!r} is not one of {list(_SYNC_MODES)}.")
        self.sparsifier = sparsifier
        self.include = None if include is None else _globs(include, "include")
        self.exclude = _globs(exclude, "exclude")
        if self.include is not None and not self.include:
            raise ConfigError("ADMMCallback include=[]: at least one include glob is needed to select targets.",
                              hint="Leave include out (None) for the architecture registry's projections.")
        self.update_interval = update_interval
        self.squash_at_end = bool(squash_at_end)
        self.ddp_sync = ddp_sync
        self.resume_from_checkpoint = resume_from_checkpoint
        self.decisions: list[LayerDecision] = []
        self._epochs_done = 0
        self._penalty_calls = 0
        self._warned = False

    @classmethod
    def from_recipe(cls, recipe, **overrides) -> "ADMMCallback":
        """Build from a recipe's ``sparsity`` and ``train.admm`` sections (pattern, globs, rho schedule, interval).

        Raises:
            ConfigError: when ``sparsity.method`` is not ``admm``.
        """
        acfg = recipe.train.admm
        if recipe.sparsity.method != "admm":
            raise ConfigError(f"sparsity.method={recipe.sparsity.method!r}: ADMMCallback runs method 'admm' only.")
        kwargs = dict(pattern=recipe.sparsity.pattern, rho=acfg.rho, rho_factor=acfg.rho_factor,
                      rho_max=acfg.rho_max, u_init=acfg.u_init, include=recipe.sparsity.include,
                      exclude=list(recipe.sparsity.exclude), update_interval=acfg.update_interval)
        if getattr(acfg, "penalty_mode", "gradient") != "gradient":
            kwargs["penalty_mode"] = acfg.penalty_mode
        return cls(**{**kwargs, **overrides})

    # -- public helpers --------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True between :meth:`setup` and the hard projection: the penalty applies and updates run."""
        return self.sparsifier.model is not None and not self.sparsifier.squashed

    @property
    def proximal(self) -> bool:
        """True when the sparsifier's ``penalty_mode`` is ``"proximal"``: no loss term, a prox step per step."""
        return getattr(self.sparsifier, "penalty_mode", "gradient") == "proximal"

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Current masks, ``tensor fqn -> bool [out, in]`` (True = keep); final after the hard projection."""
        return dict(self.sparsifier.masks)

    def setup(self, model: nn.Module) -> None:
        """Select the targets of ``model`` (wrappers removed) and prepare the sparsifier: Z = Proj(W), U per u_init.

        Called by ``on_train_begin``; call it yourself only to use the penalty outside a Trainer run.

        Raises:
            ConfigError: when an include glob matches no ``nn.Linear``, when no Linear is a target, or when this
                callback has already hard-projected (one callback = one ADMM run).
        """
        if self.sparsifier.squashed:
            raise ConfigError("ADMMCallback already finished its ADMM run (hard projection done).",
                              hint="Use MaskedFinetuneCallback(admm.masks) to train further, or a new ADMMCallback.")
        model = unwrap_model(model)
        decisions = require_targets(model, self.sparsifier.pattern, self.include, self.exclude)
        names = target_names(decisions)
        self.sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name in names])
        self.decisions = decisions
        self._epochs_done = 0
        self._penalty_calls = 0
        self._warned = False
        log.info("ADMM %s: %d target layers (rho=%g, update %s)", self.sparsifier.pattern, len(names),
                 self.sparsifier.rho, self.update_interval)

    def penalty(self) -> torch.Tensor:
        """``rho/2 * sum_i ||W_i - Z_i + U_i||_F^2`` of the current weights: float32 scalar, differentiable in W.

        Raises:
            ConfigError: when the callback is not set up (no ``on_train_begin`` / :meth:`setup` yet).
        """
        if not self.active:
            raise ConfigError("ADMMCallback.penalty(): no active ADMM run (not set up yet, or already projected).")
        self._penalty_calls += 1
        return self.sparsifier.penalty()

    def update(self, state=None) -> dict:
        """One Z/U update now (plus the DDP sync); returns the sparsifier's record (residuals, mask change, rho)."""
        record = self.sparsifier.step()
        self._sync_ranks()
        if state is not None:
            record["global_step"] = state.global_step
            record["epoch"] = state.epoch
        log.info("ADMM Z/U update %s", record)
        # Z flipping many kept/pruned choices again and again means the W-step does not follow Z - U between
        # updates: U piles up the residual faster than W moves.
        if record.get("update", 0) >= 2 and record.get("mask_change", 0.0) > 0.25 and not self._warned:
            self._warned = True
            advice = "a larger rho or learning rate, or more steps between updates"
            if self.update_interval != "epoch":
                advice = "update_interval: epoch (the authors' schedule), " + advice
            if not self.proximal:
                advice += ", or penalty_mode: proximal"
            log.warning("ADMM oscillates: update %d changed %.0f%% of the mask; the W-step does not reach Z - U "
                        "between updates. Try %s.", record["update"], 100 * record["mask_change"], advice)
        return record

    def finish(self) -> dict[str, torch.Tensor]:
        """Hard projection ``W <- Proj(W)`` of every target; returns the final masks (see :attr:`masks`)."""
        masks = self.sparsifier.squash_mask()
        log.info("ADMM hard projection: %d layers now exactly %s", len(masks), self.sparsifier.pattern)
        return masks

    def state_dict(self) -> dict:
        """Everything a resumed run needs: the sparsifier's state (CPU tensors) and the schedule position."""
        return {
            "format": _STATE_FORMAT,
            "sparsifier": _to_cpu(self.sparsifier.state_dict()),
            "epochs_done": self._epochs_done,
            "update_interval": self.update_interval,
            "include": None if self.include is None else list(self.include),
            "exclude": list(self.exclude),
            "warned": self._warned,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` after :meth:`setup` on the same model layout; tensors go to the weights' device.

        Raises:
            ConfigError: for an unknown format, or a state of another pattern / tensor set.
        """
        if state.get("format") != _STATE_FORMAT:
            raise ConfigError(f"ADMM state format {state.get('format')!r} is not {_STATE_FORMAT}.")
        if state["update_interval"] != self.update_interval:
            log.warning("ADMM state was written with update_interval=%r, resuming with %r.",
                        state["update_interval"], self.update_interval)
        self.sparsifier.load_state_dict(state["sparsifier"])
        model = self.sparsifier.model
        for fqn in self.sparsifier.tensor_fqns:
            device = model.get_parameter(fqn).device
            for store in (self.sparsifier.admm_z, self.sparsifier.admm_u, self.sparsifier.masks):
                if fqn in store:
                    store[fqn] = store[fqn].to(device)
        self._epochs_done = int(state["epochs_done"])
        self._warned = bool(state["warned"])

    # -- Trainer events --------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.setup(model)
        checkpoint, self.resume_from_checkpoint = self.resume_from_checkpoint, None
        if checkpoint is None and state.global_step > 0:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if checkpoint is not None:
            self._restore(checkpoint, state.global_step)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not (self.active and self.proximal):
            return
        # the learning rate this optimizer step used (the scheduler steps after this event)
        first = self.sparsifier.model.get_parameter(self.sparsifier.tensor_fqns[0])
        group = next((g for g in optimizer.param_groups if any(p is first for p in g["params"])),
                     optimizer.param_groups[0])
        self.sparsifier.proximal_step(float(group["lr"]))

    def on_step_end(self, args, state, control, **kwargs):
        if not self.active:
            return
        if self._penalty_calls == 0 and not self.proximal:
            raise ConfigError(
                "ADMMCallback: an optimizer step ran without the ADMM penalty rho/2*||W - Z + U||^2 in the loss, so "
                "W is never pulled towards the n:m set.",
                hint="Use ADMMTrainer(..., admm=callback), mix ADMMTrainerMixin into your Trainer subclass, or add "
                "callback.penalty() to the loss in your own compute_loss.",
            )
        if isinstance(self.update_interval, int):
            if state.global_step % self.update_interval == 0:
                self.update(state)
        else:
            self._maybe_epoch_update(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.active and self.update_interval == "epoch":
            self._maybe_epoch_update(state)  # normally done already by the step that completed the epoch

    def on_save(self, args, state, control, **kwargs):
        if not self.active or not args.should_save:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(checkpoint):
            log.warning("ADMM state not saved: checkpoint directory %s does not exist (hyperparameter search "
                        "run directories are not supported).", checkpoint)
            return
        payload = {**self.state_dict(), "global_step": state.global_step}
        path = os.path.join(checkpoint, ADMM_STATE_NAME)
        torch.save(payload, path + ".tmp")
        os.replace(path + ".tmp", path)

    def on_train_end(self, args, state, control, **kwargs):
        if self.active and self.squash_at_end:
            self.finish()

    # -- internals -------------------------------------------------------------------------------------------
    def _maybe_epoch_update(self, state) -> None:
        # state.epoch is exactly an integer after the optimizer step that completes an epoch
        # (epoch + (step + 1) / steps_in_epoch), so the update lands before that step's checkpoint is saved.
        if state.epoch is None:
            return
        completed = round(state.epoch)
        if abs(state.epoch - completed) < 1e-9 and completed > self._epochs_done:
            self._epochs_done = completed
            self.update(state)

    def _restore(self, checkpoint: str, global_step: int) -> None:
        path = os.path.join(checkpoint, ADMM_STATE_NAME)
        if not os.path.isfile(path):
            raise ConfigError(
                f"Resuming from {checkpoint}: it holds no {ADMM_STATE_NAME}, so the ADMM state (Z, U, rho, masks) "
                "cannot be restored.",
                hint="Resume from a checkpoint written by a run with ADMMCallback (a run killed while saving leaves "
                "the newest one incomplete: use the one before), or start the ADMM run over.",
            )
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("global_step") != global_step:
            raise ConfigError(f"{path} was written at step {payload.get('global_step')}, but the Trainer resumes at "
                              f"step {global_step}.", hint="Resume from the checkpoint directory that holds it.")
        self.load_state_dict(payload)
        log.info("ADMM state restored from %s (%d updates, rho=%g)", path, self.sparsifier.num_updates,
                 self.sparsifier.rho)

    def _sync_ranks(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or self.ddp_sync == "off":
            return
        world = dist.get_world_size()
        if world == 1:
            return
        sp = self.sparsifier
        if self.ddp_sync == "broadcast":
            for fqn in sp.tensor_fqns:
                dist.broadcast(sp.admm_z[fqn], src=0)
                dist.broadcast(sp.admm_u[fqn], src=0)
                mask = sp.masks[fqn].to(torch.uint8)
                dist.broadcast(mask, src=0)
                sp.masks[fqn] = mask.bool()
            return
        state = {f"{kind}/{fqn}": store[fqn] for kind, store in (("z", sp.admm_z), ("u", sp.admm_u), ("mask", sp.masks))
                 for fqn in sp.tensor_fqns if fqn in store}
        sums = rank_checksums(state)
        if any(value != sums[0] for value in sums[1:]):
            raise NxmError(
                f"ADMM update {sp.num_updates}: Z, U or masks differ across the {world} ranks "
                f"(checksums {sums}); the ranks' weights have diverged.",
                hint="Train the DDP-wrapped model (trainer.model_wrapped) on every rank, or use ddp_sync='broadcast'.",
            )


class ADMMTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (before it) to add the ADMM penalty and state handling.

    Args:
        admm (ADMMCallback | None): the ADMM callback; added to the Trainer's callbacks unless already there.
            Required unless the class sets ``admm_optional = True`` (:class:`NxmTrainer`, which also runs the
            dense, masked and QAT fine-tunes).
        evaluate_hard_projected (bool): while ADMM runs, :meth:`evaluate` scores the hard-projected model and
            restores the dense W afterwards (NxMTransformer's evaluation). Defaults to True.

    Note:
        Under DDP, transformers multiplies the task loss by the world size when the model's ``forward`` takes
        ``**kwargs`` and ``args.average_tokens_across_devices`` is True (the default), assuming the loss is
        normalised by the *global* item count. BERT-style sequence classifiers take ``**kwargs`` but return a
        per-rank mean, so their task gradient grows by the world size while the penalty's does not. Set
        ``average_tokens_across_devices=False`` for them to keep rho's meaning equal to a 1-process run.

    Raises:
        ConfigError: when ``admm`` is not an :class:`ADMMCallback` (and not optional).
    """

    admm_optional = False

    def __init__(self, *args, admm: ADMMCallback | None = None, evaluate_hard_projected: bool = True, **kwargs):
        if not isinstance(admm, ADMMCallback) and not (admm is None and self.admm_optional):
            raise ConfigError(f"{type(self).__name__} needs admm=ADMMCallback(...), got {type(admm).__name__}.",
                              hint="e.g. ADMMTrainer(model=..., args=..., train_dataset=..., "
                              "admm=ADMMCallback(pattern='2:4', rho=4e-3)).")
        super().__init__(*args, **kwargs)
        self.admm = admm
        self.evaluate_hard_projected = bool(evaluate_hard_projected)
        if admm is not None and not any(cb is admm for cb in self.callback_handler.callbacks):
            self.add_callback(admm)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``; a resumed run also restores the ADMM state from the checkpoint directory."""
        if self.admm is None:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        if (self.args.world_size > 1 and getattr(self.args, "average_tokens_across_devices", False)
                and getattr(self, "model_accepts_loss_kwargs", False)):
            log.warning("ADMM under DDP: the Trainer scales the task loss by the world size (%d) because "
                        "average_tokens_across_devices=True and the model's forward takes **kwargs. If the model's "
                        "loss is a per-rank mean (BERT-style sequence classifiers), set "
                        "average_tokens_across_devices=False, or the task gradient outweighs the ADMM penalty "
                        "%d times more than in one process.", self.args.world_size, self.args.world_size)
        if resume_from_checkpoint is True:  # the newest checkpoint a kill while saving did not leave incomplete
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir, (ADMM_STATE_NAME,)) or True
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            resume_from_checkpoint = os.fspath(resume_from_checkpoint)
            self.admm.resume_from_checkpoint = resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Task loss from ``Trainer.compute_loss`` plus, in training mode, ``rho/2 * sum ||W - Z + U||^2``.

        The penalty is counted once per optimizer step: when the Trainer does not divide the loss by the
        gradient-accumulation steps (loss already normalised by ``num_items_in_batch``), the penalty is divided
        here instead.
        """
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if self.admm is None or not (self.admm.active and model.training) or self.admm.proximal:
            return result
        loss, outputs = result if return_outputs else (result, None)
        penalty = self.admm.penalty()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
                getattr(self, "compute_loss_func", None) is not None
            )
        if scaled:
            penalty = penalty / getattr(self, "current_gradient_accumulation_steps", 1)
        if hasattr(self, "_add_log_terms"):
            self._add_log_terms({"admm_penalty": penalty.detach()})
        loss = loss + penalty.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args, **kwargs):
        """``Trainer.evaluate``; while ADMM runs (and ``evaluate_hard_projected``), on the hard-projected model."""
        if self.admm is not None and self.evaluate_hard_projected and self.admm.active:
            with self.admm.sparsifier.hard_projected():
                return super().evaluate(*args, **kwargs)
        return super().evaluate(*args, **kwargs)


class ADMMTrainer(ADMMTrainerMixin, Trainer):
    """``transformers.Trainer`` with ADMM n:m sparsification: ``ADMMTrainer(..., admm=ADMMCallback(...))``.

    See :class:`ADMMTrainerMixin` for the extra arguments and :class:`ADMMCallback` for the schedule.
    """


class DistillationTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (before it): train on the GPUSQ-TLM distillation loss.

    ``L = alpha * L_hard + beta * L_soft + gamma * L_feature`` (GPUSQ-TLM, ACL Findings 2023, Sec. 3, Eq. 1-3;
    :func:`nxm_deploy.distillation.distillation_loss`). The frozen teacher runs on the same batch (eval mode,
    ``no_grad``, under the Trainer's mixed-precision autocast for speed); the three terms are computed in
    float32 outside autocast, so bf16/fp16 training does not round the KL and MSE terms.

    Args:
        teacher (nn.Module | None): frozen teacher with the student's label set (``None``: the model's own task
            loss). Moved to the Trainer's device.
        distillation (DistillationConfig | None): alpha, beta, gamma, temperature. Defaults to the paper's
            1, 10, 1 and T = 2.

    Raises:
        ConfigError: when the teacher's label set differs from the student's (see :func:`check_teacher`).
    """

    def __init__(self, *args, teacher: nn.Module | None = None, distillation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.distillation = distillation if distillation is not None else DistillationConfig()
        if teacher is not None:
            check_teacher(unwrap_model(self.model), teacher)
            teacher.eval()
            for param in teacher.parameters():
                param.requires_grad_(False)
            teacher.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """KD loss in training mode with a teacher; the model's own loss otherwise (evaluation, no teacher)."""
        if self.teacher is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        with torch.no_grad(), self.accelerator.autocast():
            t_out = self.teacher(**inputs, output_hidden_states=True)
        s_out = model(**inputs, output_hidden_states=True)
        with torch.autocast(device_type=s_out.logits.device.type, enabled=False):
            loss, parts = distillation_loss(
                s_out.logits.float(), t_out.logits.float(), labels, self.distillation,
                tuple(h.float() for h in s_out.hidden_states[1:]), tuple(h.float() for h in t_out.hidden_states[1:]),
            )
        self._add_log_terms({f"kd_{name}": value for name, value in parts.items()})
        return (loss, s_out) if return_outputs else loss

    def _add_log_terms(self, terms: dict[str, float]) -> None:
        """Accumulate loss terms; :meth:`log` adds their means since the last training log to it."""
        sums = self.__dict__.setdefault("_log_terms", {})
        for name, value in terms.items():
            total, count = sums.get(name, (0.0, 0))
            sums[name] = (total + float(value), count + 1)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """``Trainer.log``; a training log (with ``loss``) also gets the mean of each accumulated loss term."""
        sums = self.__dict__.get("_log_terms")
        if sums and "loss" in logs:
            logs.update({name: round(total / count, 6) for name, (total, count) in sums.items() if count})
            sums.clear()
        super().log(logs, *args, **kwargs)


class MaskedFinetuneCallback(TrainerCallback):
    """Keep fixed n:m masks during a fine-tune: ``W <- W * mask`` at train begin and after every optimizer step.

    The ASP-style masked fine-tune after the hard projection (method-notes 1.3): pruned weights stay exact zeros.

    Args:
        masks (Mapping[str, torch.Tensor]): ``tensor fqn -> bool [out, in]`` mask (True = keep), fqns relative to
            the unwrapped model, e.g. ``ADMMCallback.masks``.

    Raises:
        ConfigError: for empty masks here; for an unknown fqn or a shape mismatch on ``on_train_begin``.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        if not masks:
            raise ConfigError("MaskedFinetuneCallback got no masks.", hint="Pass ADMMCallback.masks after training.")
        self.masks = {fqn: torch.as_tensor(mask).bool() for fqn, mask in masks.items()}
        self._model: nn.Module | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = unwrap_model(model)
        apply_masks_(self._model, self.masks)  # validates fqns and shapes
        self.masks = {fqn: m.to(self._model.get_parameter(fqn).device) for fqn, m in self.masks.items()}

    def on_step_end(self, args, state, control, **kwargs):
        if self._model is not None:
            apply_masks_(self._model, self.masks)


# ---------------------------------------------------------------------------------------------------------
# The pipeline's trainer: every training stage (dense, ADMM, masked fine-tune, QAT) is one NxmTrainer run.

#: Recipe ``train.device`` / ``train.precision`` values (the schema's own lists).
DEVICES = get_args(TrainConfig.model_fields["device"].annotation)
PRECISIONS = get_args(TrainConfig.model_fields["precision"].annotation)
FINGERPRINT_FILE = "nxm_fingerprint.json"


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that get weight decay: every weight with ``ndim >= 2`` outside LayerNorm.

    Biases, LayerNorm parameters and the quantizers' learned ``amax`` (0-D or per-channel 1-D) are not decayed.
    """
    return [name for name, param in model.named_parameters()
            if param.ndim >= 2 and "layernorm" not in name.lower()]


def resolve_device(device: str) -> str:
    """``train.device`` to ``"cpu"`` or ``"cuda"``: ``auto`` picks CUDA when ``torch.cuda.is_available()``.

    Raises:
        ConfigError: ``cuda`` on a machine without a CUDA device, or an unknown value.
    """
    if device not in DEVICES:
        raise ConfigError(f"train.device={device!r} is not one of {list(DEVICES)}.")
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ConfigError("train.device=cuda, but torch finds no CUDA device on this machine "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}).",
                          hint="Use train.device: auto (or cpu), or install a CUDA build of torch on a GPU machine.")
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    return device


def resolve_precision(precision: str, device: str, *, quantized: bool = False) -> str:
    """``train.precision`` to ``"fp32"``, ``"bf16"`` or ``"fp16"`` for a resolved ``device``.

    ``auto``: bf16 on a CUDA device that supports it (fp32 otherwise), fp32 on CPU (bf16 autocast on CPU is only
    faster on CPUs with AMX / AVX512-BF16; ask for it explicitly), and fp32 for INT8 QAT (``quantized``), whose
    fake-quant rounding must see float32 values to match the exported INT8 codes exactly.

    Raises:
        ConfigError: fp16 on CPU (no fp16 autocast / loss scaling there), bf16 on a GPU without bf16.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision={precision!r} is not one of {list(PRECISIONS)}.")
    if precision == "fp16" and device == "cpu":
        raise ConfigError("train.precision=fp16 needs a CUDA device; this run trains on the CPU.",
                          hint="Use train.precision: bf16 or fp32 (or auto) on CPU.")
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16: {torch.cuda.get_device_name()} has no bf16 support.",
                          hint="Use train.precision: fp16 or fp32 (or auto).")
    if precision != "auto":
        return precision
    if quantized or device == "cpu":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp32"


def per_device_batch_size(batch_size: int, processes: int | None = None) -> int:
    """The recipe's global ``train.batch_size`` split over the DDP processes.

    Raises:
        ConfigError: when the world size does not divide the batch size.
    """
    processes = world_size() if processes is None else processes
    if batch_size % processes:
        raise ConfigError(f"train.batch_size={batch_size} is the global batch, and torchrun's world size "
                          f"{processes} does not divide it.",
                          hint=f"Use --nproc_per_node that divides {batch_size}, or set train.batch_size to a "
                          f"multiple of {processes}.")
    return batch_size // processes


class CheckpointEveryCallback(TrainerCallback):
    """Ask the Trainer for a checkpoint every ``every`` optimizer steps (on top of the one at each epoch end)."""

    def __init__(self, every: int | None):
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            control.should_save = True


class NxmTrainer(ADMMTrainerMixin, DistillationTrainerMixin, Trainer):
    """The Trainer of every nxm-deploy training stage: optional ADMM, optional KD teacher, exact masks via callbacks.

    Beyond ``transformers.Trainer``: ``admm`` (:class:`ADMMTrainerMixin`, optional here), ``teacher`` and
    ``distillation`` (:class:`DistillationTrainerMixin`), weight decay only on ``ndim >= 2`` non-LayerNorm weights
    (:func:`decay_parameter_names`: no decay on biases, LayerNorm or the quantizers' ``amax``), and, when
    ``length_grouped`` and the dataset is :func:`nxm_deploy.data.encode_dataset`'s, the resumable
    :class:`EpochSeededLengthGroupedSampler` (train) and a longest-first order (evaluation).
    Masked fine-tunes and QAT pass :class:`MaskedFinetuneCallback` in ``callbacks``.
    """

    admm_optional = True

    def __init__(self, *args, length_grouped: bool = True, **kwargs):
        self.length_grouped = bool(length_grouped)
        super().__init__(*args, **kwargs)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return decay_parameter_names(model)

    def _grouped(self, dataset) -> bool:
        return self.length_grouped and callable(getattr(dataset, "lengths", None))

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self._grouped(dataset):
            return super()._get_train_sampler(train_dataset)
        # grouped by the global batch: accelerate hands rank r the r-th per-device slice of each global batch, so
        # N processes train on the very batches one process would
        return EpochSeededLengthGroupedSampler(dataset.lengths(),
                                               self.args.per_device_train_batch_size * self.args.world_size,
                                               self.args.seed)

    def _get_eval_sampler(self, eval_dataset):
        if not self._grouped(eval_dataset):
            return super()._get_eval_sampler(eval_dataset)
        return eval_dataset.longest_first()


def training_arguments(output_dir: str | os.PathLike, train_cfg, *, epochs: float, learning_rate: float,
                       select_metric: str | None = None, greater_is_better: bool = True, quantized: bool = False,
                       **overrides) -> TrainingArguments:
    """``TrainingArguments`` of one training phase from a recipe's ``train`` section.

    Args:
        output_dir: the phase's checkpoint directory (``checkpoint-<step>/`` inside, the Trainer's format).
        train_cfg (TrainConfig): seed, global batch size (split over torchrun processes), eval batch size,
            weight decay, warm-up ratio, gradient clipping, ``device``, ``precision``, ``select``.
        epochs (float): training epochs (fractions allowed: ``ceil(epochs x steps per epoch)`` optimizer steps).
        learning_rate (float): peak learning rate of the linear warm-up / decay schedule (AdamW).
        select_metric (str | None): the task's primary metric; with ``train.select: best`` the Trainer keeps the
            epoch with the best dev value of it (``load_best_model_at_end``).
        greater_is_better (bool): direction of ``select_metric`` (False for perplexity).
        quantized (bool): an INT8 QAT phase (``precision: auto`` means fp32 there).
        overrides: any other ``TrainingArguments`` field.

    Raises:
        ConfigError: CUDA asked for but absent, fp16 on CPU, a world size that does not divide the batch.
    """
    device = resolve_device(train_cfg.device)
    precision = resolve_precision(train_cfg.precision, device, quantized=quantized)
    on_gpu = device == "cuda"
    best = train_cfg.select == "best" and select_metric is not None
    kwargs = dict(
        output_dir=str(output_dir), num_train_epochs=float(epochs), learning_rate=float(learning_rate),
        per_device_train_batch_size=per_device_batch_size(train_cfg.batch_size),
        per_device_eval_batch_size=train_cfg.eval_batch_size, weight_decay=train_cfg.weight_decay,
        warmup_steps=float(train_cfg.warmup_ratio), max_grad_norm=train_cfg.max_grad_norm,
        lr_scheduler_type="linear", optim="adamw_torch", seed=train_cfg.seed,
        use_cpu=not on_gpu, bf16=precision == "bf16", fp16=precision == "fp16",
        eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch", save_total_limit=1,
        load_best_model_at_end=best, metric_for_best_model=f"eval_{select_metric}" if best else None,
        greater_is_better=bool(greater_is_better) if best else None,
        report_to="none", remove_unused_columns=False, label_names=["labels"],
        # progress bars on (transformers turns them off with its own log level, which the CLI keeps at "error");
        # `nxm-deploy -q` sets TQDM_DISABLE=1
        disable_tqdm=os.environ.get("TQDM_DISABLE", "") in ("1", "true", "True"),
        average_tokens_across_devices=False, ddp_backend=("nccl" if on_gpu else "gloo") if world_size() > 1 else None,
        dataloader_num_workers=train_cfg.dataloader_workers if train_cfg.dataloader_workers is not None
        else (2 if on_gpu else 0), dataloader_pin_memory=on_gpu,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def check_fingerprint(output_dir: str | os.PathLike, fingerprint: str) -> None:
    """Refuse checkpoints in ``output_dir`` written by another recipe or world size; record ours otherwise.

    Raises:
        RunDirError: ``output_dir`` holds checkpoints of another fingerprint or world size.
    """
    path = os.path.join(output_dir, FINGERPRINT_FILE)
    mine = {"fingerprint": fingerprint, "world_size": world_size()}
    if os.path.isfile(path):
        with open(path) as fh:
            theirs = json.load(fh)
        if theirs != mine:
            what = ("another world size" if theirs.get("fingerprint") == fingerprint
                    else "a run with other settings")
            raise RunDirError(
                f"Checkpoints in {output_dir} were written by {what} (fingerprint {theirs.get('fingerprint')}, "
                f"{theirs.get('world_size')} process(es); this run {fingerprint}, {mine['world_size']}); resuming "
                "from them would mix two trainings.",
                hint=f"Delete {output_dir} to start this stage over, or rerun with the recipe and world size that "
                "wrote it.",
            )
        return
    if is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(mine, fh)
        os.replace(tmp, path)


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def _checkpoint_complete(path: Path, required: Iterable[str]) -> bool:
    """The Trainer wrote ``trainer_state.json`` (its last write, after model, optimizer, scheduler and RNG states)
    whole, and every file that callbacks write in ``on_save`` (``required``) exists."""
    try:
        TrainerState.load_from_json(str(path / TRAINER_STATE_NAME))
    except (OSError, ValueError, TypeError):  # absent, or cut short by a kill while it was written
        return False
    return all((path / name).is_file() for name in required)


def last_complete_checkpoint(output_dir: str | os.PathLike, required: Iterable[str] = (), *,
                             remove_incomplete: bool = False) -> str | None:
    """The newest ``checkpoint-<step>`` in ``output_dir`` that a resume can use; None when there is none.

    A process killed while the Trainer saves (``kill -9``, out of memory, a preempted node) leaves the newest folder
    without ``trainer_state.json`` (the Trainer writes it after the weights, optimizer and RNG states), with a
    truncated one, or without a file that a callback writes in ``on_save`` afterwards (``required``, e.g.
    :data:`ADMM_STATE_NAME`). Such a folder is skipped with a warning, and the next older complete one is used: its
    step is redone, to the same result. Where none is complete, the phase starts over.

    Args:
        output_dir: a training phase's checkpoint directory (``args.output_dir``).
        required: file names that a complete checkpoint holds besides ``trainer_state.json``.
        remove_incomplete: delete the skipped folders (the main process only; the choice of the complete folder
            does not depend on whether they are gone yet); else they are left for the Trainer to overwrite.

    Returns:
        str | None: the checkpoint folder's path.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    required = tuple(required)
    found = sorted(((step, path) for path in output_dir.iterdir()
                    if path.is_dir() and (step := _checkpoint_step(path)) is not None), reverse=True)
    for step, path in found:
        if _checkpoint_complete(path, required):
            return str(path)
        log.warning("checkpoint %s is incomplete (the run was killed while saving it): %s", path,
                    "removed; resuming from the one before" if remove_incomplete else "skipped")
        if remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None


def train_resumable(trainer: Trainer, fingerprint: str) -> dict:
    """``trainer.train()``, resumed from the newest complete checkpoint in ``args.output_dir`` when there is one
    (:func:`last_complete_checkpoint`: folders left incomplete by a kill while saving are removed with a warning).

    Returns:
        dict: ``steps`` (optimizer steps of the phase), ``seconds`` (this process's training time, evaluation
        during training included), ``train_loss`` (mean over the steps this process ran), ``resumed_from_step``
        (0 for a fresh start), ``epoch_metrics`` (``[{"epoch": e, <metric>: value, ...}]`` of every dev
        evaluation, from the Trainer's log history, so a resumed run reports the epochs before the kill too),
        ``selected_epoch`` (the kept epoch: the best one with ``load_best_model_at_end``, else the last).

    Raises:
        RunDirError: the checkpoints belong to another recipe or world size (:func:`check_fingerprint`).
    """
    output_dir = trainer.args.output_dir
    check_fingerprint(output_dir, fingerprint)
    required = (ADMM_STATE_NAME,) if getattr(trainer, "admm", None) is not None else ()
    # rank 0 removes the incomplete folders; the others find the same complete one whether or not they are gone yet
    resume = last_complete_checkpoint(output_dir, required, remove_incomplete=is_main_process())
    barrier()
    resumed_from = int(resume.rsplit("-", 1)[-1]) if resume else 0
    if resume:
        log.info("resuming from %s (step %d)", resume, resumed_from)
    result = trainer.train(resume_from_checkpoint=resume)
    names = getattr(trainer, "metric_names", None)
    epochs = []
    for entry in trainer.state.log_history:
        values = {k[len("eval_"):]: v for k, v in entry.items() if k.startswith("eval_")}
        values = {k: v for k, v in values.items() if names is None or k in names}
        if values and "epoch" in entry:
            epochs.append({"epoch": round(float(entry["epoch"]), 3), "step": entry.get("step"), **values})
    selected = epochs[-1]["epoch"] if epochs else None
    best_ckpt = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best_ckpt:
        best_step = int(best_ckpt.rsplit("-", 1)[-1])
        selected = next((e["epoch"] for e in epochs if e["step"] == best_step), selected)
    return {"steps": trainer.state.global_step, "seconds": round(float(result.metrics.get("train_runtime", 0.0)), 2),
            "train_loss": float(result.training_loss), "resumed_from_step": resumed_from,
            "epoch_metrics": epochs, "selected_epoch": selected}


def dev_metrics(trainer: Trainer) -> dict[str, float]:
    """Task metrics of ``trainer.model`` on its eval dataset (``Trainer.evaluate``, prefixes removed)."""
    names = getattr(trainer, "metric_names", None)
    metrics = trainer.evaluate()
    return {k[len("eval_"):]: float(v) for k, v in metrics.items()
            if k.startswith("eval_") and (names is None or k[len("eval_"):] in names)}


def lm_eval_sums(logits, labels):
    """``preprocess_logits_for_metrics`` of a causal LM: each eval batch's ``[B, L, V]`` logits reduced on the
    device to ``[B, 2]`` NLL sums (:func:`nxm_deploy.data.metrics.lm_nll_sums`), so evaluation keeps two numbers per
    block instead of the vocabulary-sized logits."""
    from nxm_deploy.data.metrics import lm_nll_sums

    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return lm_nll_sums(logits, labels)


class TaskMetrics:
    """``compute_metrics`` for a Trainer: the task's metrics of the eval logits (:func:`compute_metrics`)."""

    def __init__(self, task):
        self.task = task

    def __call__(self, prediction) -> dict[str, float]:
        from nxm_deploy.data.metrics import compute_metrics

        logits = prediction.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return compute_metrics(self.task, logits, prediction.label_ids)


def build_trainer(model: nn.Module, data, train_cfg, *, output_dir: str | os.PathLike, epochs: float,
                  learning_rate: float, quantized: bool = False, admm: ADMMCallback | None = None,
                  teacher: nn.Module | None = None, distillation=None, callbacks: Iterable[TrainerCallback] = (),
                  **overrides) -> NxmTrainer:
    """One training phase of a stage as an :class:`NxmTrainer` on a task's data.

    Args:
        model: the student (moved to the device by the Trainer).
        data (TaskData): encoded train/dev sets, collator, task (metrics; the primary one selects epochs).
        train_cfg (TrainConfig): the recipe's ``train`` section (see :func:`training_arguments`); its
            ``checkpoint_every_steps`` adds a checkpoint every k optimizer steps.
        output_dir, epochs, learning_rate, quantized, overrides: as :func:`training_arguments`.
        admm, teacher, distillation: as :class:`NxmTrainer`.
        callbacks: more Trainer callbacks (e.g. :class:`MaskedFinetuneCallback`).

    Raises:
        ConfigError: as :func:`training_arguments`; a teacher of another label set.
    """
    args = training_arguments(output_dir, train_cfg, epochs=epochs, learning_rate=learning_rate,
                              select_metric=data.task.primary_metric, greater_is_better=data.task.greater_is_better,
                              quantized=quantized, **overrides)
    # A Trainer that evaluated this model earlier (an evaluation-only run, a previous phase) left accelerate's
    # "already prepared" mark on it; under torchrun that mark would stop this run from wrapping it in DDP, and
    # the ranks would train apart. Evaluate with a separate Trainer (evaluate_model), never this one, before train().
    vars(model).pop("_is_accelerate_prepared", None)
    trainer = NxmTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.dev, data_collator=data.collator,
        compute_metrics=TaskMetrics(data.task), admm=admm, teacher=teacher, distillation=distillation,
        preprocess_logits_for_metrics=lm_eval_sums if data.task.is_causal_lm else None,
        callbacks=[CheckpointEveryCallback(train_cfg.checkpoint_every_steps), *callbacks],
    )
    trainer.metric_names = tuple(data.task.metrics)
    if args.disable_tqdm:  # quiet (nxm-deploy -q): no bars, and no log dicts printed in their place
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def rank_checksums(tensors: Mapping[str, torch.Tensor]) -> list[float]:
    """A float64 checksum of ``tensors`` (index-weighted sums in name order) from every rank, rank order.

    Equal entries mean every rank holds the same tensors (e.g. the n:m masks after a DDP stage); one entry in a
    single process.
    """
    total = torch.zeros((), dtype=torch.float64)
    for name in sorted(tensors):
        flat = tensors[name].detach().flatten().double().cpu()
        total += (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(total)]
    backend_device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    local = total.reshape(1).to(backend_device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [float(g.item()) for g in gathered]


def train_device(train_cfg) -> torch.device:
    """The ``torch.device`` this process trains on: ``cpu``, or ``cuda:<LOCAL_RANK>`` (see :func:`resolve_device`)."""
    if resolve_device(train_cfg.device) == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def check_train_settings(train_cfg) -> dict:
    """Resolve ``train.device`` / ``train.precision`` and the per-process batch before anything trains.

    Returns:
        dict: ``device``, ``precision`` (of the FP stages; QAT's ``auto`` is fp32), ``world_size``,
        ``per_device_batch_size``.

    Raises:
        ConfigError: CUDA asked for but absent, fp16 on CPU, bf16 on a GPU without it, a torchrun world size
            that does not divide ``train.batch_size``.
    """
    device = resolve_device(train_cfg.device)
    return {"device": device, "precision": resolve_precision(train_cfg.precision, device),
            "world_size": world_size(), "per_device_batch_size": per_device_batch_size(train_cfg.batch_size)}


def init_distributed(train_cfg) -> bool:
    """Under torchrun (``WORLD_SIZE`` > 1), start the process group now: gloo on CPU, NCCL on CUDA.

    The Trainer would start it on its first ``TrainingArguments``; starting it here lets rank 0 alone prepare the
    run directory while the other ranks wait. Returns True when a group was started.

    Raises:
        ConfigError: as :func:`check_train_settings`.
    """
    settings = check_train_settings(train_cfg)
    if settings["world_size"] <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    on_gpu = settings["device"] == "cuda"
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    return True


def shutdown_distributed(wait: bool = True) -> None:
    """End the process group (a gloo group left open can abort at interpreter exit); ``wait``: barrier first."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def evaluate_model(model: nn.Module, data, train_cfg) -> dict[str, float]:
    """Dev metrics of ``model`` on ``data.dev`` through ``Trainer.evaluate`` (device and precision of ``train_cfg``).

    For benchmarks and diagnostics that score a model outside a stage; nothing is trained or written.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nxm_eval_") as tmp:
        trainer = build_trainer(model, data, train_cfg, output_dir=tmp, epochs=1, learning_rate=1e-5,  # no training
                                disable_tqdm=True)
        return dev_metrics(trainer)
