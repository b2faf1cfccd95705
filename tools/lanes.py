"""Lanes: several driver processes share one list of benchmark cells, each running the next cell nobody holds.

:func:`run_lane` is the one scheduling loop (``tools/bench_accuracy.py``, ``tools/pilot_v2.py run``): it takes, in the
list's order, the first cell that has not finished, whose input is ready and that no live lane holds. A cell whose
input another lane is still training is passed over, not waited for, so no lane idles while there is work it can do.

A cell is claimed by creating ``<run_dir>.claim/`` holding the claimant's pid (``mkdir`` is atomic); a claim whose
process is gone is taken over. The run directory's own lock (``nxm_deploy.stages.hold_run_dir``) still guards the
cell's stages. Start one driver per core, each cell at one torch thread (small models scale poorly over threads, so
two lanes finish about twice the cells).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar

C = TypeVar("C")


def claim(run_dir: str | Path) -> bool:
    """Take the cell of ``run_dir`` for this process; False when a live process holds it."""
    path = Path(f"{run_dir}.claim")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        if held(run_dir):
            return False  # a live lane holds it; else its holder ended: take it over
    (path / "pid").write_text(str(os.getpid()))
    return True


def release(run_dir: str | Path) -> None:
    """Give the cell of ``run_dir`` back (after it ran, or failed)."""
    shutil.rmtree(f"{run_dir}.claim", ignore_errors=True)


def held(run_dir: str | Path) -> bool:
    """True when a live process (this one included) holds the cell of ``run_dir``."""
    try:
        os.kill(int((Path(f"{run_dir}.claim") / "pid").read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def run_lane(cells: Callable[[], Iterable[C]], *, run_dir: Callable[[C], str | Path], finished: Callable[[C], bool],
             ready: Callable[[C], bool], run: Callable[[C], int], poll_s: float = 60.0,
             stop: Callable[[], bool] = lambda: False) -> list[tuple[C, int]]:
    """Run cells until none is left that this lane can run; return the cells whose ``run`` failed, with their codes.

    Each round reads ``cells()`` again (a list may grow, e.g. pilot cells named once an earlier pilot picks) and takes,
    in its order, the first cell that has not ``finished``, that this lane has not tried and failed, whose input is
    ``ready``, and that it can :func:`claim`; it runs it, then releases the claim. When no cell can be taken it waits
    ``poll_s`` seconds and looks again, as long as another live lane holds a cell whose result may be the missing
    input; with no such lane, the cells left wait for input nobody is making, and it returns. ``stop()`` is asked
    before each cell (e.g. a time budget): True ends the lane.
    """
    failed: list[tuple[C, int]] = []
    while not stop():
        tried = {str(run_dir(c)) for c, _ in failed}
        todo = [c for c in cells() if str(run_dir(c)) not in tried and not finished(c)]
        if not todo:
            return failed
        taken = next((c for c in todo if ready(c) and claim(run_dir(c))), None)
        if taken is None:
            if not any(held(run_dir(c)) for c in todo):
                return failed  # nothing is being made that the cells left could start from
            time.sleep(poll_s)
            continue
        try:
            code = run(taken)
        finally:
            release(run_dir(taken))
        if code != 0:
            failed.append((taken, code))
    return failed
