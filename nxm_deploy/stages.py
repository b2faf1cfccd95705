"""The stages of a run, their inputs and outputs, and the one executor that runs any chain of them.

A run is the chain ``dense -> admm -> qat -> export -> engines -> validate`` (then the report). Each stage is a
:class:`Stage`: its name, the recipe keys that decide its output (``reads``), the stages whose artifacts it reads
(``inputs``, checked by the sha256 of their manifests), and the one output of the run directory it writes
(:class:`~nxm_deploy.run.layout.RunLayout`), committed atomically together with its manifest by the stage itself.

:func:`run_stages` runs stages in order. A stage is **up to date**, and skipped, when the run's ledger
(``stages.json``) records the same key for it -- the hash of the recipe values it reads, of its own data files
and of its inputs' manifests (for ``engines`` also of its spec files and of this machine's TensorRT version and
GPU) -- and its manifest (and every file the manifest records) is still the one it wrote. That rule,
:func:`recorded_up_to_date`, is the only one: ``nxm-deploy build-engine`` applies it to each engine too.
Change a recipe section and the stages that read it rerun, with every stage downstream of them (their inputs'
manifests changed); the stages before are kept. A killed stage resumes from its training checkpoints. The same
``reads`` decide which checkpoints a training phase may resume from and whether ``--from-run`` may adopt a stage.

``nxm-deploy run`` is :func:`run_stages` over the whole chain; the stage commands (``train``, ``export``,
``validate``) are calls of it with ``force`` for the stages they name.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nxm_deploy.errors import ConfigError, RunDirError
from nxm_deploy.fileio import (
    LockBusy, atomic_write_json, exclusive_lock, read_json, sha256_file, verify_stage_files,
)
from nxm_deploy.run.layout import RunLayout
from nxm_deploy.ranks import is_main_process

log = logging.getLogger("nxm_deploy.stages")

#: ``train`` keys every training stage reads (the schedule of each stage is its own section); the keys that change
#: speed, not results (``num_threads``, ``checkpoint_every_steps``, ``dataloader_workers``) are read by none
TRAIN_COMMON = ("train.seed", "train.batch_size", "train.eval_batch_size", "train.weight_decay", "train.warmup_ratio",
                "train.max_grad_norm", "train.device", "train.precision", "train.select")


@dataclass
class StageContext:
    """What every stage is called with.

    Attributes:
        recipe (Recipe): the run's recipe.
        run_dir (Path): the run directory.
        glue_dir (str | None): the GLUE data root (None: the recipe's, ``NXM_GLUE_DIR`` or Hugging Face).
        engine_specs (list[str]): resolved engine spec paths (:func:`nxm_deploy.pipeline.preflight`).
    """

    recipe: object
    run_dir: Path
    glue_dir: str | None = None
    engine_specs: list[str] = field(default_factory=list)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)


@dataclass(frozen=True)
class Stage:
    """One stage of a run.

    Attributes:
        name: its name in the CLI, the ledger and the manifests.
        reads: recipe keys (dotted; a section name covers its keys) whose values decide the output.
        inputs: the stages whose artifacts it reads.
        output: the :class:`RunLayout` entry it writes (``dense``, ``sparse``, ``qat``, ``onnx``, ``engines``,
            ``validation``); the file that stands for it is :meth:`RunLayout.stage_output`.
        run: ``"module:function"`` taking a :class:`StageContext`; it writes the output and its manifest.
        every_rank: under torchrun every rank runs it (the training stages); else rank 0 alone.
    """

    name: str
    reads: tuple[str, ...]
    inputs: tuple[str, ...]
    output: str
    run: str
    every_rank: bool = False

    def function(self) -> Callable[[StageContext], dict]:
        module, _, attr = self.run.partition(":")
        return getattr(importlib.import_module(module), attr)

    def manifest(self, layout: RunLayout) -> Path:
        """The manifest that stands for the stage's output in ``layout``."""
        return layout.stage_output(self.name)


STAGES: tuple[Stage, ...] = (
    Stage("dense", ("model", "task", *TRAIN_COMMON, "train.dense"), (), "dense",
          "nxm_deploy.training.stage:run_dense", every_rank=True),
    Stage("admm", ("model", "task", "sparsity", *TRAIN_COMMON, "train.admm", "train.distillation"), ("dense",),
          "sparse", "nxm_deploy.training.stage:run_admm", every_rank=True),
    Stage("qat", ("model", "task", "sparsity", *TRAIN_COMMON, "train.qat", "train.distillation"), ("dense", "admm"),
          "qat", "nxm_deploy.training.stage:run_qat", every_rank=True),
    Stage("export", ("task", "sparsity", "export"), ("dense", "admm", "qat"), "onnx", "nxm_deploy.export.stage:run_export"),
    Stage("engines", ("engine",), ("export",), "engines", "nxm_deploy.engine.stage:run_engines"),
    Stage("validate", ("task", "validate"), ("dense", "admm", "qat", "export", "engines"), "validation",
          "nxm_deploy.validate.stage:run_validate"),
)
#: the training stages (every torchrun rank runs them)
TRAINING: tuple[str, ...] = tuple(s.name for s in STAGES if s.every_rank)


def get_stage(name: str) -> Stage:
    """The registered stage called ``name``.

    Raises:
        ConfigError: unknown name (the known ones are listed).
    """
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ConfigError(f"Unknown stage {name!r}; the stages are {', '.join(s.name for s in STAGES)}.")


def _flatten(data: dict, prefix: str = "") -> dict:
    """A nested dict (a recipe's ``to_dict()``) as ``{"dotted.key": value}``."""
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _covered(key: str, reads: Iterable[str]) -> bool:
    return any(key == r or key.startswith(r + ".") for r in reads)


def read_values(recipe, reads: Iterable[str]) -> dict:
    """The flattened recipe values under ``reads`` (dotted keys) but those the recipe's choices leave unread
    (:meth:`Recipe.unread_keys`: ADMM-only fields under magnitude pruning), plus the sha256 of your own data files
    when ``task`` is read."""
    reads = tuple(reads)
    unread = recipe.unread_keys()
    values = {k: v for k, v in _flatten(recipe.to_dict()).items() if _covered(k, reads) and k not in unread}
    if _covered("task.name", reads):
        digests = recipe.data_digests()
        if digests:
            values["data_sha256"] = digests
    return values


def recipe_key(recipe, stage: str) -> str:
    """sha256 of what ``stage`` reads of ``recipe`` (:func:`read_values`): equal keys, equal stage output given
    equal inputs. Training checkpoints carry it, so a checkpoint of other settings is never resumed."""
    data = json.dumps(read_values(recipe, get_stage(stage).reads), sort_keys=True, default=str)
    return hashlib.sha256(f"{stage}:{data}".encode()).hexdigest()


def differing_keys(recipe, other, stages: Iterable[str]) -> dict[str, tuple]:
    """``{key: (value in recipe, value in other)}`` for the values read by any of ``stages`` (:func:`read_values`:
    recipe keys and your own data files' sha256) that differ between the two recipes, sorted by key."""
    reads = tuple(r for s in stages for r in get_stage(s).reads)
    ours, theirs = read_values(recipe, reads), read_values(other, reads)
    return {k: (ours.get(k), theirs.get(k)) for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)}


