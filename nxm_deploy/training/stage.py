"""Training stages: dense fine-tune -> ADMM n:m + KD -> INT8 QAT + KD. Each reads/writes a directory of the run.

Run directory layout (each stage directory holds a ``manifest.json`` written last, atomically):

* ``dense/``  dense fine-tuned model (teacher of the ADMM stage and the dense baseline);
* ``sparse/`` ADMM n:m model after the hard projection (+ masked fine-tune), ``masks.safetensors``;
* ``qat/``    sparse INT8 QAT model: ``model.safetensors`` state dict incl. quantizer ``amax``, ``quant.json``.

Choices (method-notes 1.3, 3.1 item 11; 3.2 items 4-5): ADMM starts from the dense *task-fine-tuned* model with
all parameters trainable, KD teacher = the dense model (GPUSQ-TLM workflow 1); QAT is initialised by PTQ
calibration of the sparse FP model and trained with that sparse FP model as teacher (workflow 2).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nxm_deploy._io import atomic_dir, atomic_write_json, read_json
from nxm_deploy.config.recipe import Recipe
from nxm_deploy.data import get_task, load_task_split, make_dataloader, resolve_glue_dir
from nxm_deploy.distillation import check_teacher, distillation_loss
from nxm_deploy.errors import RunDirError, SparsityVerificationError
from nxm_deploy.models import load_base_model, load_saved_model
from nxm_deploy.quantization import calibrate, quantize_model_, quantized_modules
from nxm_deploy.sparsity import count_nm_violations, nm_mask
from nxm_deploy.sparsity.admm import ADMMSparsifier, apply_masks_
from nxm_deploy.sparsity.targets import require_targets, target_names
from nxm_deploy.training.loop import evaluate, train_loop

log = logging.getLogger("nxm_deploy.training")

STAGES = ("dense", "admm", "qat")


class _TaskData:
    """Tokenised train/dev loaders of the recipe's task, built once per stage."""

    def __init__(self, recipe: Recipe, tokenizer, glue_dir: str | None):
        self.task = get_task(recipe.task.name)
        root = resolve_glue_dir(glue_dir or recipe.task.glue_dir)
        cfg, tcfg = recipe.task, recipe.train
        self.train_examples = load_task_split(self.task, "train", root, cfg.max_train_examples)
        self.dev_examples = load_task_split(self.task, "dev", root, cfg.max_eval_examples)
        self.train = make_dataloader(
            tokenizer, self.train_examples, batch_size=tcfg.batch_size, max_seq_length=cfg.max_seq_length,
            shuffle=True, seed=tcfg.seed, group_by_length=True,
        )
        self.dev = make_dataloader(
            tokenizer, self.dev_examples, batch_size=tcfg.eval_batch_size, max_seq_length=cfg.max_seq_length,
            shuffle=False, group_by_length=True,
        )


def _setup(recipe: Recipe) -> None:
    torch.manual_seed(recipe.train.seed)
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)


def _split_labels(batch: dict) -> tuple[dict, torch.Tensor]:
    batch = dict(batch)
    return batch, batch.pop("labels")


def _kd_loss_fn(teacher, recipe: Recipe, student=None):
    """``compute_loss`` for a student distilled from a frozen ``teacher`` (eval mode, no_grad, same batch).

    Raises:
        ConfigError: the teacher's label set differs from ``student``'s (see :func:`check_teacher`).
    """
    if student is not None:
        check_teacher(student, teacher)
    kd_cfg = recipe.train.distillation
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def compute_loss(model, batch):
        inputs, labels = _split_labels(batch)
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=True)
        s_out = model(**inputs, output_hidden_states=True)
        return distillation_loss(
            s_out.logits, t_out.logits, labels, kd_cfg, s_out.hidden_states[1:], t_out.hidden_states[1:]
        )

    return compute_loss


def _task_loss_fn():
    """``compute_loss`` with the model's own task loss (CE, or MSE for regression)."""
    return lambda model, batch: (model(**batch).loss, {})


def _with_penalty(compute_loss, penalty):
    """Add ``penalty()`` (e.g. the ADMM term rho/2 ||W - Z + U||^2) to a ``compute_loss``."""

    def wrapped(model, batch):
        loss, parts = compute_loss(model, batch)
        value = penalty()
        return loss + value, {**parts, "admm": float(value.detach())}

    return wrapped


