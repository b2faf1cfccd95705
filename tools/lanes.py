"""Lanes: several driver processes share one list of benchmark cells, each running the next cell nobody holds.

A cell is claimed by creating ``<run_dir>.claim/`` holding the claimant's pid (``mkdir`` is atomic); a claim whose
process is gone is taken over. The run directory's own lock (``nxm_deploy.stages.hold_run_dir``) still guards the
cell's stages. Used by ``tools/bench_accuracy.py --lanes`` and ``tools/pilot_v2.py run``: start one driver per core,
each cell at one torch thread (small models scale poorly over threads, so two lanes finish about twice the cells).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path


def claim(run_dir: str | Path) -> bool:
    """Take the cell of ``run_dir`` for this process; False when a live process holds it."""
    path = Path(f"{run_dir}.claim")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        try:
            os.kill(int((path / "pid").read_text()), 0)
            return False  # a live lane holds it
        except (OSError, ValueError):
            pass  # its holder ended: take it over
    (path / "pid").write_text(str(os.getpid()))
    return True


def release(run_dir: str | Path) -> None:
    """Give the cell of ``run_dir`` back (after it ran, or failed)."""
    shutil.rmtree(f"{run_dir}.claim", ignore_errors=True)


@contextlib.contextmanager
def claimed(run_dir: str | Path):
    """``with claimed(d) as mine:`` -- ``mine`` is :func:`claim`'s answer; a claim taken here is released at the end."""
    mine = claim(run_dir)
    try:
        yield mine
    finally:
        if mine:
            release(run_dir)


def wait_for(path: str | Path, poll_s: float = 30.0) -> None:
    """Block until ``path`` exists (a cell's input, finished by another lane)."""
    while not Path(path).exists():
        time.sleep(poll_s)