def engine_environment() -> dict:
    """What of this machine decides the ``engines`` stage's output: ``{"tensorrt": version, "sm": "90"}``, None
    for what is missing (a CPU machine: both None). Probed by :func:`nxm_deploy.engine.trt.probe_environment`
    (ctypes and the ``tensorrt`` import; no CUDA context). Never raises."""
    from nxm_deploy.engine import trt

    env = trt.probe_environment()
    return {"tensorrt": env.tensorrt_version, "sm": env.gpu.sm if env.gpu is not None else None}


def stage_key(stage: Stage, ctx: StageContext) -> str:
    """The up-to-date key of ``stage`` in ``ctx``: what it reads of the recipe, its inputs' manifests (sha256),
    and for ``engines`` the content of the engine spec files and this machine's TensorRT version and GPU SM
    (:func:`engine_environment`), so a run whose engines were skipped on a CPU machine builds them when resumed
    on a GPU machine, and a rerun on the same machine stays up to date."""
    layout = ctx.layout
    inputs = {}
    for name in stage.inputs:
        path = get_stage(name).manifest(layout)
        inputs[name] = sha256_file(path) if path.is_file() else None
    data = {"recipe": recipe_key(ctx.recipe, stage.name), "inputs": inputs, "extra": {}}
    if stage.name == "engines":
        data["extra"] = {str(p): (sha256_file(p) if Path(p).is_file() else None) for p in ctx.engine_specs}
        data["environment"] = engine_environment()
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def read_ledger(run_dir: str | Path) -> dict:
    """``stages.json`` of a run: ``{stage: {"key", "manifest_sha256", "seconds", "finished"}}``; {} when absent."""
    path = RunLayout(run_dir).ledger
    return read_json(path) if path.is_file() else {}


