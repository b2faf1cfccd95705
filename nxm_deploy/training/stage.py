"""Training stages: dense fine-tune -> ADMM n:m + KD -> INT8 QAT + KD. Each reads/writes a directory of the run.

Run directory layout (each stage directory holds a ``manifest.json`` written last, atomically):

* ``dense/``  dense fine-tuned model (teacher of the ADMM stage and the dense baseline);
* ``sparse/`` ADMM n:m model after the hard projection (+ masked fine-tune), ``masks.safetensors``;
* ``qat/``    sparse INT8 QAT model: ``model.safetensors`` state dict incl. quantizer ``amax``, ``quant.json``.

Every training phase is one :class:`~nxm_deploy.training.trainer.NxmTrainer` run (``transformers.Trainer``: the
device, mixed precision, DDP under torchrun, checkpoints and resume come from it); the method pieces (ADMM
callback, masked fine-tune callback, distillation, QAT calibration) live in :mod:`nxm_deploy.training.trainer`.
While a stage runs, its Trainer checkpoints are in ``checkpoints/<stage>/<phase>/checkpoint-<step>/``; a killed
stage resumes from the newest one. Under torchrun every rank trains, rank 0 alone writes the artifacts.

Choices (method-notes 1.3, 3.1 item 11; 3.2 items 4-5): ADMM starts from the dense *task-fine-tuned* model with
all parameters trainable, KD teacher = the dense model (GPUSQ-TLM workflow 1); QAT is initialised by PTQ
calibration of the sparse FP model and trained with that sparse FP model as teacher (workflow 2).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model

from nxm_deploy.fileio import atomic_dir, atomic_write_json, file_hashes, sha256_file
from nxm_deploy.config.recipe import Recipe
from nxm_deploy.run.layout import MANIFEST, MASKS, QAT_WEIGHTS, QUANT_INFO, RunLayout
from nxm_deploy.stages import (
    TRAINING, StageContext, differing_keys, get_stage, is_up_to_date, record_stage, stage_key,
)
from nxm_deploy.data import TaskData
from nxm_deploy.errors import ConfigError, SparsityVerificationError
from nxm_deploy.models import load_base_model, save_model_dir
from nxm_deploy.quantization import calibrate, quantize_model_
from nxm_deploy.quantization.placement import place_quantizers_
from nxm_deploy.sparsity.admm import apply_masks_
from nxm_deploy.sparsity.methods import MaskResult, MaskSearch, get_method
from nxm_deploy.sparsity.methods.magnitude import magnitude_masks
from nxm_deploy.sparsity.targets import require_targets, target_names
from nxm_deploy.ranks import barrier, is_main_process, world_size
from nxm_deploy.run.reader import check_masks, load_masks, load_stage_model, open_run_dir, read_stage_manifest
from nxm_deploy.training.trainer import (
    ADMMCallback, MaskedFinetuneCallback, build_trainer, dev_metrics, evaluate_model, rank_checksums, train_device,
    train_resumable,
)

log = logging.getLogger("nxm_deploy.training")



def _setup(recipe: Recipe) -> None:
    torch.manual_seed(recipe.train.seed)
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)


def _stage_dir(run_dir: Path, stage: str) -> Path:
    return RunLayout(run_dir).stage_dir(stage)


def _phase_dir(run_dir: Path, stage: str, phase: str) -> Path:
    return RunLayout(run_dir).checkpoints(stage, phase)


def _where(trainer) -> dict:
    """Where a training stage ran, for its manifest: device, world size, and the CPU's intra-op thread count.

    Same-seed CPU runs at another thread count differ in floating-point reduction order, so their scores can differ
    (``benchmarks/accuracy_glue_notes.md``: up to 0.9 points of a GLUE cell); the manifest says which count ran.
    """
    return {"device": str(trainer.args.device), "world_size": world_size(), "cpu_threads": torch.get_num_threads()}


def _fingerprint(recipe: Recipe, run_dir: Path, stage: str, phase: str) -> str:
    """The stage's up-to-date key (:func:`nxm_deploy.stages.stage_key`: what it reads of the recipe, not the settings
    that change speed only, and the sha256 of its input stages' manifests) plus stage and phase names.

    A checkpoint left under other settings, or trained from another input model (a dense or sparse stage replaced
    since), is refused (:func:`~nxm_deploy.training.trainer.check_fingerprint`).
    """
    return f"{stage_key(get_stage(stage), StageContext(recipe, run_dir))}:{stage}:{phase}"


def _drop_checkpoints(run_dir: Path, stage: str) -> None:
    """Remove a stage's checkpoints once its artifact is written (they are only for resuming a killed run)."""
    if not is_main_process():
        return
    layout = RunLayout(run_dir)
    shutil.rmtree(layout.checkpoints(stage), ignore_errors=True)
    with contextlib.suppress(OSError):
        layout.checkpoints().rmdir()


