"""ADMM schedule study: which W-step / rho / Z-U interval / U init makes ADMM n:m beat one-shot magnitude pruning.

Each variant is the benchmark protocol of ``tools/bench_sparsity.py`` (same base recipe, same dense starting model
``<bench-work-dir>/<task>/seed<k>/dense_run/dense``, same epochs, learning rate and KD) with some ``train.admm``
fields overridden. Results are stored per (task, variant, seed) in ``<out>_cells/`` as soon as a run finishes
(reruns skip finished cells with the same settings), and ``<out>.md``/``.json`` put them next to the benchmark's
own dense / magnitude / ADMM cells of the same (task, seed) when those exist.

Usage:
    .venv/bin/python tools/study_admm.py --tasks mrpc --seeds 0 \\
        --variant prox200:penalty_mode=proximal,rho=200 --variant prox200_i20:penalty_mode=proximal,rho=200,update_interval=20
    .venv/bin/python tools/study_admm.py --report-only --variant ...
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bench_sparsity as bs  # noqa: E402
from nxm_deploy.fileio import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from nxm_deploy.errors import ConfigError  # noqa: E402
from nxm_deploy.machine import machine_line  # noqa: E402

log = logging.getLogger("study_admm")
ADMM_KEYS = {"rho": float, "rho_factor": float, "rho_max": float, "update_interval": None, "u_init": str,
             "penalty_mode": str, "method": str, "masked_finetune_epochs": float, "learning_rate": float, "epochs": float}


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> ``(name, {key: value})`` over ``train.admm`` fields.

    Raises:
        ConfigError: no name, an unknown key, or a value of the wrong type.
    """
    name, sep, body = text.partition(":")
    if not name or not sep:
        raise ConfigError(f"--variant {text!r}: expected NAME:key=value[,key=value...]")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if key not in ADMM_KEYS or not eq:
            raise ConfigError(f"--variant {name}: {item!r} is not key=value over {sorted(ADMM_KEYS)}")
        cast = ADMM_KEYS[key]
        if cast is None:  # update_interval: 'epoch' or steps
            overrides[key] = value if value == "epoch" else int(value)
        else:
            try:
                overrides[key] = cast(value)
            except ValueError as exc:
                raise ConfigError(f"--variant {name}: {key}={value!r} is not a {cast.__name__}") from exc
    return name, overrides


def variant_recipe(task: str, seed: int, pattern: str, overrides: dict, threads: int | None) -> dict:
    recipe = bs.build_recipe_dict(bs.BASE_RECIPE, {"threads": threads}, task, seed, "admm", pattern)
    recipe["train"]["admm"].update(overrides)
    return recipe


def run_cell(task, seed, pattern, name, overrides, args, cells_dir: Path) -> dict | None:
    from nxm_deploy.config.recipe import recipe_from_dict
    from nxm_deploy.training.stage import train_admm

    recipe_dict = variant_recipe(task, seed, pattern, overrides, args.threads)
    fp = bs.fingerprint(recipe_dict, dense=False)
    cell_file = cells_dir / f"{task}__{name}__{bs.pattern_slug(pattern)}__seed{seed}.json"
    if cell_file.is_file() and read_json(cell_file).get("fingerprint") == fp:
        log.info("%s: done, skipped", cell_file.name)
        return read_json(cell_file)
    dense = bs.dense_run_dir(Path(args.bench_work_dir), task, seed) / "dense"
    if not (dense / "manifest.json").is_file():
        log.warning("%s/seed%d: no finished dense model at %s yet (run bench_sparsity first): skipped", task, seed, dense)
        return None
    run_dir = Path(args.work_dir) / task / f"seed{seed}" / f"{name}_{bs.pattern_slug(pattern)}"
    run_dir.mkdir(parents=True, exist_ok=True)
    link = run_dir / "dense"
    if not link.exists():
        link.symlink_to(dense.resolve(), target_is_directory=True)
    start = time.perf_counter()
    manifest = train_admm(recipe_from_dict(recipe_dict), run_dir, bs.resolve_glue(args.glue_dir))
    score, note = bs.task_score(task, manifest["metrics"])
    proj, _ = bs.task_score(task, manifest["metrics_after_projection"])
    hist = manifest["admm_history"]
    rec = {
        "task": task, "seed": seed, "pattern": pattern, "variant": name, "overrides": overrides, "fingerprint": fp,
        "score": score, "score_note": note, "score_after_projection": proj, "metrics": manifest["metrics"],
        "epoch_scores": [bs.task_score(task, m)[0] for m in manifest["epoch_metrics"]],
        "mask_change": [round(h["mask_change"], 4) for h in hist],
        "relative_residual": [round(h["relative_residual"], 4) for h in hist],
        "minutes": round((time.perf_counter() - start) / 60, 2),
    }
    atomic_write_json(cell_file, rec)
    return rec


