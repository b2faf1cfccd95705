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

The pieces live by job: :mod:`nxm_deploy.training.admm` (ADMM), :mod:`nxm_deploy.training.distill` (KD),
:mod:`nxm_deploy.training.masked` (fixed masks), :mod:`nxm_deploy.training.checkpoints` (fingerprints and complete
checkpoints); this module builds the Trainer of a phase and re-exports them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import get_args

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from nxm_deploy.config.recipe import TrainConfig
from nxm_deploy.data.loader import EpochSeededLengthGroupedSampler
from nxm_deploy.errors import ConfigError
from nxm_deploy.ranks import barrier, is_main_process, rank_checksums, world_size  # noqa: F401  (re-exported)
from nxm_deploy.training.admm import (  # noqa: F401  (re-exported: the Trainer pieces' one import path)
    ADMM_STATE_NAME, ADMMCallback, ADMMTrainer, ADMMTrainerMixin, unwrap_model,
)
from nxm_deploy.training.checkpoints import (  # noqa: F401  (re-exported)
    FINGERPRINT_FILE, check_fingerprint, last_complete_checkpoint,
)
from nxm_deploy.training.distill import DistillationTrainerMixin
from nxm_deploy.training.masked import MaskedFinetuneCallback  # noqa: F401  (re-exported)

log = logging.getLogger("nxm_deploy.training")

# ---------------------------------------------------------------------------------------------------------
# The pipeline's trainer: every training stage (dense, ADMM, masked fine-tune, QAT) is one NxmTrainer run.

#: Recipe ``train.device`` / ``train.precision`` values (the schema's own lists).
DEVICES = get_args(TrainConfig.model_fields["device"].annotation)
PRECISIONS = get_args(TrainConfig.model_fields["precision"].annotation)


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