def _write_stage(run_dir: Path, stage: str, write) -> None:
    """Rank 0 writes the stage directory atomically (``write(tmp_dir)``), every rank waits, checkpoints go."""
    if is_main_process():
        with atomic_dir(_stage_dir(run_dir, stage)) as tmp:
            write(tmp)
    barrier()
    _drop_checkpoints(run_dir, stage)


def adopt_stages(recipe: Recipe, run_dir: str | Path, source: str | Path, stages: tuple[str, ...] = ("dense", "admm"),
                 *, checked: bool = False) -> dict[str, str]:
    """Copy finished training stages from another run directory (``nxm-deploy train ... --from-run SOURCE``).

    One dense and sparse model can then serve many QAT variants: each variant is its own run (its recipe, its
    ``qat/``), with byte-identical copies of the source's stage directories. A stage is adopted only when every
    file its manifest records still has its sha256, and only when ``recipe`` agrees with the source run's
    recipe on every key those stages read (:data:`nxm_deploy.stages.STAGES`). A stage up to date in ``run_dir`` is
    kept, a stale one (trained under another recipe) is replaced; a kept stage whose manifest differs from the
    source's ends the adoption, since the source's later stages were trained from another model.
    ``checked``: :func:`check_adoption` already passed for these arguments (the CLI runs it before creating the
    run directory), so the source files are not hashed a second time.

    Returns:
        dict: ``{stage: sha256 of the adopted manifest.json}`` for the stages copied now.

    Raises:
        RunDirError: ``source`` is not a run directory, a stage has not finished there, or its files changed.
        ConfigError: the two recipes differ on a key the adopted stages read (every such key is named).
    """
    run_dir, source = Path(run_dir), Path(source)
    if not checked:
        check_adoption(recipe, source, stages)
    adopted = {}
    for stage in stages:
        local = RunLayout(run_dir).stage_manifest(stage)
        if local.is_file() and is_up_to_date(get_stage(stage), StageContext(recipe, run_dir)):
            if local.read_bytes() != RunLayout(source).stage_manifest(stage).read_bytes():
                log.info("stage %s: kept (up to date here, another model than %s's): no later stage adopted",
                         stage, source)
                break
            continue
        if is_main_process():
            with atomic_dir(_stage_dir(run_dir, stage)) as tmp:
                shutil.copytree(_stage_dir(source, stage), tmp, dirs_exist_ok=True)
        barrier()
        if is_main_process():  # the ledger: the adopted stage is up to date for this recipe
            record_stage(StageContext(recipe, run_dir), stage)
        adopted[stage] = sha256_file(RunLayout(run_dir).stage_manifest(stage))
        log.info("stage %s adopted from %s", stage, source)
    return adopted