def _stage_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / {"dense": "dense", "admm": "sparse", "qat": "qat"}[stage]


CHECKPOINTS_DIR = "checkpoints"


def _checkpointing(recipe: Recipe, run_dir: Path, stage: str, loop: str) -> dict:
    """``train_loop`` keyword arguments that make one loop of a stage resumable (``run_dir/checkpoints/...``).

    The fingerprint is a hash of the recipe (without the settings that change speed, not results: thread count,
    checkpoint interval) plus the loop name: a checkpoint left by another recipe is refused.
    """
    data = recipe.to_dict()
    for key in ("num_threads", "checkpoint_every_steps"):
        data["train"].pop(key, None)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "checkpoint_dir": run_dir / CHECKPOINTS_DIR / stage / loop,
        "checkpoint_every": recipe.train.checkpoint_every_steps,
        "checkpoint_fingerprint": f"{digest}:{stage}:{loop}",
    }


def _drop_checkpoints(run_dir: Path, stage: str) -> None:
    """Remove a stage's loop checkpoints once its artifact is written (they are only for resuming a killed run)."""
    shutil.rmtree(run_dir / CHECKPOINTS_DIR / stage, ignore_errors=True)
    with contextlib.suppress(OSError):
        (run_dir / CHECKPOINTS_DIR).rmdir()


def read_stage_manifest(run_dir: str | Path, stage: str) -> dict:
    """Manifest of a finished stage.

    Raises:
        RunDirError: the stage has not finished in this run directory.
    """
    path = _stage_dir(Path(run_dir), stage) / "manifest.json"
    if not path.is_file():
        raise RunDirError(
            f"Stage '{stage}' has no finished artifact in {path.parent}.",
            hint=f"Run `nxm-deploy train {run_dir} --stage {stage}` (or `nxm-deploy run`) first.",
        )
    return read_json(path)


def check_masks(model, masks: dict[str, torch.Tensor], pattern) -> dict:
    """Every masked weight exactly 0 and every group within the pattern; INT8 codes of pruned weights 0.

    Raises:
        SparsityVerificationError: naming each layer that breaks a rule.
    """
    problems, layers = [], 0
    qmods = quantized_modules(model)
    for fqn, mask in masks.items():
        module_fqn = fqn.rpartition(".")[0]
        weight = model.get_submodule(module_fqn).weight.detach()
        layers += 1
        nonzero_pruned = int((weight[~mask] != 0).sum())
        _, bad, first = count_nm_violations(weight.numpy(), pattern, axis=1)
        if nonzero_pruned or bad:
            problems.append(f"{module_fqn}: {nonzero_pruned} pruned weights nonzero, {bad} groups over {pattern} (first {first})")
        if module_fqn in qmods:
            codes = qmods[module_fqn].weight_quantizer.int8_codes(weight)
            if int((codes[~mask] != 0).sum()):
                problems.append(f"{module_fqn}: INT8 codes of pruned weights are not 0")
    if problems:
        raise SparsityVerificationError("Mask check failed: " + "; ".join(problems))
    return {"layers_checked": layers, "pattern": str(pattern), "ok": True}


# ---------------------------------------------------------------------------------------------------------
def train_dense(recipe: Recipe, run_dir: Path, glue_dir: str | None = None) -> dict:
    """Dense fine-tune of the base model on the task; writes ``dense/``."""
    _setup(recipe)
    task = get_task(recipe.task.name)
    model, tokenizer = load_base_model(recipe.model.source, task.num_labels, recipe.model.random_init, recipe.train.seed)
    data = _TaskData(recipe, tokenizer, glue_dir)
    cfg = recipe.train
    stats = train_loop(
        model, data.train, epochs=cfg.dense.epochs, learning_rate=cfg.dense.learning_rate,
        weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm,
        compute_loss=_task_loss_fn(), desc="dense fine-tune", bf16=cfg.bf16,
        **_checkpointing(recipe, run_dir, "dense", "finetune"),
    )
    metrics = evaluate(model, data.dev, task)
    log.info("dense dev %s", metrics)
    manifest = {
        "stage": "dense", "recipe_sha256": recipe.sha256(), "task": task.name, "metrics": metrics,
        "train_examples": len(data.train_examples), "dev_examples": len(data.dev_examples), **stats,
    }
    with atomic_dir(_stage_dir(run_dir, "dense")) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "manifest.json", manifest)
    _drop_checkpoints(run_dir, "dense")
    return manifest