def recorded_up_to_date(recorded_key: str | None, key: str, files: Mapping[Path, str | None], *,
                        stage_dir: Path | None = None, regenerate: str = "nxm-deploy run",
                        what: str = "output") -> bool:
    """The one rule for "up to date, skip it": of a stage (:func:`is_up_to_date`, the record is its ledger entry)
    and of one engine (:func:`nxm_deploy.engine.stage.up_to_date`, the record is the engine's manifest).

    Up to date when, checked in this order:

    1. the record's key ``recorded_key`` equals ``key``, what decides the output now;
    2. every file of ``files`` (``{path: sha256 the record holds for it}``: a stage's manifest, an engine's plan)
       exists and has that sha256; a file the record holds no sha256 for is not up to date;
    3. with ``stage_dir``: every file its ``manifest.json`` records (key ``files``) still has its recorded sha256
       (:func:`nxm_deploy.fileio.verify_stage_files`); a file that fails is logged as a warning
       (``<what>: <which file, how>; it runs again``, ``regenerate`` is the command in the message).

    Returns:
        bool: True when the output can be kept; a missing or changed file is "not up to date", never an error.

    Raises:
        OSError: a file exists but cannot be read (permissions).
    """
    if not key or recorded_key != key:
        return False
    for path, recorded in files.items():
        if not recorded or not Path(path).is_file() or sha256_file(path) != recorded:
            return False
    if stage_dir is not None:
        try:
            verify_stage_files(stage_dir, regenerate)
        except RunDirError as exc:
            log.warning("%s: %s; it runs again", what, exc.message)
            return False
    return True


def is_up_to_date(stage: Stage, ctx: StageContext, key: str | None = None) -> bool:
    """Whether ``stage`` can be skipped (:func:`recorded_up_to_date`): the ledger records ``key`` (default: the
    stage's key now, :func:`stage_key`) for it, its manifest has the sha256 the ledger records, and for training
    stages and the export every file the manifest records is intact.

    Raises:
        ValueError / OSError: ``stages.json`` is not readable JSON (a changed or missing output is no error).
    """
    entry = read_ledger(ctx.run_dir).get(stage.name) or {}
    manifest = stage.manifest(ctx.layout)
    checks_files = stage.name in TRAINING or stage.name == "export"
    return recorded_up_to_date(entry.get("key"), key or stage_key(stage, ctx),
                               {manifest: entry.get("manifest_sha256")},
                               stage_dir=manifest.parent if checks_files else None,
                               regenerate=f"nxm-deploy run {ctx.run_dir}", what=f"stage {stage.name}")