def adoptable_stages(recipe: Recipe, source: str | Path) -> tuple[str, ...]:
    """The training stages of ``source`` that ``recipe`` may adopt: in chain order, each finished there, with its
    files intact, and reading no recipe key on which the two recipes differ; up to the first that fails.

    Raises:
        RunDirError: ``source`` is not a run directory.
    """
    other = open_run_dir(source)
    out = []
    for stage in TRAINING:
        if differing_keys(recipe, other, (stage,)) or not RunLayout(source).stage_manifest(stage).is_file():
            break
        read_stage_manifest(source, stage)  # raises when a recorded file changed
        out.append(stage)
    return tuple(out)


def check_adoption(recipe: Recipe, source: str | Path, stages: tuple[str, ...] = ("dense", "admm")) -> None:
    """The checks of :func:`adopt_stages`, without copying (so a refused ``--from-run`` creates nothing).

    Raises:
        RunDirError: ``source`` is not a run directory, a stage has not finished there, or its files changed.
        ConfigError: the two recipes differ on a key the stages read.
    """
    source = Path(source)
    other = open_run_dir(source)
    differ = differing_keys(recipe, other, stages)
    if differ:
        shown = ", ".join(f"{k}: {theirs!r} there, {ours!r} here" for k, (ours, theirs) in list(differ.items())[:4])
        raise ConfigError(f"Cannot adopt {'/'.join(stages)} from {source}: the recipes differ on {shown}"
                          f"{' ...' if len(differ) > 4 else ''}.",
                          hint="Use the same recipe (up to train.qat, export, engine, validate), or train these "
                               "stages in this run.")
    for stage in stages:
        read_stage_manifest(source, stage)  # every recorded file as its stage wrote it


def _same_on_every_rank(tensors: dict[str, torch.Tensor], what: str) -> list[float]:
    """Checksums of ``tensors`` on every torchrun rank; raises when the ranks disagree.

    Raises:
        SparsityVerificationError: the ranks hold different tensors (their trainings diverged).
    """
    sums = rank_checksums(tensors)
    if any(value != sums[0] for value in sums[1:]):
        differing = [name for name in sorted(tensors)
                     if len(set(rank_checksums({name: tensors[name]}))) > 1]
        raise SparsityVerificationError(
            f"The {what} differ across the {len(sums)} torchrun ranks ({len(differing)} tensors, first "
            f"{differing[:3]}): the data-parallel trainings diverged.")
    return sums


def _cpu_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state on the CPU (a candidate to restore later; never an alias of the live tensors)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _kd(recipe: Recipe, teacher, enabled: bool, weights=None) -> dict:
    """Trainer keywords of distillation from ``teacher`` with ``weights`` (default ``train.distillation``); none
    when ``enabled`` is False."""
    return {"teacher": teacher, "distillation": weights or recipe.train.distillation} if enabled else {}


# ---------------------------------------------------------------------------------------------------------
def train_dense(recipe: Recipe, run_dir: Path, glue_dir: str | None = None) -> dict:
    """Dense fine-tune of the base model on the task; writes ``dense/``.

    Raises:
        ConfigError: bad device / precision / world size (see :func:`~nxm_deploy.training.trainer.training_arguments`).
        RunDirError: checkpoints of another recipe in ``checkpoints/dense/``.
    """
    run_dir = Path(run_dir)
    _setup(recipe)
    task = recipe.task.spec()
    model, tokenizer = load_base_model(recipe.model.source, task.num_labels, recipe.model.random_init, recipe.train.seed,
                                       causal_lm=task.is_causal_lm)
    if task.source in ("files", "dataset") and task.label_list is not None:  # own data: the label names travel with the model
        model.config.id2label = dict(enumerate(task.label_list))
        model.config.label2id = {label: i for i, label in enumerate(task.label_list)}
    data = TaskData.from_recipe(recipe, tokenizer, glue_dir)
    cfg = recipe.train
    log.info("dense fine-tune: %s epochs at lr %g", cfg.dense.epochs, cfg.dense.learning_rate)
    trainer = build_trainer(model, data, cfg, output_dir=_phase_dir(run_dir, "dense", "finetune"),
                            epochs=cfg.dense.epochs, learning_rate=cfg.dense.learning_rate)
    stats = train_resumable(trainer, _fingerprint(recipe, run_dir, "dense", "finetune"))
    stats["rank_checksums"] = _same_on_every_rank(_cpu_state(model), "dense weights")
    metrics = dev_metrics(trainer)
    log.info("dense dev %s", metrics)
    manifest = {
        "stage": "dense", "recipe_sha256": recipe.sha256(), "task": task.name, "metrics": metrics,
        "train_examples": len(data.train_examples), "dev_examples": len(data.dev_examples),
        **_where(trainer), "select": cfg.select, **stats,
    }

    def write(tmp):
        save_model_dir(model, tokenizer, tmp)
        manifest["files"] = file_hashes(tmp)
        atomic_write_json(tmp / MANIFEST, manifest)

    _write_stage(run_dir, "dense", write)
    return manifest