def _admm_phase(student, targets, data, task, recipe: Recipe, run_dir: Path, base_loss, epoch_metrics: list):
    """ADMM W-steps (task/KD loss + rho/2 ||W - Z + U||^2), Z/U updates on schedule, hard projection.

    Returns ``(masks, admm_history, train_stats)``; appends the hard-projected dev score of each epoch to
    ``epoch_metrics`` (NxMTransformer's evaluation: the projected model, dense W restored afterwards).
    The loop checkpoints carry the sparsifier's full state (Z, U, rho, update count, masks, history) and the
    epoch scores, so a killed run resumes to the same result.
    """
    cfg, acfg = recipe.train, recipe.train.admm
    sparsifier = ADMMSparsifier(recipe.pattern, rho=acfg.rho, rho_factor=acfg.rho_factor, rho_max=acfg.rho_max,
                                u_init=acfg.u_init, penalty_mode=acfg.penalty_mode)
    sparsifier.prepare(student, [{"tensor_fqn": f"{name}.weight"} for name in targets])

    warned = []

    def update():
        record = sparsifier.step()
        log.info("ADMM Z/U update %s", record)
        # Z flipping many kept/pruned choices again and again means the W-step cannot follow: U piles up the
        # residual faster than W moves (too many updates for the learning rate, or rho too small).
        if record["update"] >= 2 and record["mask_change"] > 0.25 and not warned:
            warned.append(record)
            advice = "a larger rho or learning rate, or more steps between updates"
            if acfg.update_interval != "epoch":
                advice = "update_interval: epoch (the authors' schedule), " + advice
            if acfg.penalty_mode == "gradient":
                advice += ", or penalty_mode: proximal"
            log.warning("ADMM oscillates: update %d changed %.0f%% of the mask; the W-step does not reach Z - U "
                        "between updates. Try %s.", record["update"], 100 * record["mask_change"], advice)

    def on_epoch_end(epoch):
        if acfg.update_interval == "epoch":
            update()
        with sparsifier.hard_projected():
            metrics = evaluate(student, data.dev, task)
        epoch_metrics.append({"after": f"epoch {epoch + 1}", **metrics})
        log.info("ADMM epoch %d hard-projected dev %s", epoch + 1, metrics)

    def after_step(step, lr):
        sparsifier.proximal_step(lr)  # no-op in "gradient" mode
        if isinstance(acfg.update_interval, int) and step % acfg.update_interval == 0:
            update()

    def get_state():
        return {"sparsifier": sparsifier.state_dict(), "epoch_metrics": list(epoch_metrics), "warned": list(warned)}

    def set_state(state):
        sparsifier.load_state_dict(state["sparsifier"])
        epoch_metrics[:] = state["epoch_metrics"]
        warned[:] = state["warned"]

    compute_loss = base_loss if acfg.penalty_mode == "proximal" else _with_penalty(base_loss, sparsifier.penalty)
    stats = train_loop(
        student, data.train, epochs=acfg.epochs, learning_rate=acfg.learning_rate, weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm,
        compute_loss=compute_loss, after_step=after_step, on_epoch_end=on_epoch_end,
        desc=f"ADMM {recipe.pattern}" + (" + KD" if acfg.distill else ""), bf16=cfg.bf16,
        extra_state=(get_state, set_state), **_checkpointing(recipe, run_dir, "admm", "admm"),
    )
    return sparsifier.squash_mask(), sparsifier.history, stats


