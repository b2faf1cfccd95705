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
