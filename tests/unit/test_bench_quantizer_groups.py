"""tools/bench_quantizer_groups.py: every cell is the committed base recipe plus overrides the CLI accepts."""

from __future__ import annotations

from pathlib import Path
from tiny_models import tool_module

ROOT = Path(__file__).resolve().parents[2]


def _load():
    return tool_module("bench_quantizer_groups")


def test_cells_are_cli_commands_on_the_base_recipe(tmp_path):
    from nxm_deploy.cli.main import build_parser
    from nxm_deploy.config.recipe import load_recipe

    bench = _load()
    seen = set()
    for cell, (gemm_outputs, attention) in bench.CELLS.items():
        argv = bench.cell_args(Path("runs/x"), "stsb", cell, Path("runs/x/stsb/base"), ["--glue-dir", "g"])
        args = build_parser().parse_args(argv)  # the exact argv the tool runs
        assert args.command == "train" and args.stage == "qat" and args.from_run == "runs/x/stsb/base"
        recipe = load_recipe(ROOT / args.target, args.overrides)
        assert recipe.name == cell and recipe.task.name == "stsb"
        assert (recipe.train.qat.quantizers.gemm_outputs, recipe.train.qat.quantizers.attention) == (gemm_outputs, attention)
        seen.add((gemm_outputs, attention))
    assert len(seen) == 4  # every combination of the two groups
    default = load_recipe(ROOT / bench.RECIPE).train.qat.quantizers
    assert bench.CELLS[bench.DEFAULT_CELL] == (default.gemm_outputs, default.attention)
