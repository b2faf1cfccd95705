"""The main job: dense fine-tune -> ADMM n:m + KD -> INT8 QAT + KD -> ONNX export + n:m check -> TensorRT
engines (or skipped) -> ONNX Runtime validation -> report. The chain and its executor are
:mod:`nxm_deploy.stages`; this module checks the inputs, prepares the run directory and runs the chain."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from nxm_deploy.fileio import atomic_write_json, atomic_write_text, read_json
from nxm_deploy.config.recipe import Recipe
from nxm_deploy.errors import ConfigError, RunDirError

from nxm_deploy.run.layout import RunLayout

log = logging.getLogger("nxm_deploy.pipeline")


def resolve_spec_path(spec: str, recipe_path: str | Path | None = None) -> Path:
    """Find an engine spec named in a recipe: absolute, else relative to the cwd, the recipe's project root
    (the parent of ``recipes/``), or the recipe's directory.

    Raises:
        ConfigError: no candidate exists (all tried paths are named).
    """
    path = Path(spec)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    if not path.is_absolute() and recipe_path is not None:
        recipe_dir = Path(recipe_path).resolve().parent
        candidates += [recipe_dir.parent / path, recipe_dir / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"Engine spec {candidates[0]} not found (tried {', '.join(str(c) for c in candidates)}).",
        hint="Fix engine.specs in the recipe; paths are relative to the repository root.",
    )


def preflight(recipe: Recipe, glue_dir: str | None = None, recipe_path: str | Path | None = None) -> dict:
    """Check everything a run needs before any training starts: data files, model source, engine specs.

    Returns:
        dict: ``glue_dir`` (resolved, or None for the Hugging Face route) and ``engine_specs`` (absolute paths).

    Raises:
        DataError: GLUE files missing. ConfigError: bad model source or engine spec.
    """
    from nxm_deploy.data import load_task_split, resolve_glue_dir
    from nxm_deploy.engine.spec import load_engine_spec
    from nxm_deploy.models import resolve_source

    from nxm_deploy.training.trainer import check_train_settings

    check_train_settings(recipe.train)  # device, precision, torchrun world size vs batch: before any work
    task = recipe.task.spec()
    root = resolve_glue_dir(glue_dir or recipe.task.glue_dir)
    if task.source in ("files", "dataset"):  # own data: every row of both splits now (columns, labels), before training
        for split in ("train", "dev"):
            load_task_split(task, split)
    elif root is not None:
        for split in ("train", "dev"):
            load_task_split(task, split, root, max_examples=1)
    resolve_source(recipe.model.source)
    specs = [resolve_spec_path(spec, recipe_path) for spec in recipe.engine.specs]
    for spec in specs:
        load_engine_spec(spec)
    return {"glue_dir": str(Path(root).resolve()) if root is not None else None, "engine_specs": [str(s) for s in specs]}


def prepare_run_dir(recipe: Recipe, run_dir: str | Path, overwrite: bool = False, info: dict | None = None) -> Path:
    """Create ``run_dir`` for ``recipe``, or reuse the run it holds.

    A run directory of another recipe is reused too: its recipe is replaced, and :func:`nxm_deploy.stages.run_stages`
    reruns exactly the stages that read a changed key (and those after them). ``info`` (from :func:`preflight`) is
    stored in ``run.json`` so stage commands find the same data and specs. Under torchrun rank 0 alone writes the
    directory and every rank returns once it is written.

    Raises:
        RunDirError: the directory holds files that are not an nxm-deploy run, and ``overwrite`` is False.
    """
    from nxm_deploy.ranks import barrier, is_main_process

    run_dir = Path(run_dir)
    if is_main_process():
        _write_run_dir(recipe, run_dir, overwrite, info)
    barrier()
    return run_dir


def _write_run_dir(recipe: Recipe, run_dir: Path, overwrite: bool, info: dict | None) -> None:
    layout = RunLayout(run_dir)
    marker = layout.run_info
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            shutil.rmtree(run_dir)
        elif not marker.is_file():
            raise RunDirError(f"Run directory {run_dir} already holds files that are not an nxm-deploy run.",
                              hint="Pass --overwrite to replace it, or choose another --run-dir.")
        elif read_json(marker).get("recipe_sha256") != recipe.sha256():
            log.info("%s held another recipe: the stages that read a changed key run again", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.recipe, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    atomic_write_json(marker, {"name": recipe.name, "recipe_sha256": recipe.sha256(), **(info or {})})


def run_pipeline(recipe: Recipe, run_dir: str | Path, glue_dir: str | None = None,
                 recipe_path: str | Path | None = None, overwrite: bool = False,
                 from_run: str | Path | None = None) -> dict:
    """Check inputs (:func:`preflight`), run the chain (:func:`nxm_deploy.stages.run_stages`: up-to-date stages
    are skipped), write ``timings.json`` and the report (``report.md`` / ``report.json``); returns the report.

    ``from_run``: first adopt the training stages of that run which read nothing this recipe changes
    (:func:`nxm_deploy.training.stage.adoptable_stages`; copies checked by hash).

    Raises:
        RunDirError: ``from_run`` is not a finished run directory, or a file of it changed; another process runs
            stages in ``run_dir`` (:func:`nxm_deploy.stages.hold_run_dir`: one run per directory at a time).

    Under torchrun every rank trains (data-parallel); rank 0 alone prepares the run directory, writes the
    artifacts and runs the later stages; the other ranks return ``{}`` after training.
    """
    from nxm_deploy.stages import hold_run_dir

    info = preflight(recipe, glue_dir, recipe_path)
    with hold_run_dir(run_dir):  # from before the directory is (re)written to the report
        return _run_locked(recipe, Path(run_dir), info, overwrite, from_run)


def _run_locked(recipe: Recipe, run_dir: Path, info: dict, overwrite: bool, from_run: str | Path | None) -> dict:
    from nxm_deploy.stages import StageContext, run_stages
    from nxm_deploy.ranks import is_main_process
    from nxm_deploy.validate.report import build_report

    if from_run is not None:
        from nxm_deploy.training.stage import adoptable_stages

        adopt = adoptable_stages(recipe, from_run)  # checked before the run directory is written
    run_dir = prepare_run_dir(recipe, run_dir, overwrite, info)
    if from_run is not None and adopt:
        from nxm_deploy.training.stage import adopt_stages

        adopt_stages(recipe, run_dir, from_run, adopt, checked=True)
    ctx = StageContext(recipe=recipe, run_dir=run_dir, glue_dir=info["glue_dir"], engine_specs=info["engine_specs"])
    results = run_stages(ctx)
    if not is_main_process():
        return {}
    atomic_write_json(RunLayout(run_dir).timings, {name: r["seconds"] for name, r in results.items()})
    return build_report(recipe, run_dir)