def admm_masks(search: MaskSearch) -> MaskResult:
    """The ``admm`` mask method (:mod:`nxm_deploy.sparsity.methods`): ADMM W-steps (task/KD loss + penalty or
    proximal step), Z/U updates on schedule, then the hard projection of the kept epoch's W.

    NxMTransformer (Holmes et al., NeurIPS 2021), Eq. 4-7. ``train.select: best`` keeps the ADMM epoch whose
    hard-projected model scores best on dev (the authors' evaluation); that projection is a candidate of the stage
    (:attr:`MaskResult.candidate`). The phase's last Trainer checkpoint stays until the stage ends: a stage killed
    in the masked fine-tune resumes this phase from it (weights, ADMM state, log history; no step left to train)
    and projects the same weights again.
    """
    recipe, acfg = search.recipe, search.recipe.train.admm
    admm = ADMMCallback.from_recipe(recipe, squash_at_end=False)
    log.info("ADMM %s%s: %s epochs at lr %g, rho %g (%s)", recipe.pattern, " + KD" if search.kd else "", acfg.epochs,
             acfg.learning_rate, acfg.rho, acfg.penalty_mode)
    trainer = build_trainer(search.student, search.data, recipe.train,
                            output_dir=_phase_dir(search.run_dir, "admm", "admm"), epochs=acfg.epochs,
                            learning_rate=acfg.learning_rate, admm=admm, **search.kd)
    stats = train_resumable(trainer, search.fingerprint("admm"))
    masks = {k: v.cpu() for k, v in admm.finish().items()}  # hard projection of the kept epoch's W
    stats["rank_checksums"] = _same_on_every_rank({**masks, **_cpu_state(search.student)}, "ADMM masks and weights")
    return MaskResult(masks=masks, epochs=acfg.epochs, stats=stats, history=list(admm.sparsifier.history),
                      candidate={"label": f"ADMM hard projection (epoch {stats.get('selected_epoch')})",
                                 "epoch": stats.get("selected_epoch")})


