"""Shared fixtures: the real GLUE data dir (skip when absent) and the tiny smoke recipe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

# Tokenizers fork-safety warnings (and their thread pools) are noise in tests.
os.environ["TOKENIZERS_PARALLELISM"] = "false"



def _pin_xdist_worker() -> None:
    """Under pytest-xdist (``make test``: one worker per core), pin each worker, and the processes it starts, to one
    core with one thread: two workers with a thread pool each on the same cores run the suite 3x slower (measured)
    than one. ONNX Runtime follows the affinity (:func:`nxm_deploy.machine.usable_cores`), PyTorch the variables."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


_pin_xdist_worker()
REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO_ROOT / "recipes" / "tiny_smoke.yaml"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (holds ``recipes/`` and ``engines/``)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """Real GLUE TSV root: ``$NXM_GLUE_DIR`` when it names a directory, else ``../shared/data/glue``; skip otherwise."""
    env = os.environ.get("NXM_GLUE_DIR", "").strip()
    if env and Path(env).expanduser().is_dir():
        return Path(env).expanduser().resolve()
    shared = REPO_ROOT.parent / "shared" / "data" / "glue"
    if shared.is_dir():
        return shared.resolve()
    pytest.skip("GLUE data not found: set NXM_GLUE_DIR or place it at ../shared/data/glue")


#: the session's tiny run: the tiny recipe with the report's Polygraphy CLI re-run and plots on (off in the recipe for
#: the suite's speed), so that the tests of the run check them
TINY_RUN_SETS = ("validate.polygraphy_cli_checks=1", "validate.plots=true")


@pytest.fixture(scope="session")
def tiny_run(glue_dir, tmp_path_factory) -> tuple[int, Path]:
    """``(exit code, run dir)`` of one full ``nxm-deploy run`` of ``recipes/tiny_smoke.yaml`` (+ :data:`TINY_RUN_SETS`),
    shared by the tests of the session. cwd = repository root: engine spec paths are relative to it. A test that
    changes the run works on a copy."""
    from nxm_deploy.cli.main import main

    run_dir = tmp_path_factory.mktemp("tiny_run") / "tiny_smoke"
    sets = [arg for item in TINY_RUN_SETS for arg in ("--set", item)]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO_ROOT)
        rc = main(["-q", "run", str(TINY_RECIPE), "--glue-dir", str(glue_dir), "--run-dir", str(run_dir), *sets])
    return rc, run_dir


@pytest.fixture
def tiny_recipe_dict() -> dict:
    """The parsed YAML of ``recipes/tiny_smoke.yaml`` (a fresh dict per test, free to modify)."""
    return yaml.safe_load(TINY_RECIPE.read_text())


@pytest.fixture(scope="module")
def tiny_recipe_dict_module() -> dict:
    """Module-scoped twin of :func:`tiny_recipe_dict`, for module-scoped run fixtures."""
    return yaml.safe_load(TINY_RECIPE.read_text())
