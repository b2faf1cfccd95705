"""The benchmark drivers in tools/ use nxm-deploy's public API only: no import of a private module or name."""

from __future__ import annotations

import ast
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nxm_deploy":
            parts = node.module.split(".")[1:] + [alias.name for alias in node.names]
            if any(p.startswith("_") for p in parts):
                found.append(f"{path.name}:{node.lineno}: from {node.module} import "
                             + ", ".join(a.name for a in node.names))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "nxm_deploy" and any(p.startswith("_") for p in alias.name.split(".")):
                    found.append(f"{path.name}:{node.lineno}: import {alias.name}")
    return found


def test_tools_import_nothing_private_from_the_package():
    scripts = sorted(TOOLS.glob("*.py"))
    assert scripts
    private = [line for path in scripts for line in _private_imports(path)]
    assert private == [], "\n".join(private)


def test_the_check_sees_a_private_import(tmp_path):
    script = tmp_path / "bench_x.py"
    script.write_text("from nxm_deploy.training.stage import _setup\nimport nxm_deploy._lazy\n")
    assert len(_private_imports(script)) == 2


def test_lanes_claim_a_cell_once_and_take_over_a_dead_holders_claim(tmp_path):
    """tools/lanes.py: a live holder keeps its cell; a claim left by an ended process is taken over; release frees it."""
    import subprocess
    import sys

    from tiny_models import tool_module

    lanes = tool_module("lanes")
    cell = tmp_path / "rte" / "seed0" / "admm"
    assert lanes.claim(cell)
    assert not lanes.claim(cell)  # held by a live process (this one)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "rte" / "seed0" / "admm.claim" / "pid").write_text(str(other.pid))
        assert not lanes.claim(cell)  # a live process holds it
    finally:
        other.kill()
        other.wait()
    assert lanes.claim(cell)  # its holder ended: taken over
    lanes.release(cell)
    assert not (tmp_path / "rte" / "seed0" / "admm.claim").exists()
    assert lanes.claim(cell) and lanes.held(cell)
    lanes.release(cell)
    assert not lanes.held(cell)


def test_a_lane_passes_over_a_cell_whose_input_another_lane_is_making(tmp_path):
    """tools/lanes.py ``run_lane``: a cell waiting for an input that another live lane holds is passed over (the lane
    runs what it can, in order), taken once the input exists; a cell held by another lane is never run here; a failed
    cell is tried once; the lane ends when nothing it could still run is being made."""
    import subprocess
    import sys

    from tiny_models import tool_module

    lanes = tool_module("lanes")
    cells = ["a", "b_needs_a", "c", "d_fails", "e_needs_d"]
    needs = {"b_needs_a": "a", "e_needs_d": "d_fails"}
    finished: set[str] = set()
    ran: list[str] = []
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lanes.claim(tmp_path / "a")
        (tmp_path / "a.claim" / "pid").write_text(str(other.pid))  # another live lane makes "a"

        def run(cell: str) -> int:
            ran.append(cell)
            assert lanes.held(tmp_path / cell)  # claimed while it runs
            if cell == "d_fails":
                return 3
            finished.add(cell)
            if cell == "c":  # meanwhile the other lane finishes "a" and lets it go
                finished.add("a")
                lanes.release(tmp_path / "a")
            return 0

        failed = lanes.run_lane(lambda: cells, run_dir=lambda c: tmp_path / c, finished=finished.__contains__,
                                ready=lambda c: c not in needs or needs[c] in finished, run=run, poll_s=0.01)
    finally:
        other.kill()
        other.wait()
    assert ran == ["c", "b_needs_a", "d_fails"]  # b waited for a without holding the lane; e's input never came
    assert failed == [("d_fails", 3)]
    assert not any(lanes.held(tmp_path / c) for c in cells)


def test_a_lane_waits_while_another_lane_holds_the_last_cells(tmp_path):
    """``run_lane`` keeps polling while a live lane holds a cell it has not finished, and ``stop`` ends it."""
    import subprocess
    import sys

    from tiny_models import tool_module

    lanes = tool_module("lanes")
    polls = []
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lanes.claim(tmp_path / "x")
        (tmp_path / "x.claim" / "pid").write_text(str(other.pid))
        failed = lanes.run_lane(lambda: ["x"], run_dir=lambda c: tmp_path / c, finished=lambda c: False,
                                ready=lambda c: True, run=lambda c: polls.append("ran") or 0, poll_s=0.01,
                                stop=lambda: polls.append("poll") or len(polls) > 3)
    finally:
        other.kill()
        other.wait()
    assert failed == [] and polls == ["poll"] * 4  # polled, never ran the held cell