def mask_agreement(masks: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    """How ``masks`` differ from ``reference`` (both ``fqn -> bool``, True = keep): the fraction of kept positions
    of ``masks`` that ``reference`` prunes, over all layers and at most in one layer."""
    kept = differ = 0
    worst = 0.0
    for fqn, mask in masks.items():
        mask = mask.bool().cpu()
        n_kept = int(mask.sum())
        n_differ = int((mask & ~reference[fqn].bool().cpu()).sum())
        kept, differ = kept + n_kept, differ + n_differ
        worst = max(worst, n_differ / max(n_kept, 1))
    return {"kept_positions_differing": differ / max(kept, 1), "max_layer": worst}


def better_candidate(task, challenger: dict, incumbent: dict) -> bool:
    """Whether dev metrics ``challenger`` beat ``incumbent`` on the task's primary metric (strictly: a tie keeps the
    incumbent, the earlier candidate, as the Trainer's ``load_best_model_at_end`` does;
    ``benchmarks/PROTOCOL.md``, protocol v2)."""
    a, b = challenger.get(task.primary_metric), incumbent.get(task.primary_metric)
    if a is None or a != a:
        return False
    if b is None or b != b:
        return True
    return a > b if task.greater_is_better else a < b


def train_admm(recipe: Recipe, run_dir: Path, glue_dir: str | None = None) -> dict:
    """n:m sparse fine-tune from the dense model; writes ``sparse/``.

    ``sparsity.method`` finds the mask (:mod:`nxm_deploy.sparsity.methods`: ``magnitude``, ``admm``, ``wanda``,
    ``sparsegpt``); then every method gets the same KD masked fine-tune (masks enforced after every optimizer step,
    :class:`~nxm_deploy.training.trainer.MaskedFinetuneCallback`) for the rest of the stage's epochs
    (``train.admm.epochs + masked_finetune_epochs`` in all). ``train.select: best`` keeps, among the method's
    candidate (ADMM's hard projection of its best epoch) and every masked epoch, the best on dev by the task's primary
    metric, ties to the earlier (protocol v2, ``benchmarks/PROTOCOL.md``). The manifest records how the mask differs
    from the n:m magnitude mask of the same dense weights.

    Raises:
        RunDirError: the dense stage has not finished; checkpoints of another recipe.
        ConfigError: an unknown ``sparsity.method``.
        MissingDependencyError: the method's extra is not installed (SparseGPT: ModelOpt).
        SparsityVerificationError: a pruned weight is non-zero at the end.
    """
    run_dir = Path(run_dir)
    _setup(recipe)
    read_stage_manifest(run_dir, "dense")
    method = get_method(recipe.sparsity.method)
    find = method.function()  # before any work: a missing extra stops here
    task = recipe.task.spec()
    cfg, acfg = recipe.train, recipe.train.admm
    pattern = recipe.pattern
    teacher, tokenizer = load_stage_model(run_dir, "dense")
    student = copy.deepcopy(teacher)
    data = TaskData.from_recipe(recipe, tokenizer, glue_dir)

    decisions = require_targets(student, pattern, recipe.sparsity.include, recipe.sparsity.exclude)
    targets = target_names(decisions)
    kd = _kd(recipe, teacher, acfg.distill)
    device = train_device(cfg)
    search = MaskSearch(recipe=recipe, run_dir=run_dir, student=student, teacher=teacher, data=data, targets=targets,
                        pattern=pattern, kd=kd,
                        calibration=calibration_loop(data, cfg, recipe.sparsity.calibration_batches, device),
                        device=device, fingerprint=lambda phase: _fingerprint(recipe, run_dir, "admm", phase))
    log.info("sparse stage: %s %s masks (%s)", pattern, method.label, method.source.split(":")[0])
    result = find(search)
    student.cpu()
    apply_masks_(student, result.masks)
    masks = result.masks
    agreement = mask_agreement(masks, magnitude_masks(teacher, targets, pattern))
    log.info("mask: %.2f%% of kept positions differ from the magnitude mask", 100 * agreement["kept_positions_differing"])
    finetune_epochs = max(acfg.epochs + acfg.masked_finetune_epochs - result.epochs, 0.0)
    # scored by an evaluation-only Trainer: evaluating the training Trainer before train() keeps accelerate
    # from wrapping the model in DDP under torchrun
    projected_metrics = evaluate_model(student, data, cfg)
    candidate_state = _snapshot(student) if result.candidate is not None and cfg.select == "best" else None
    trainer = build_trainer(student, data, cfg, output_dir=_phase_dir(run_dir, "admm", "masked_finetune"),
                            epochs=finetune_epochs, learning_rate=acfg.learning_rate,
                            callbacks=[MaskedFinetuneCallback(masks)], **kd)
    ft_stats = None
    if finetune_epochs > 0:
        log.info("masked fine-tune: %s epochs at lr %g", finetune_epochs, acfg.learning_rate)
        ft_stats = train_resumable(trainer, _fingerprint(recipe, run_dir, "admm", "masked_finetune"))
    metrics = dev_metrics(trainer)
    kept = f"masked fine-tune epoch {ft_stats['selected_epoch']}" if ft_stats else "the masks, no fine-tune"
    if candidate_state is not None and not better_candidate(task, metrics, projected_metrics):
        student.load_state_dict(candidate_state)  # the method's own model wins (a tie goes to it, the earlier)
        metrics, kept = projected_metrics, result.candidate["label"]
    log.info("sparse stage keeps %s", kept)
    mask_check = check_masks(student, masks, pattern)
    mask_check["rank_checksums"] = _same_on_every_rank({**masks, **_cpu_state(student)}, "n:m masks and weights")
    log.info("sparse dev %s", metrics)
    epoch_metrics = [{"after": f"epoch {e['epoch']:g}", **{k: v for k, v in e.items() if k not in ("epoch", "step")}}
                     for e in (result.stats or {}).get("epoch_metrics", [])]
    manifest = {
        "stage": "admm", "recipe_sha256": recipe.sha256(), "task": task.name, "pattern": str(pattern),
        "metrics": metrics, "metrics_after_projection": projected_metrics, "epoch_metrics": epoch_metrics,
        "method": method.name, "kept": kept, "mask_vs_magnitude": agreement, "method_details": result.details,
        "admm_history": result.history, "admm": acfg.model_dump(mode="json"), "train": result.stats,
        "masked_finetune": ft_stats, "mask_check": mask_check, "select": cfg.select,
        **_where(trainer),
        "targets": targets, "layers": [d.to_dict() for d in decisions],
    }

    def write(tmp):
        save_model_dir(student, tokenizer, tmp)
        save_file({k: v.cpu().contiguous() for k, v in masks.items()}, str(tmp / MASKS))
        manifest["files"] = file_hashes(tmp)
        atomic_write_json(tmp / MANIFEST, manifest)

    _write_stage(run_dir, "admm", write)
    return manifest


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
    task = recipe.task.spec()
    cfg, qcfg = recipe.train, recipe.train.qat
    pattern = recipe.pattern
    sparse_fp, tokenizer = load_stage_model(run_dir, "admm")
    student = copy.deepcopy(sparse_fp)
    teacher = sparse_fp
    if qcfg.distill and qcfg.epochs > 0 and qcfg.teacher == "dense":
        read_stage_manifest(run_dir, "dense")
        teacher, _ = load_stage_model(run_dir, "dense")
    masks = load_masks(run_dir)
    data = TaskData.from_recipe(recipe, tokenizer, glue_dir)
    targets = sparse_manifest["targets"]
    quantize_model_(student, targets, learn_amax=qcfg.learn_amax)
    placed = place_quantizers_(student, targets, learn_amax=qcfg.learn_amax, **qcfg.quantizers.model_dump())
    kd = _kd(recipe, teacher, qcfg.distill and qcfg.epochs > 0, qcfg.distillation)
    device = train_device(cfg)
    student.to(device)
    calibrate(student, calibration_loop(data, cfg, qcfg.calibration_batches, device),
              method=qcfg.calibration_method, percentile=qcfg.percentile)
    ptq_metrics = evaluate_model(student, data, cfg)  # not the training Trainer (see train_admm)
    ptq_state = _snapshot(student) if cfg.select == "best" and qcfg.epochs > 0 else None
    trainer = build_trainer(student, data, cfg, output_dir=_phase_dir(run_dir, "qat", "qat"),
                            epochs=qcfg.epochs, learning_rate=qcfg.learning_rate, quantized=True,
                            callbacks=[MaskedFinetuneCallback(masks)], **kd)
    log.info("PTQ INT8 dev %s", ptq_metrics)
    stats = None
    if qcfg.epochs > 0:
        log.info("INT8 QAT%s: %s epochs at lr %g", f" + KD ({qcfg.teacher} teacher)" if kd else "", qcfg.epochs,
                 qcfg.learning_rate)
        stats = train_resumable(trainer, _fingerprint(recipe, run_dir, "qat", "qat"))
    metrics = dev_metrics(trainer)
    kept = f"QAT epoch {stats['selected_epoch']}" if stats else "PTQ"
    if ptq_state is not None and not better_candidate(task, metrics, ptq_metrics):
        student.load_state_dict(ptq_state)  # the PTQ model is a candidate too, the earliest (protocol v2)
        metrics, kept = ptq_metrics, "PTQ"
    log.info("QAT stage keeps %s", kept)
    mask_check = check_masks(student, masks, pattern)
    mask_check["rank_checksums"] = _same_on_every_rank(_cpu_state(student), "QAT weights and scales")
    log.info("QAT INT8 dev %s", metrics)
    quant_info = {
        "quantized_modules": targets, "num_bits": 8, "symmetric": True, "zero_point": 0,
        "range": [-128, 127], "scale": "amax / 127", "weights": "per output channel (axis 0)",
        "activations": "per tensor: input of each quantized Linear, plus the groups below",
        "quantizer_groups": qcfg.quantizers.model_dump(),
        "placement": {"gemm_outputs": placed["gemm_outputs"], "attention": placed["attention"],
                      "softmax_calibration": "max",
                      **({"attention_skipped": placed["attention_skipped"]} if "attention_skipped" in placed else {})},
        "calibration": {"method": qcfg.calibration_method, "percentile": qcfg.percentile, "batches": qcfg.calibration_batches},
        "learn_amax": qcfg.learn_amax,
    }
    manifest = {
        "stage": "qat", "recipe_sha256": recipe.sha256(), "task": task.name, "pattern": str(pattern),
        "kd_teacher": qcfg.teacher if qcfg.distill else None,
        "kd_weights": (qcfg.distillation or recipe.train.distillation).model_dump() if qcfg.distill else None,
        "metrics": metrics, "ptq_metrics": ptq_metrics, "kept": kept, "train": stats, "mask_check": mask_check,
        "select": cfg.select, **_where(trainer),
    }

    def write(tmp):
        save_model(student, str(tmp / QAT_WEIGHTS), force_contiguous=True)  # tied tensors once
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / QUANT_INFO, quant_info)
        manifest["files"] = file_hashes(tmp)
        atomic_write_json(tmp / MANIFEST, manifest)

    _write_stage(run_dir, "qat", write)
    return manifest