def record_stage(ctx: StageContext, name: str, seconds: float = 0.0, key: str | None = None) -> None:
    """Write ``name`` into the run's ledger as up to date: its key (computed now unless given) and the sha256 of
    its manifest (a stage that ran, or one adopted from another run)."""
    stage = get_stage(name)
    key = key or stage_key(stage, ctx)
    ledger = read_ledger(ctx.run_dir)
    ledger[stage.name] = {"key": key, "manifest_sha256": sha256_file(stage.manifest(ctx.layout)),
                          "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(ctx.layout.ledger, ledger)


#: lock files this process holds, with their nesting depth (the pipeline, a stage command and the executor nest)
_HELD: dict[Path, int] = {}


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path) -> Iterator[None]:
    """Hold the run directory's lock (:attr:`RunLayout.lock`) for the block: one process at a time runs stages in a
    run directory, so no stage is trained from an input that another run replaces under it.

    Re-entrant within a process (``nxm-deploy run``, the stage commands and :func:`run_stages` each take it); under
    torchrun rank 0 alone holds it. A lock whose holder ended without releasing it (killed) is free, since the kernel
    releases it; it is taken over with a warning that names the old holder. Engine builds
    (``nxm-deploy build-engine``) take their own finer locks and do not wait for this one.

    Raises:
        RunDirError: another process holds it (one line: its pid, host, start time and command).
    """
    if not is_main_process():
        yield
        return
    path = RunLayout(run_dir).lock
    if _HELD.get(path):
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["nxm-deploy" if i == 0 else a for i, a in enumerate(sys.argv)])[:300]}
    stack = contextlib.ExitStack()
    try:
        stale = stack.enter_context(exclusive_lock(path, holder))
    except LockBusy as exc:
        other = exc.holder
        raise RunDirError(
            f"Run directory {run_dir} is in use: pid {other.get('pid', '?')} on {other.get('host', '?')} holds it "
            f"since {other.get('started', '?')} (`{other.get('command', '?')}`).",
            hint="Wait for that run to finish (or stop it); two runs must not write one run directory. Use another "
            "--run-dir to run beside it.") from None
    with stack:
        if stale:
            log.warning("%s: taking over the lock of pid %s on %s (started %s), which ended without releasing it",
                        run_dir, stale.get("pid", "?"), stale.get("host", "?"), stale.get("started", "?"))
        _HELD[path] = 1
        try:
            yield
        finally:
            _HELD.pop(path, None)


def run_stages(ctx: StageContext, names: Iterable[str] | None = None, *, force: Iterable[str] = ()) -> dict[str, dict]:
    """Run stages in chain order, skipping the up-to-date ones.

    Args:
        ctx: recipe, run directory, data root, engine specs.
        names: the stages to consider (default: the whole chain); they run in chain order.
        force: stages that run even when up to date (a stage command asks for its stage).

    Returns:
        dict: ``{stage: {"status": "ran" | "up to date", "seconds": float}}`` (under torchrun, ranks other than 0
        return after the training stages).

    Raises:
        RunDirError: another process runs stages in this run directory (:func:`hold_run_dir`).
        whatever a stage raises (the ledger keeps the stages finished before it).
    """
    wanted = [s.name for s in STAGES] if names is None else list(names)
    for name in wanted:
        get_stage(name)  # raises on an unknown name
    with hold_run_dir(ctx.run_dir):
        return _run_stages(ctx, wanted, set(force))


def _run_stages(ctx: StageContext, wanted: list[str], force: set[str]) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for stage in STAGES:
        if stage.name not in wanted:
            continue
        if not stage.every_rank and not is_main_process():
            return results  # under torchrun every rank trains; rank 0 alone exports, builds, validates
        key = stage_key(stage, ctx)
        if stage.name not in force and is_up_to_date(stage, ctx, key):
            log.info("stage %s: up to date (%s)", stage.name, ctx.layout.relative(stage.manifest(ctx.layout)))
            results[stage.name] = {"status": "up to date", "seconds": 0.0}
            continue
        log.info("stage %s: start", stage.name)
        start = time.perf_counter()
        stage.function()(ctx)
        seconds = time.perf_counter() - start
        if is_main_process():
            record_stage(ctx, stage.name, seconds, key)
        results[stage.name] = {"status": "ran", "seconds": round(seconds, 1)}
        log.info("stage %s: finished in %.1f s", stage.name, seconds)
    return results