def train_admm(recipe: Recipe, run_dir: Path, glue_dir: str | None = None) -> dict:
    """n:m sparse fine-tune from the dense model; writes ``sparse/``.

    ``train.admm.method``: ``admm`` (NxMTransformer: ADMM + KD from the dense model, hard projection, masked
    fine-tune) or ``magnitude`` (ASP baseline: one-shot magnitude mask, masked fine-tune for the same number of
    epochs). Masks are enforced after every optimizer step of the masked fine-tune.
    """
    _setup(recipe)
    read_stage_manifest(run_dir, "dense")
    task = get_task(recipe.task.name)
    cfg, acfg = recipe.train, recipe.train.admm
    pattern = recipe.pattern
    teacher, tokenizer = load_saved_model(_stage_dir(run_dir, "dense"))
    student = copy.deepcopy(teacher)
    data = _TaskData(recipe, tokenizer, glue_dir)

    decisions = require_targets(student, pattern, recipe.sparsity.include, recipe.sparsity.exclude)
    targets = target_names(decisions)
    kd_or_task = _kd_loss_fn(teacher, recipe, student) if acfg.distill else _task_loss_fn()
    epoch_metrics, history, stats = [], [], None
    if acfg.method == "admm":
        masks, history, stats = _admm_phase(student, targets, data, task, recipe, run_dir, kd_or_task, epoch_metrics)
        finetune_epochs = acfg.masked_finetune_epochs
    else:  # "magnitude": ASP baseline -- one-shot n:m magnitude mask of the dense model, then masked fine-tune
        masks = {f"{name}.weight": nm_mask(student.get_submodule(name).weight, pattern) for name in targets}
        apply_masks_(student, masks)
        finetune_epochs = acfg.epochs + acfg.masked_finetune_epochs  # the same training budget as ADMM
    projected_metrics = evaluate(student, data.dev, task)
    ft_stats = None
    if finetune_epochs > 0:
        ft_stats = train_loop(
            student, data.train, epochs=finetune_epochs, learning_rate=acfg.learning_rate,
            weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm,
            compute_loss=kd_or_task, after_step=lambda _s, _lr: apply_masks_(student, masks), desc="masked fine-tune",
            bf16=cfg.bf16, **_checkpointing(recipe, run_dir, "admm", "masked_finetune"),
        )
    mask_check = check_masks(student, masks, pattern)
    metrics = evaluate(student, data.dev, task)
    log.info("sparse dev %s", metrics)
    manifest = {
        "stage": "admm", "recipe_sha256": recipe.sha256(), "task": task.name, "pattern": str(pattern),
        "metrics": metrics, "metrics_after_projection": projected_metrics, "epoch_metrics": epoch_metrics,
        "method": acfg.method, "admm_history": history, "admm": acfg.model_dump(mode="json"), "train": stats,
        "masked_finetune": ft_stats, "mask_check": mask_check,
        "targets": targets, "layers": [d.to_dict() for d in decisions],
    }
    with atomic_dir(_stage_dir(run_dir, "admm")) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in masks.items()}, str(tmp / "masks.safetensors"))
        atomic_write_json(tmp / "manifest.json", manifest)
    _drop_checkpoints(run_dir, "admm")
    return manifest


