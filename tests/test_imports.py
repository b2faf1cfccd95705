"""Every module imports without TensorRT/CUDA; ``import nxm_deploy`` is cheap; TensorRT is named in one module only."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import nxm_deploy

PACKAGE_DIR = Path(nxm_deploy.__file__).resolve().parent
BLOCKED = ("tensorrt", "pycuda", "cuda")

# Imports every module of the package with the GPU stacks made unimportable (sys.modules[name] = None makes
# ``import name`` raise ImportError). Runs in a fresh interpreter so modules the test process already holds
# cannot mask an import problem.
_IMPORT_ALL = f"""
import importlib, pkgutil, sys, traceback
for name in {BLOCKED!r}:
    sys.modules[name] = None
import nxm_deploy
failed, seen = [], []
def onerror(name):
    failed.append((name, traceback.format_exc()))
for info in pkgutil.walk_packages(nxm_deploy.__path__, "nxm_deploy.", onerror=onerror):
    if info.name.endswith(".__main__"):
        continue  # running it is the CLI itself (tested below with -m)
    seen.append(info.name)
    try:
        importlib.import_module(info.name)
    except BaseException:
        failed.append((info.name, traceback.format_exc()))
for name, tb in failed:
    print("FAILED", name, file=sys.stderr)
    print(tb, file=sys.stderr)
for name in {BLOCKED!r}:
    assert sys.modules.get(name) is None, name + " got imported"
print("MODULES", len(seen))
print("OK" if not failed else "FAILED")
"""


def _run_python(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
        cwd=PACKAGE_DIR.parent,
    )


def test_every_module_imports_without_tensorrt_or_cuda() -> None:
    proc = _run_python(_IMPORT_ALL)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "OK", proc.stdout + proc.stderr
    count = int(next(line for line in lines if line.startswith("MODULES")).split()[1])
    # every .py file except the root __init__ (imported as nxm_deploy itself) and __main__ modules
    expected = len([p for p in PACKAGE_DIR.rglob("*.py") if p.name != "__main__.py"]) - 1
    assert count == expected, f"walked {count} modules, the tree has {expected}"


def test_import_nxm_deploy_does_not_import_torch() -> None:
    proc = _run_python('import nxm_deploy, sys; print("torch" in sys.modules, "onnx" in sys.modules, "tensorrt" in sys.modules)')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False", "False"]


def test_help_exits_zero_with_usage(monkeypatch, capsys) -> None:
    for name in BLOCKED:
        monkeypatch.setitem(sys.modules, name, None)
    from nxm_deploy.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: nxm-deploy" in out
    for command in ("run", "train", "export", "build-engine", "validate", "inspect"):
        assert command in out


def test_help_runs_as_module_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nxm_deploy.cli", "--help"], capture_output=True, text=True, timeout=120,
        cwd=PACKAGE_DIR.parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: nxm-deploy" in proc.stdout
    assert "Traceback" not in proc.stderr


# An import of tensorrt: ``import tensorrt``, ``from tensorrt ...``, ``require("tensorrt"``,
# ``import_module("tensorrt"``, ``__import__("tensorrt"``, ``find_spec("tensorrt"``.
_TRT_IMPORT = re.compile(
    r"""^\s*(?:import|from)\s+tensorrt\b"""
    r"""|(?:require|import_module|__import__|find_spec|has_module)\(\s*['"]tensorrt\b""",
    re.MULTILINE,
)


def test_tensorrt_is_imported_only_in_engine_trt() -> None:
    hits = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        found = _TRT_IMPORT.findall(path.read_text(encoding="utf-8"))
        if found:
            hits[path.relative_to(PACKAGE_DIR.parent).as_posix()] = found
    assert "nxm_deploy/engine/trt.py" in hits, "the TensorRT builder no longer imports tensorrt?"
    assert set(hits) <= {"nxm_deploy/engine/trt.py", "nxm_deploy/engine/trt_runtime.py"}, hits  # build + runtime


def _imports_of(path: Path) -> set[str]:
    """The ``nxm_deploy`` modules that ``path`` imports anywhere (top level or inside functions)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nxm_deploy"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nxm_deploy"))
    return found


@pytest.mark.parametrize("lower, higher", [
    ("export", "nxm_deploy.training"), ("validate", "nxm_deploy.training"),  # they read runs through nxm_deploy.run
    ("run", "nxm_deploy.training"), ("run", "nxm_deploy.export"), ("run", "nxm_deploy.validate"),
    ("run", "nxm_deploy.engine"), ("run", "nxm_deploy.client"), ("run", "nxm_deploy.cli"),
    ("gpu", "nxm_deploy.validate"),  # one timing loop (nxm_deploy.timing) serves both
    # the runtimes serve validation, the report and the client: none of them, nor training, below
    ("runtimes", "nxm_deploy.validate"), ("runtimes", "nxm_deploy.client"), ("runtimes", "nxm_deploy.training"),
    ("runtimes", "nxm_deploy.cli"), ("runtimes", "nxm_deploy.pipeline"),
])
def test_a_lower_layer_never_imports_a_higher_one(lower, higher) -> None:
    offenders = {str(p.relative_to(PACKAGE_DIR)): sorted(m for m in _imports_of(p) if m == higher or m.startswith(higher + "."))
                 for p in (PACKAGE_DIR / lower).rglob("*.py")}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"nxm_deploy/{lower} imports {higher}: {offenders}"


def test_reading_a_run_does_not_import_torch() -> None:
    """The run reader (manifests, recipe, run.json) is cheap: its model loaders import torch when called."""
    proc = _run_python('import sys, nxm_deploy.run.reader, nxm_deploy.stages; print("torch" in sys.modules)')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"]
