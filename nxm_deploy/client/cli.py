"""``nxm-deploy predict``: classify text with a run's deployed model and print JSON lines.

Wired into :mod:`nxm_deploy.cli.main` with :func:`add_predict_arguments` (parser) and :func:`predict_cli`
(command). Errors are raised as :mod:`nxm_deploy.errors` exceptions for ``main`` to turn into exit codes.

Forms::

    nxm-deploy predict RUN_DIR "text" ["text pair"]
    nxm-deploy predict RUN_DIR --jsonl FILE     # FILE or '-' (stdin); one input per line

A JSONL line is a JSON string (a text), a 2-element array ``[text, text_pair]``, or an object
``{"text": ..., "text_pair": ..., "id": ...}`` (``text_pair`` and ``id`` optional). Output: one JSON object
per input, in input order: ``{"label", "score", "scores", "truncated"}``, plus ``"line"`` (and ``"id"`` when
given) in JSONL mode and ``"logits"`` with ``--logits``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from nxm_deploy.errors import ConfigError
from nxm_deploy.runtimes import client_runtimes

MODEL_CHOICES = ("sparse_int8", "dense")


def add_predict_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``predict`` arguments to ``parser`` (a sub-parser of ``nxm-deploy``); returns it."""
    parser.add_argument("run_dir", help="run directory, e.g. runs/minilm_mrpc_2of4_int8")
    parser.add_argument("text", nargs="?", default=None, help="text to classify (omit with --jsonl)")
    parser.add_argument("text_pair", nargs="?", default=None, help="second text of a sentence pair (pair tasks)")
    parser.add_argument("--jsonl", default=None, metavar="FILE",
                        help="batch mode: one input per line ('-' = stdin): a JSON string, [text, text_pair] or "
                             '{"text": ..., "text_pair": ..., "id": ...}; prints one JSON line per input')
    parser.add_argument("--backend", choices=["auto", *(r.client for r in client_runtimes())], default="auto",
                        help="auto: the first runtime whose artifact the run has and that can run here (TensorRT "
                             "when an engine is built and TensorRT runs, else ONNX Runtime)")
    parser.add_argument("--model", choices=MODEL_CHOICES, default="sparse_int8",
                        help="sparse_int8 (deployed, default) or dense (FP32 baseline)")
    parser.add_argument("--batch-size", type=int, default=32, help="inputs per model call (default 32)")
    parser.add_argument("--no-truncation", action="store_true",
                        help="fail on inputs longer than the model limit instead of truncating them")
    parser.add_argument("--logits", action="store_true", help="add the raw logits to each output line")
    return parser


def _jsonl_item(value, where: str):
    if isinstance(value, str):
        return value, None
    if isinstance(value, list):
        return tuple(value) if len(value) == 2 else value, None
    if isinstance(value, dict):
        if "text" not in value:
            raise ConfigError(f"{where}: object has no 'text' key (keys: {sorted(value)}).",
                              hint='Use {"text": ..., "text_pair": ..., "id": ...}.')
        text, pair = value["text"], value.get("text_pair")
        return (text if pair is None else (text, pair)), value.get("id")
    raise ConfigError(f"{where}: expected a JSON string, [text, text_pair] or an object, got {type(value).__name__}.")


def read_jsonl(handle: TextIO, name: str, normalize) -> list[tuple[int, object, object]]:
    """Parse and check every line first (nothing is printed for a file with a bad line).

    Returns:
        list of ``(line number, item, id)``.

    Raises:
        ConfigError: invalid JSON or input on a line (the message names ``name:line``), or no input at all.
    """
    rows = []
    for lineno, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg}).") from exc
        item, ident = _jsonl_item(value, where)
        try:
            (checked,) = normalize(item if isinstance(item, str) else [item])
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from exc
        rows.append((lineno, checked, ident))
    if not rows:
        raise ConfigError(f"{name} holds no input lines.")
    return rows


def _emit(out: TextIO, result: dict, logits=None, extra: dict | None = None) -> None:
    row = dict(extra or {})
    row.update(result)
    if logits is not None:
        row["logits"] = [float(x) for x in logits]
    out.write(json.dumps(row, ensure_ascii=False) + "\n")


def predict_cli(args: argparse.Namespace, stdout: TextIO | None = None, stdin: TextIO | None = None) -> int:
    """Run ``nxm-deploy predict`` for parsed ``args`` (see :func:`add_predict_arguments`).

    Returns:
        int: 0 on success.

    Raises:
        ConfigError: neither or both of TEXT and ``--jsonl``; bad input; an over-long input with
            ``--no-truncation``. RunDirError: bad run directory / artifacts. MissingDependencyError:
            ``--backend tensorrt`` without TensorRT.
    """
    from nxm_deploy.client.classifier import TextClassifier

    out = stdout or sys.stdout
    if (args.text is None) == (args.jsonl is None):
        raise ConfigError("predict needs either TEXT [TEXT_PAIR] or --jsonl FILE (not both).",
                          hint='e.g. nxm-deploy predict runs/NAME "premise" "hypothesis"')
    truncation = not args.no_truncation
    with TextClassifier.from_artifacts(args.run_dir, backend=args.backend, model=args.model,
                                       truncation=truncation, batch_size=args.batch_size) as client:
        if args.text is not None:
            item = args.text if args.text_pair is None else (args.text, args.text_pair)
            items = client.normalize(item)
            logits, truncated = client.infer_items(items)
            client.check_truncation(truncated, truncation)
            _emit(out, client.format_results(logits, truncated)[0], logits[0] if args.logits else None)
            out.flush()
            return 0
        if args.jsonl == "-":
            rows = read_jsonl(stdin or sys.stdin, "<stdin>", client.normalize)
        else:
            path = Path(args.jsonl)
            if not path.is_file():
                raise ConfigError(f"JSONL file {path} not found.")
            with open(path, encoding="utf-8") as handle:
                rows = read_jsonl(handle, str(path), client.normalize)
        size = client.batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            logits, truncated = client.infer_items([item for _, item, _ in chunk])
            if not truncation and truncated.any():
                bad = [chunk[i][0] for i in range(len(chunk)) if truncated[i]]
                raise ConfigError(
                    f"line(s) {bad[:10]} exceed the model limit of {client.max_length} tokens and --no-truncation is set.",
                    hint="Shorten those inputs or drop --no-truncation.",
                )
            for (lineno, _, ident), result, row in zip(chunk, client.format_results(logits, truncated), logits):
                extra = {"line": lineno} if ident is None else {"line": lineno, "id": ident}
                _emit(out, result, row if args.logits else None, extra)
            out.flush()
    return 0
