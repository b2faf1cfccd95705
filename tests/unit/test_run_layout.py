"""One module owns the run directory's paths (:mod:`nxm_deploy.run.layout`): no other module of the package or of
``tools/`` spells a run-directory entry in a path (``run_dir / "onnx"``, ``"sparse/..."``, ``"validation.json"``), nor a
file name inside the run's folders (``"masks.safetensors"``, ``"quant.json"``, ``"sparse_int8_cpu.onnx"``, ...)."""

from __future__ import annotations

import ast
from pathlib import Path

from nxm_deploy.run.layout import ENTRIES, FILE_NAMES, RunLayout

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "nxm_deploy"
LAYOUT = PACKAGE / "run" / "layout.py"
FILE_ENTRIES = {e for e in ENTRIES if "." in e} | set(FILE_NAMES)


def _literals(path: Path) -> list[str]:
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
                and node.right.value in ENTRIES:
            found.append(f"{path.name}:{node.lineno}: / {node.right.value!r}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            value = node.value
            if value in FILE_ENTRIES or any(value.startswith(f"{e}/") for e in ENTRIES) \
                    or any(value.endswith(f"/{name}") for name in FILE_ENTRIES):
                found.append(f"{path.name}:{node.lineno}: {value!r}")
    return found


def test_no_module_but_the_layout_spells_run_directory_paths():
    modules = [*PACKAGE.rglob("*.py"), *(ROOT / "tools").glob("*.py")]
    offenders = [hit for path in sorted(modules) if path != LAYOUT for hit in _literals(path)]
    assert not offenders, "run-directory paths outside nxm_deploy/run/layout.py:\n" + "\n".join(offenders)


def test_the_scan_finds_a_literal(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('from pathlib import Path\n\ndef f(run_dir):\n    """Reads onnx/manifest.json."""\n'
                      '    return Path(run_dir) / "onnx", "sparse/masks.safetensors", "validation.json"\n')
    assert len(_literals(sample)) == 3  # the docstring is prose, not a path
    inside = tmp_path / "inside.py"
    inside.write_text('def g(stage_dir):\n    return stage_dir / "quant.json", "x/sparse_int8_cpu.onnx", "model.cpu_int8.onnx"\n')
    assert len(_literals(inside)) == 3  # file names inside the stage folders too


def test_layout_paths():
    layout = RunLayout("runs/x")
    assert layout.stage_dir("admm") == Path("runs/x/sparse") and layout.onnx("a.onnx") == Path("runs/x/onnx/a.onnx")
    assert layout.checkpoints("qat", "qat") == Path("runs/x/checkpoints/qat/qat")
    assert layout.onnx("/abs/m.onnx") == Path("/abs/m.onnx")