def load_masks(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """Bool masks (True = keep) by tensor fqn, from ``sparse/masks.safetensors``."""
    return load_file(str(_stage_dir(Path(run_dir), "admm") / "masks.safetensors"))


def load_qat_model(run_dir: str | Path):
    """Rebuild the QAT model (sparse model + QuantLinear targets + trained state): ``(model, tokenizer, quant_info)``.

    Raises:
        RunDirError: the QAT stage has not finished.
    """
    run_dir = Path(run_dir)
    read_stage_manifest(run_dir, "qat")
    qdir = _stage_dir(run_dir, "qat")
    info = read_json(qdir / "quant.json")
    model, tokenizer = load_saved_model(_stage_dir(run_dir, "admm"))
    quantize_model_(model, info["quantized_modules"], learn_amax=False)
    model.load_state_dict(load_file(str(qdir / "model.safetensors")))
    model.eval()
    return model, tokenizer, info


def train_qat(recipe: Recipe, run_dir: Path, glue_dir: str | None = None) -> dict:
    """PTQ calibration + INT8 QAT with KD, masks enforced; writes ``qat/``.

    The student starts from the sparse FP model (``sparse/``). The KD teacher is the sparse FP model
    (``train.qat.teacher: sparse``, GPUSQ-TLM workflow 2: the teacher the quantized student can match) or the
    dense FP model (``teacher: dense``, ``dense/``; an ablation).

    Raises:
        RunDirError: the sparse stage (or, with ``teacher: dense`` and ``distill``, the dense stage) has not
            finished in ``run_dir``.
        ConfigError: the teacher's label set differs from the student's.
        SparsityVerificationError: a pruned weight is non-zero after QAT.
    """
    _setup(recipe)
    run_dir = Path(run_dir)
    sparse_manifest = read_stage_manifest(run_dir, "admm")
    task = get_task(recipe.task.name)
    cfg, qcfg = recipe.train, recipe.train.qat
    pattern = recipe.pattern
    sparse_fp, tokenizer = load_saved_model(_stage_dir(run_dir, "admm"))
    student = copy.deepcopy(sparse_fp)
    teacher = sparse_fp
    if qcfg.distill and qcfg.epochs > 0 and qcfg.teacher == "dense":
        read_stage_manifest(run_dir, "dense")
        teacher, _ = load_saved_model(_stage_dir(run_dir, "dense"))
    masks = load_masks(run_dir)
    data = _TaskData(recipe, tokenizer, glue_dir)
    targets = sparse_manifest["targets"]
    quantize_model_(student, targets, learn_amax=qcfg.learn_amax)

    def forward_loop(model):
        for i, batch in enumerate(data.train):
            if i >= qcfg.calibration_batches:
                break
            inputs, _ = _split_labels(batch)
            model(**inputs)

    t0 = time.perf_counter()
    calibrate(student, forward_loop, method=qcfg.calibration_method, percentile=qcfg.percentile)
    ptq_metrics = evaluate(student, data.dev, task)
    log.info("PTQ INT8 dev %s (%.1fs calibration)", ptq_metrics, time.perf_counter() - t0)
    stats = None
    if qcfg.epochs > 0:
        loss_fn = _kd_loss_fn(teacher, recipe, student) if qcfg.distill else _task_loss_fn()
        desc = f"INT8 QAT + KD ({qcfg.teacher} teacher)" if qcfg.distill else "INT8 QAT"
        stats = train_loop(
            student, data.train, epochs=qcfg.epochs, learning_rate=qcfg.learning_rate, weight_decay=cfg.weight_decay,
            warmup_ratio=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm, compute_loss=loss_fn,
            after_step=lambda _s, _lr: apply_masks_(student, masks), desc=desc,
            **_checkpointing(recipe, run_dir, "qat", "qat"),
        )
    mask_check = check_masks(student, masks, pattern)
    metrics = evaluate(student, data.dev, task)
    log.info("QAT INT8 dev %s", metrics)
    quant_info = {
        "quantized_modules": targets, "num_bits": 8, "symmetric": True, "zero_point": 0,
        "range": [-128, 127], "scale": "amax / 127", "weights": "per output channel (axis 0)",
        "activations": "per tensor, input of each quantized Linear",
        "calibration": {"method": qcfg.calibration_method, "percentile": qcfg.percentile, "batches": qcfg.calibration_batches},
        "learn_amax": qcfg.learn_amax,
    }
    manifest = {
        "stage": "qat", "recipe_sha256": recipe.sha256(), "task": task.name, "pattern": str(pattern),
        "kd_teacher": qcfg.teacher if qcfg.distill else None,
        "metrics": metrics, "ptq_metrics": ptq_metrics, "train": stats, "mask_check": mask_check,
    }
    with atomic_dir(_stage_dir(run_dir, "qat")) as tmp:
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "quant.json", quant_info)
        atomic_write_json(tmp / "manifest.json", manifest)
    _drop_checkpoints(run_dir, "qat")
    return manifest


def train_stage(recipe: Recipe, run_dir: str | Path, glue_dir: str | None = None, stages=STAGES,
                skip_finished: bool = False) -> dict:
    """Run the named training stages in order; returns ``{stage: manifest}``.

    ``skip_finished``: keep a stage whose artifact was finished by the same recipe (hash in its manifest), e.g.
    when ``nxm-deploy run`` is restarted after a kill; an unfinished stage resumes from its loop checkpoints.
    """
    run_dir = Path(run_dir)
    funcs = {"dense": train_dense, "admm": train_admm, "qat": train_qat}
    out = {}
    for stage in stages:
        manifest_path = _stage_dir(run_dir, stage) / "manifest.json"
        if skip_finished and manifest_path.is_file() and read_json(manifest_path).get("recipe_sha256") == recipe.sha256():
            log.info("stage %s already finished with this recipe: kept (%s)", stage, manifest_path.parent)
            out[stage] = read_json(manifest_path)
            continue
        out[stage] = funcs[stage](recipe, run_dir, glue_dir)
    return out
