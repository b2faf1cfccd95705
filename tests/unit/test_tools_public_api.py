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
    with lanes.claimed(cell) as mine:
        assert mine and (tmp_path / "rte" / "seed0" / "admm.claim").is_dir()
    assert not (tmp_path / "rte" / "seed0" / "admm.claim").exists()
