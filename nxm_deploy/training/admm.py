"""ADMM n:m sparsification inside a Hugging Face ``transformers.Trainer`` run (single process or DDP).

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

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback

from nxm_deploy.errors import ConfigError, NxmError
from nxm_deploy.ranks import rank_checksums
from nxm_deploy.sparsity.admm import ADMMSparsifier
from nxm_deploy.sparsity.targets import DEFAULT_INCLUDE, LayerDecision, require_targets, target_names
from nxm_deploy.training.checkpoints import last_complete_checkpoint

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


