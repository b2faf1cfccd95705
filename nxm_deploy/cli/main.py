"""``nxm-deploy``: the pipeline and its stages as commands. Errors become one line and an exit code.

Exit codes: 0 success; 1 a check failed (n:m verification, mask check); 2 bad input (recipe, data, paths,
run directory); 3 a missing optional dependency; 4 accuracy gate failed (validate.max_accuracy_drop_pt);
5 latency gate failed (validate.min_speedup); 130 interrupted. ``build-engine`` (a CI build, see
:mod:`nxm_deploy.engine.stage`): 0 built or up to date; 2 bad spec or input; 3 no TensorRT or no GPU (one
line: what is missing, how to install ``nxm-deploy[trt]``); 4 build failed; 5 post-build check failed.
``bench-gpu``: 0 every shape set measured; 1 a set failed (the others are written); 2 bad arguments; 3 no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from nxm_deploy import __version__
from nxm_deploy.run.layout import RunLayout
from nxm_deploy.errors import EXIT_CODES, ConfigError, NxmError, RunDirError, exit_code

log = logging.getLogger("nxm_deploy.cli")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--glue-dir", default=None, help="GLUE TSV root (else recipe task.glue_dir, NXM_GLUE_DIR, HF datasets)")
    p.add_argument("--runs-root", default="runs", help="where runs/<name> go when a recipe is given (default: runs)")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe value (dotted key, YAML value; repeatable), e.g. --set train.seed=1 "
                   "--set sparsity.pattern=1:4; validated like the recipe file and stored in the run's recipe.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nxm-deploy", description="n:m sparse INT8 transformer deployment pipeline.")
    parser.add_argument("--version", action="version", version=f"nxm-deploy {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole pipeline from a recipe")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/minilm_mrpc_2of4_int8.yaml")
    p.add_argument("--run-dir", default=None, help="run directory (default: <runs-root>/<recipe name>)")
    p.add_argument("--overwrite", action="store_true", help="replace a run directory that holds a different run")
    p.add_argument("--from-run", default=None, metavar="RUN_DIR",
                   help="first copy the training stages finished in this run whose recipe keys agree with this "
                   "recipe's (checked by hash; dense, then admm, then qat, up to the first that differs), e.g. one "
                   "dense model shared by the magnitude and the ADMM variant")
    _add_set(p)
    _add_common(p)

    p = sub.add_parser("train", help="training stages (dense, admm, qat) on a run directory or recipe")
    p.add_argument("target", help="run directory, or a recipe YAML")
    p.add_argument("--stage", choices=["dense", "admm", "qat", "all"], default="all")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--run-dir", default=None, help="run directory when a recipe is given (default: <runs-root>/<recipe name>)")
    p.add_argument("--from-run", default=None, metavar="RUN_DIR",
                   help="copy the finished stages before --stage (dense, sparse) from this run, checked by hash, "
                   "when its recipe agrees on every key they read; e.g. QAT variants of one sparse model")
    _add_set(p)
    _add_common(p)

    for name, text in (("export", "export ONNX (dense FP32 + sparse INT8 Q/DQ) and check n:m"),
                       ("validate", "accuracy, latency and Polygraphy output diff of every model (ORT, TensorRT, PyTorch); gates; report"),
                       ("report", "rewrite report.md / report.json from the stage artifacts")):
        p = sub.add_parser(name, help=text)
        p.add_argument("target", help="run directory, or the recipe YAML of an existing run")
        _add_common(p)

    p = sub.add_parser("build-engine", help="build TensorRT engines from engine specs (exit 3 without TensorRT/GPU)",
                       epilog="exit codes: 0 built or up to date; " + "; ".join(
                           f"{code} {meaning}" for _, code, meaning in EXIT_CODES))
    p.add_argument("target", nargs="?", default=None,
                   help="run directory, or the recipe YAML of an existing run (default: each spec's run_dir)")
    p.add_argument("--spec", action="append", default=None, help="engine spec YAML (repeatable); default: the recipe's")
    p.add_argument("--force", action="store_true", help="rebuild even when the engine is up to date")
    p.add_argument("--layers", action="store_true", help="print each engine's post-build check")
    _add_common(p)

    p = sub.add_parser("bench-gpu", help="GEMM and end-to-end speed of 2:4 / INT8 vs dense on this NVIDIA GPU through "
                                         "PyTorch (cuSPARSELt); writes gpu_<gpu>.md/.json (exit 3 without a GPU)")
    p.add_argument("run_dir", nargs="?", default=None, help="also bench this run's own encoder dims (dense/config.json)")
    p.add_argument("--shapes", action="append", default=None, metavar="SET",
                   help="shape set: minilm, bert-base or bert-large (repeatable or comma-separated; default: all "
                        "three, or none when RUN_DIR is given)")
    p.add_argument("--out", default="benchmarks", help="output folder (default: benchmarks)")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds per GEMM cell (end to end: 2/3 of it)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: end-to-end shape sets not started when it is spent are skipped (and say so)")

    p = sub.add_parser("predict", help="classify text with a run's deployed model; prints JSON lines")
    from nxm_deploy.client.cli import add_predict_arguments

    add_predict_arguments(p)

    p = sub.add_parser("inspect", help="inspect artifacts")
    isub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    s = isub.add_parser("sparsity", help="per-layer n:m check of an ONNX model; exit 1 when a layer that should be n:m is not")
    s.add_argument("model", help="ONNX file")
    s.add_argument("--pattern", default=None, help="n:m pattern, e.g. 2:4 (default: the manifest's, else 2:4)")
    s.add_argument("--manifest", default=None, help="export manifest (default: manifest.json next to the model, "
                   "else the sparsity contract stored in the ONNX file's metadata)")
    s.add_argument("--require-all", action="store_true", default=None,
                   help="every checked layer must hold the pattern (for files without a manifest)")
    s.add_argument("--json", action="store_true", default=None, help="print the report as JSON")
    s = isub.add_parser("qdq", help="lint the Q/DQ nodes of an ONNX model for TensorRT (INT8 zero points, per-tensor "
                                    "activations, per-output-channel weights); exit 1 on an error")
    s.add_argument("model", help="ONNX file")
    s.add_argument("--json", action="store_true", default=None, help="print the report as JSON")
    return parser


def _hold(args, run_dir: Path) -> None:
    """A command that writes into the run directory holds its lock until the command ends (``args.held``, closed by
    :func:`main`); ``build-engine`` takes its own finer locks instead."""
    held = getattr(args, "held", None)
    if held is not None and args.command != "build-engine":
        from nxm_deploy.stages import hold_run_dir

        held.enter_context(hold_run_dir(run_dir))


def _resolve(args, *, create: bool = False, distributed: bool = False, recipe=None):
    """``(recipe, run_dir, glue_dir, info)`` for a stage command's target (a run directory or a recipe file).

    A recipe file maps to ``<runs-root>/<name>``; an existing run there must hold the same recipe. The glue
    dir defaults to the one the run was started with (``run.json``). ``distributed``: under torchrun, start the
    process group as soon as the recipe is known (before rank 0 creates the run directory). The command holds the
    run directory's lock from here to its end (:func:`_hold`). ``recipe``: the target recipe file, already loaded
    with the command's overrides.
    """
    from nxm_deploy.config.recipe import load_recipe
    from nxm_deploy.pipeline import preflight, prepare_run_dir
    from nxm_deploy.run.reader import open_run_dir, read_run_info

    path = Path(args.target)
    if path.is_dir():
        if getattr(args, "overrides", None):
            raise ConfigError(f"--set changes a recipe, and {path} is a run directory (its recipe is fixed).",
                              hint=f"Pass the recipe file with --set, or use {RunLayout(path).recipe} as a new recipe.")
        recipe, run_dir = open_run_dir(path), path
        _hold(args, run_dir)
        if distributed:
            from nxm_deploy.training.trainer import init_distributed

            init_distributed(recipe.train)
    elif path.suffix in (".yaml", ".yml") or path.is_file():
        recipe = recipe or load_recipe(path, getattr(args, "overrides", ()))
        if distributed:
            from nxm_deploy.training.trainer import init_distributed

            init_distributed(recipe.train)
        run_dir = Path(getattr(args, "run_dir", None) or Path(args.runs_root) / recipe.name)
        stored = read_run_info(run_dir).get("recipe_sha256")
        if create:  # every torchrun rank checks the inputs; rank 0 alone writes the run directory
            _hold(args, run_dir)
            prepare_run_dir(recipe, run_dir, getattr(args, "overwrite", False), preflight(recipe, args.glue_dir, path))
        elif stored is None:
            open_run_dir(run_dir)  # raises: no run yet
        elif stored != recipe.sha256():
            raise RunDirError(
                f"{path} differs from the recipe that {run_dir} was run with.",
                hint=f"Use the run directory ({run_dir}) as the target, or start a new run with `nxm-deploy run {path}`.",
            )
        else:
            _hold(args, run_dir)
    else:
        raise RunDirError(f"{args.target} is neither a run directory nor a recipe file.",
                          hint="e.g. runs/tiny_smoke or recipes/tiny_smoke.yaml")
    info = read_run_info(run_dir)
    return recipe, run_dir, args.glue_dir or info.get("glue_dir"), info


def _inspect_sparsity(args) -> int:
    model = Path(args.model)
    if not model.is_file():  # before the checker (and torch) is imported
        raise ConfigError(f"ONNX model {model} not found.")
    from nxm_deploy.errors import ExportError
    from nxm_deploy.export.verify import check_onnx_sparsity, read_sparsity_metadata
    from nxm_deploy.fileio import read_json, sha256_file
    from nxm_deploy.run.layout import MANIFEST

    manifest_path = Path(args.manifest) if args.manifest else model.parent / MANIFEST
    layer_map, expected, pattern = None, None, args.pattern
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        digest = sha256_file(model)
        for key, map_of in (("sparse_int8", manifest.get("layer_map")),
                            ("cpu_int8", manifest.get("cpu_int8", {}).get("layer_map"))):
            record = manifest.get(key, {})
            if record.get("file") == model.name or record.get("sha256") == digest:
                layer_map = map_of
                expected = set(manifest.get("sparse_modules", []))
                pattern = pattern or manifest.get("pattern")
                break
    if layer_map is None:  # a copied file without its manifest: the contract the exporter stored inside it
        try:
            contract = read_sparsity_metadata(model)
        except ExportError as exc:
            raise ConfigError(exc.message, hint=exc.hint) from exc
        if contract is not None:
            layer_map, expected = contract["layer_map"], set(contract["expected"])
            pattern = pattern or contract["pattern"]
    try:
        report = check_onnx_sparsity(model, pattern or "2:4", layer_map=layer_map, expected=expected)
    except ExportError as exc:  # unreadable file: bad input, not a failed check
        raise ConfigError(exc.message, hint=exc.hint) from exc
    if not report.layers:
        raise ConfigError(f"{model} has no MatMul, Gemm or Conv node with a constant weight: nothing to check.",
                          hint="Pass the exported model (onnx/sparse_int8_qdq.onnx of a run).")
    failures = report.failures
    if args.require_all:
        failures = [r for r in report.layers if r.status != "sparse"]
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
        print(f"{sum(r.status == 'sparse' for r in report.layers)} of {len(report.layers)} layers hold {report.pattern}; "
              f"{len(failures)} failing.")
    for row in failures:
        print(f"error: {row.module or row.node} ({row.initializer}) is {row.status}, first bad group at {row.first_bad}",
              file=sys.stderr)
    return 1 if failures else 0


def _inspect_qdq(args) -> int:
    from nxm_deploy.errors import ExportError
    from nxm_deploy.export.qdq_lint import lint_qdq

    model = Path(args.model)
    if not model.is_file():
        raise ConfigError(f"ONNX model {model} not found.")
    try:
        report = lint_qdq(model)
    except ExportError as exc:  # unreadable file: bad input, not a failed check
        raise ConfigError(exc.message, hint=exc.hint) from exc
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
        print()
        print(report.eligibility_table())
        print()
        print(report.summary())
    for finding in report.errors:
        print(f"error: {finding.node}: [{finding.rule}] {finding.message}", file=sys.stderr)
    return 0 if report.ok else 1


def _bench_gpu(args) -> int:
    from nxm_deploy.gpu.bench import SHAPE_SETS, goal_values, GOALS, run_bench

    sets = [s.strip() for value in (args.shapes or []) for s in value.split(",") if s.strip()]
    if not sets and args.run_dir is None:
        sets = list(SHAPE_SETS)
    unknown = [s for s in sets if s not in SHAPE_SETS]
    if unknown:
        raise ConfigError(f"Unknown shape set(s) {', '.join(unknown)}: bench-gpu --shapes takes "
                          f"{', '.join(SHAPE_SETS)}.", hint="e.g. nxm-deploy bench-gpu --shapes bert-base")
    if args.rounds < 5:
        raise ConfigError(f"--rounds {args.rounds} is too few for a median: use 5 or more.")
    command = "nxm-deploy bench-gpu" + (f" {args.run_dir}" if args.run_dir else "") + \
        "".join(f" --shapes {s}" for s in sets) + (f" --out {args.out}" if args.out != "benchmarks" else "") + \
        (f" --rounds {args.rounds}" if args.rounds != 30 else "")
    if args.max_seconds is not None:
        command += f" --max-seconds {args.max_seconds:g}"
    results = run_bench(sets, args.run_dir, args.out, command=command, gemm_rounds=args.rounds,
                        e2e_rounds=max(5, args.rounds * 2 // 3), max_seconds=args.max_seconds)
    print(f"environment: {results['environment']['line']}")
    values = goal_values(results)
    for text, _set, key, target in GOALS:
        value = values[key]
        print(f"goal {text}: " + ("not run" if value is None else f"{value:.2f}x (target {target}x) "
                                   + ("met" if value >= target else "MISSED")))
    failed = [name for name, data in results["sets"].items() if data.get("error")]
    for name in failed:
        print(f"error: shape set {name}: {results['sets'][name]['error']}", file=sys.stderr)
    print("wrote " + ", ".join(results["files"]))
    return 1 if failed else 0


def _dispatch(args) -> int:
    if args.command == "predict":
        from nxm_deploy.client.cli import predict_cli

        return predict_cli(args)
    if args.command == "inspect":
        return _inspect_qdq(args) if args.what == "qdq" else _inspect_sparsity(args)
    if args.command == "bench-gpu":
        return _bench_gpu(args)
    if args.command == "run":
        from nxm_deploy.config.recipe import load_recipe
        from nxm_deploy.pipeline import run_pipeline
        from nxm_deploy.ranks import is_main_process

        recipe = load_recipe(args.recipe, args.overrides)  # a bad recipe fails before torch is imported
        from nxm_deploy.training.trainer import init_distributed

        init_distributed(recipe.train)
        run_dir = Path(args.run_dir) if args.run_dir else Path(args.runs_root) / recipe.name
        report = run_pipeline(recipe, run_dir, args.glue_dir, recipe_path=args.recipe, overwrite=args.overwrite,
                              from_run=args.from_run)
        if not is_main_process():
            return 0
        layout = RunLayout(run_dir)
        print(layout.report_md.read_text())
        print(f"report: {layout.report_md}  ({layout.report_json})")
        return 0 if (report.get("sparsity_check") or {}).get("ok") else 1
    if args.command == "train":
        from nxm_deploy.config.recipe import load_recipe
        from nxm_deploy.ranks import is_main_process
        from nxm_deploy.run.reader import open_run_dir
        from nxm_deploy.stages import TRAINING, StageContext, run_stages

        stages = TRAINING if args.stage == "all" else (args.stage,)
        before = TRAINING[:TRAINING.index(stages[0])]
        if args.from_run and not before:
            raise ConfigError("--from-run copies the stages before --stage; with --stage dense/all there are none.",
                              hint="e.g. nxm-deploy train RECIPE --stage qat --from-run runs/<base run>")
        target = Path(args.target)
        is_recipe = not target.is_dir() and (target.suffix in (".yaml", ".yml") or target.is_file())
        target_recipe = load_recipe(target, args.overrides) if is_recipe else None  # fails before torch loads
        from nxm_deploy.run.reader import read_stage_manifest
        from nxm_deploy.training.stage import adopt_stages, check_adoption

        if args.from_run:  # checked before the run directory is created
            check_adoption(target_recipe or open_run_dir(target), args.from_run, before)
        recipe, run_dir, glue_dir, _ = _resolve(args, create=target_recipe is not None, distributed=True,
                                                recipe=target_recipe)
        if args.from_run:
            adopted = adopt_stages(recipe, run_dir, args.from_run, before, checked=True)
            if is_main_process():
                for stage, digest in adopted.items():
                    print(f"{stage}: adopted from {args.from_run} (manifest sha256 {digest[:12]})")
        run_stages(StageContext(recipe, run_dir, glue_dir), stages, force=stages)
        if is_main_process():
            for stage in stages:
                print(f"{stage}: dev {read_stage_manifest(run_dir, stage)['metrics']}")
        return 0
    if args.command == "build-engine":
        from nxm_deploy.engine.stage import build_engines

        run_dir, specs = None, args.spec
        if args.target is not None:
            recipe, run_dir, _, info = _resolve(args)
            if not specs:
                from nxm_deploy.pipeline import resolve_spec_path

                specs = info.get("engine_specs") or [resolve_spec_path(s) for s in recipe.engine.specs]
        elif not specs:
            raise ConfigError("build-engine needs --spec SPEC.yaml, or a run directory / recipe.",
                              hint="e.g. nxm-deploy build-engine --spec engines/minilm_mrpc_sparse_int8.yaml")
        report = build_engines(specs, run_dir, force=args.force, show_layers=args.layers)
        for name, exc in report.failures:
            print(f"error: {name}: {' '.join(exc.message.split())}", file=sys.stderr)
        print(report.table())
        for note in report.notes:
            print(note)
        return report.exit_code()
    recipe, run_dir, glue_dir, info = _resolve(args)
    from nxm_deploy.stages import StageContext, run_stages

    ctx = StageContext(recipe, run_dir, glue_dir, list(info.get("engine_specs") or []))
    if args.command == "export":
        from nxm_deploy.run.reader import read_export_manifest

        run_stages(ctx, ["export"], force=["export"])
        manifest = read_export_manifest(run_dir)
        check = manifest["sparsity_check"]
        print(f"exported {RunLayout(run_dir).onnx_dir}: {check['sparse_layers']}/{check['expected_sparse']} layers verified {manifest['pattern']}")
        return 0
    if args.command in ("validate", "report"):
        from nxm_deploy.validate.report import build_report

        if args.command == "validate":
            run_stages(ctx, ["validate"], force=["validate"])
        build_report(recipe, run_dir)
        print(RunLayout(run_dir).report_md.read_text())
        return 0
    raise ConfigError(f"unknown command {args.command}")


def _dispatch_distributed(args) -> int:
    """:func:`_dispatch`, then (under torchrun) wait for every rank and end the process group."""
    if args.command not in ("run", "train"):
        return _dispatch(args)

    def shutdown(wait: bool) -> None:
        if "torch.distributed" not in sys.modules:  # nothing started one (a bad recipe stops before torch loads)
            return
        from nxm_deploy.training.trainer import shutdown_distributed

        shutdown_distributed(wait=wait)

    try:
        status = _dispatch(args)
    except BaseException:
        shutdown(wait=False)  # a failed rank must not wait for the others in a barrier
        raise
    shutdown(wait=True)
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (tests call ``main([...])`` directly)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s | %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("nxm_deploy").setLevel(level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quiet:  # progress bars off (tqdm reads TQDM_* defaults; HF hub and transformers their own switches)
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore")
    args.held = contextlib.ExitStack()  # run-directory locks a command holds until it ends (_hold)
    try:
        with args.held:
            return _dispatch_distributed(args)
    except NxmError as exc:
        _print_error(exc)
        return exit_code(exc)
    except RuntimeError as exc:
        from nxm_deploy.ranks import world_size

        if world_size() <= 1 or not ("gloo" in str(exc) or "NCCL" in str(exc) or "peer" in str(exc)):
            raise
        # under torchrun: another rank failed first (its error is the one to read) and this one lost its peer
        print(f"error: lost the other torchrun ranks ({str(exc).splitlines()[0][:200]}); the first failing rank "
              "printed the cause.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; finished stages are kept, partial artifacts were not written.", file=sys.stderr)
        return 130


def _print_error(exc: NxmError) -> None:
    print(f"error: {exc.message}".replace("\n", " "), file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
