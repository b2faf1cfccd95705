"""The main job: dense fine-tune -> ADMM n:m + KD -> INT8 QAT + KD -> ONNX export + n:m check -> TensorRT
engines (or skipped) -> ONNX Runtime validation -> report. Every stage is also a CLI command on a run directory."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import yaml

from nxm_deploy._io import atomic_write_json, atomic_write_text, read_json
from nxm_deploy.config.recipe import Recipe, load_recipe
from nxm_deploy.errors import RunDirError

log = logging.getLogger("nxm_deploy.pipeline")

RUN_FILE = "run.json"
RECIPE_FILE = "recipe.yaml"


def prepare_run_dir(recipe: Recipe, run_dir: str | Path, overwrite: bool = False) -> Path:
    """Create ``run_dir`` for ``recipe``, or reuse it when it holds the same recipe.

    Raises:
        RunDirError: the directory holds a different run (another recipe hash) or unrelated files, and
            ``overwrite`` is False.
    """
    run_dir = Path(run_dir)
    marker = run_dir / RUN_FILE
    if run_dir.exists() and any(run_dir.iterdir()):
        same = marker.is_file() and read_json(marker).get("recipe_sha256") == recipe.sha256()
        if not same:
            if not overwrite:
                what = "a different recipe" if marker.is_file() else "files that are not an nxm-deploy run"
                raise RunDirError(
                    f"Run directory {run_dir} already holds {what}.",
                    hint="Pass --overwrite to replace it, or choose another --run-dir.",
                )
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RECIPE_FILE, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    atomic_write_json(marker, {"name": recipe.name, "recipe_sha256": recipe.sha256()})
    return run_dir


def open_run_dir(run_dir: str | Path) -> Recipe:
    """The recipe stored in an existing run directory.

    Raises:
        RunDirError: not a run directory.
    """
    run_dir = Path(run_dir)
    if not (run_dir / RECIPE_FILE).is_file():
        raise RunDirError(
            f"{run_dir} is not a run directory (no {RECIPE_FILE}).",
            hint="Start a run with `nxm-deploy run RECIPE.yaml` or `nxm-deploy train RECIPE.yaml`.",
        )
    return load_recipe(run_dir / RECIPE_FILE)


def run_pipeline(recipe: Recipe, run_dir: str | Path, glue_dir: str | None = None, repo_root: str | Path = ".",
                 overwrite: bool = False) -> dict:
    """Run every stage in order and write ``report.md`` / ``report.json``; returns the report dict."""
    from nxm_deploy.engine.stage import engine_stage
    from nxm_deploy.export.stage import export_stage
    from nxm_deploy.training.stage import train_stage
    from nxm_deploy.validate.report import build_report
    from nxm_deploy.validate.stage import validate_stage

    run_dir = prepare_run_dir(recipe, run_dir, overwrite)
    timings = {}
    steps = [
        ("train", lambda: train_stage(recipe, run_dir, glue_dir)),
        ("export", lambda: export_stage(recipe, run_dir, glue_dir)),
        ("engines", lambda: engine_stage(recipe, run_dir, repo_root)),
        ("validate", lambda: validate_stage(recipe, run_dir, glue_dir)),
    ]
    for name, func in steps:
        start = time.perf_counter()
        log.info("stage %s: start", name)
        func()
        timings[name] = round(time.perf_counter() - start, 1)
        log.info("stage %s: finished in %.1f s", name, timings[name])
    atomic_write_json(run_dir / "timings.json", timings)
    return build_report(recipe, run_dir)