def bench_cells(task: str, seed: int, pattern: str, bench_cells_dir: Path) -> dict:
    """The benchmark's own dense / magnitude / admm cells of (task, seed, pattern), when finished."""
    out = {}
    slug = bs.pattern_slug(pattern)
    for name, file in (("dense", f"{task}__dense__seed{seed}.json"),
                       ("magnitude", f"{task}__magnitude__{slug}__seed{seed}.json"),
                       ("admm (benchmark cell)", f"{task}__admm__{slug}__seed{seed}.json")):
        path = bench_cells_dir / file
        if path.is_file():
            out[name] = read_json(path)["score"]
    return out


def write_report(rows: list[dict], args, out: Path) -> None:
    lines = [
        "# ADMM schedule study (n:m sparse fine-tuning, MiniLM, real GLUE data)", "",
        f"Command: `{bs.command_line()}`  ",
        f"Date (UTC): {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}  ",
        f"Machine: {machine_line()}", "",
        "Protocol: tools/bench_sparsity.py's base recipe and dense starting model per (task, seed); each variant "
        "overrides only `train.admm` fields (shown). Score 0-100 as in benchmarks/sparsity_glue.md. "
        "'after proj.' = hard-projected model before the masked fine-tune; mask change / rel. residual per Z/U update.",
        "",
        "| task | seed | pattern | variant | overrides | score | after proj. | dense | magnitude (benchmark cell) | ADMM (benchmark cell) | mask change per update | last rel. residual | min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["bench"]
        mc = ", ".join(f"{x:.2f}" for x in r.get("mask_change", []))
        if len(r.get("mask_change", [])) > 6:
            mc = ", ".join(f"{x:.2f}" for x in r["mask_change"][:3]) + " … " + ", ".join(f"{x:.2f}" for x in r["mask_change"][-2:])
        rr = r["relative_residual"][-1] if r.get("relative_residual") else None
        lines.append(
            f"| {r['task']} | {r['seed']} | {r['pattern']} | {r['variant']} | `{json.dumps(r['overrides'])}` | "
            f"{bs._f(r.get('score'))} | {bs._f(r.get('score_after_projection'))} | {bs._f(b.get('dense'))} | "
            f"{bs._f(b.get('magnitude'))} | {bs._f(b.get('admm (benchmark cell)'))} | {mc or '-'} | "
            f"{bs._f(rr, 3)} | {bs._f(r.get('minutes'))} |")
    notes = out.with_name(out.name + "_notes.md")  # hand-written findings kept across regenerations
    if notes.is_file():
        lines += ["", notes.read_text().rstrip()]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write_json(out.with_suffix(".json"), {"command": bs.command_line(), "machine": machine_line(), "rows": rows})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["mrpc"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--patterns", nargs="+", default=["2:4"])
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,... over train.admm (repeatable)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--bench-work-dir", default="runs/bench_sparsity")
    p.add_argument("--bench-out", default="benchmarks/sparsity_glue")
    p.add_argument("--work-dir", default="runs/study_admm")
    p.add_argument("--out", default="benchmarks/admm_study")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        variants = [parse_variant(v) for v in args.variant]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not variants:
        print("error: give at least one --variant NAME:key=value,...", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    cells_dir = Path(f"{args.out}_cells")
    bench_cells_dir = Path(f"{args.bench_out}_cells")
    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            for pattern in args.patterns:
                for name, overrides in variants:
                    if args.report_only:
                        fp = bs.fingerprint(variant_recipe(task, seed, pattern, overrides, args.threads), dense=False)
                        f = cells_dir / f"{task}__{name}__{bs.pattern_slug(pattern)}__seed{seed}.json"
                        rec = read_json(f) if f.is_file() and read_json(f).get("fingerprint") == fp else None
                    else:
                        rec = run_cell(task, seed, pattern, name, overrides, args, cells_dir)
                    row = rec or {"task": task, "seed": seed, "pattern": pattern, "variant": name,
                                  "overrides": overrides, "score": None}
                    row["bench"] = bench_cells(task, seed, pattern, bench_cells_dir)
                    rows.append(row)
                    write_report(rows, args, out)
    for r in rows:
        print(f"{r['task']} seed{r['seed']} {r['pattern']} {r['variant']}: {bs._f(r.get('score'))} "
              f"(magnitude {bs._f(r['bench'].get('magnitude'))}, dense {bs._f(r['bench'].get('dense'))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