def calibration_loop(data: TaskData, train_cfg, batches: int, device):
    """``forward_loop(model)`` for :func:`~nxm_deploy.quantization.calibrate`: the first ``batches`` training batches.

    The batches are those of the first training epoch (the Trainer's length-grouped order, seed ``train.seed``,
    global batch ``train.batch_size``), the same on every torchrun rank, so every rank calibrates the same scales.
    """
    loader = data.train_loader(train_cfg.batch_size, train_cfg.seed)

    @torch.no_grad()
    def forward_loop(model):
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            batch.pop("labels", None)
            model(**{k: v.to(device) for k, v in batch.items()})

    return forward_loop


def run_dense(ctx) -> dict:
    """Stage ``dense`` of the chain (:data:`nxm_deploy.stages.STAGES`): :func:`train_dense`."""
    return train_dense(ctx.recipe, ctx.run_dir, ctx.glue_dir)


def run_admm(ctx) -> dict:
    """Stage ``admm`` of the chain: :func:`train_admm` (``sparse/``)."""
    return train_admm(ctx.recipe, ctx.run_dir, ctx.glue_dir)


def run_qat(ctx) -> dict:
    """Stage ``qat`` of the chain: :func:`train_qat`."""
    return train_qat(ctx.recipe, ctx.run_dir, ctx.glue_dir)
