"""Your own classification or regression data: CSV, TSV, JSON Lines or Parquet files named in the recipe.

A recipe's ``task`` section with ``train_file`` and ``eval_file`` (:class:`~nxm_deploy.config.recipe.TaskConfig`)
describes a task as the GLUE presets do, and becomes the same :class:`~nxm_deploy.data.tasks.TaskSpec`
(:func:`file_task_spec`), so every stage reads it through :func:`~nxm_deploy.data.glue.load_task_split`:

* ``text_columns``: one column (single texts) or two (text pairs);
* ``label_column`` (default ``label``): class names (any strings; numbers are read as their text) or, with a
  regression metric (``pearson`` / ``spearman``), float scores;
* ``labels``: the class names in class-id order; when omitted, the sorted distinct labels of the train file. The
  training stage stores them in the model's ``config.json`` (``id2label``), where the client reads them;
* ``metric``: ``accuracy`` (default for classes), ``f1`` (binary), ``matthews_corr``, ``pearson`` (default for
  regression) or ``spearman``.

Instead of files, ``dataset`` names a Hugging Face dataset (a hub name for users online, or a local folder of data
files), with ``dataset_config``, ``train_split`` and ``eval_split``; class labels of a ``ClassLabel`` column come
in the dataset's own order.

``name: causal_lm`` is next-token prediction on your own text (:mod:`nxm_deploy.data.lm`): a ``.txt`` file holds
one document per line; other formats and datasets hold the documents in ``text_columns[0]`` (default ``text``).

Files are read with Hugging Face ``datasets`` (``csv`` builder, tab-separated for ``.tsv``; ``json`` for
``.jsonl``/``.json``; ``parquet``; ``text`` for ``.txt``), which is the ``[data]`` extra. Relative paths are
relative to the current directory, as ``--glue-dir`` is.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from nxm_deploy.fileio import check_utf8
from nxm_deploy.errors import ConfigError, DataError, MissingDependencyError

#: file suffix -> (datasets builder, builder kwargs)
FORMATS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".jsonl": ("json", {}), ".json": ("json", {}),
           ".parquet": ("parquet", {}), ".txt": ("text", {})}
REGRESSION_METRICS = ("pearson", "spearman")
CLASS_METRICS = ("accuracy", "f1", "matthews_corr")


def _path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"Data file {p.resolve()} does not exist.",
                        hint="Check task.train_file / task.eval_file in the recipe (relative paths start at the "
                             "current directory).")
    if p.suffix.lower() not in FORMATS:
        raise DataError(f"Data file {p}: unknown format {p.suffix or '(no suffix)'}.",
                        hint=f"Use one of {', '.join(FORMATS)}.")
    return p


@functools.lru_cache(maxsize=16)
def _read(path: str, mtime_ns: int) -> dict[str, list]:
    """The columns of a data file as lists (cached per path and modification time)."""
    try:
        import datasets
    except ImportError as exc:
        raise MissingDependencyError("Reading your own data files needs Hugging Face `datasets`.",
                                     hint='pip install "nxm-deploy[data]"') from exc
    p = Path(path)
    builder, kwargs = FORMATS[p.suffix.lower()]
    if builder != "parquet":
        check_utf8(p, "Data file", hint="or save it as UTF-8 from the program that wrote it.")
    with p.open("rb") as handle:
        head = handle.read(1 << 20)
    if not head.strip():
        raise DataError(f"Data file {p} is empty.", hint="Give a file with a header (CSV/TSV) and at least one row "
                        "(a .txt file: one document per line).")
    if builder == "text":
        return {"text": p.read_text(encoding="utf-8").splitlines()}  # checked above
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(builder, data_files=str(p), split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - pyarrow / datasets raise many kinds for a malformed file
        raise DataError(f"Data file {p} cannot be read as {builder}: {str(exc).splitlines()[0][:200]}",
                        hint="Check the file's format (a header line for CSV/TSV, one JSON object per line).") from exc
    if table.num_rows == 0:
        raise DataError(f"Data file {p} has no rows.", hint="Give at least one example.")
    return {name: table[name] for name in table.column_names}


def read_columns(path: str | os.PathLike) -> dict[str, list]:
    """Every column of a data file: ``{name: [values]}`` (a ``.txt`` file: one column ``text``, one line per value).

    Raises:
        DataError: missing, empty, not UTF-8, unknown suffix, or unreadable. MissingDependencyError: no ``datasets``.
    """
    p = _path(path)
    return _read(str(p.resolve()), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_dataset(name: str, config: str | None, split: str) -> tuple[dict[str, list], dict[str, tuple[str, ...]]]:
    """The columns of one split of a Hugging Face dataset, and the class names of its ``ClassLabel`` columns."""
    try:
        import datasets
    except ImportError as exc:
        raise MissingDependencyError("Reading a Hugging Face dataset needs `datasets`.",
                                     hint='pip install "nxm-deploy[data]"') from exc
    datasets.disable_progress_bars()
    where = f"dataset {name!r}" + (f" (config {config!r})" if config else "")
    try:
        table = datasets.load_dataset(name, config, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise DataError(f"{where} has no split {split!r}: {str(exc).splitlines()[0][:200]}",
                            hint="Set task.train_split / task.eval_split to splits of the dataset.") from exc
        raise DataError(f"{where} cannot be read: {str(exc).splitlines()[0][:200]}",
                        hint="Check task.dataset / task.dataset_config.") from exc
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, bad config: datasets raises many kinds
        raise DataError(f"{where} cannot be read: {str(exc).splitlines()[0][:200]}",
                        hint="Check task.dataset / task.dataset_config (a hub name needs network access; a local "
                             "folder of data files works offline).") from exc
    if table.num_rows == 0:
        raise DataError(f"{where}, split {split!r} has no rows.", hint="Pick a split with examples.")
    classes = {col: tuple(feature.names) for col, feature in table.features.items()
               if isinstance(feature, datasets.ClassLabel)}
    return {col: table[col] for col in table.column_names}, classes


def split_columns(spec, split: str) -> tuple[dict[str, list], str]:
    """The columns of a task's ``train`` or ``dev`` split (files or a Hugging Face dataset) and the name of that
    data for messages; ``ClassLabel`` columns come as their class names.

    Raises:
        DataError: the file or split cannot be read (see :func:`read_columns`).
    """
    where = spec.train_file if split == "train" else spec.dev_file
    if spec.source != "dataset":
        return read_columns(where), str(where)
    columns, classes = _read_dataset(spec.dataset, spec.dataset_config, where)
    columns = {col: ([classes[col][v] if v is not None and v >= 0 else None for v in values] if col in classes
                     else values) for col, values in columns.items()}
    return columns, f"dataset {spec.dataset!r} split {where!r}"


def dataset_class_names(spec, column: str) -> tuple[str, ...] | None:
    """The class names of a dataset's ``ClassLabel`` column in class-id order, None for files or other columns."""
    if spec.source != "dataset":
        return None
    return _read_dataset(spec.dataset, spec.dataset_config, spec.train_file)[1].get(column)


def column(columns: dict[str, list], name: str, path) -> list:
    """``columns[name]``, or a :class:`DataError` naming the data (``path``) and the columns it has."""
    if name not in columns:
        raise DataError(f"Data file {path} has no column {name!r} (columns: {', '.join(columns)}).",
                        hint="Set task.text_columns / task.label_column to columns of the file.")
    return columns[name]


def _label_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def infer_labels(spec, label_column: str) -> tuple[str, ...]:
    """The class names of a task's train split: a dataset's ``ClassLabel`` names in their order, else the sorted
    distinct labels, as strings (numbers as their text: ``1``, not ``1.0``).

    Raises:
        DataError: the column is missing or a label is empty.
    """
    named = dataset_class_names(spec, label_column)
    if named:
        return named
    columns, where = split_columns(spec, "train")
    values = column(columns, label_column, where)
    labels = set()
    for row, value in enumerate(values):
        if value is None or _label_text(value) == "":
            raise DataError(f"Data file {where}, row {row + 1}: empty label in column {label_column!r}.",
                            hint="Every training example needs a label.")
        labels.add(_label_text(value))
    return tuple(sorted(labels))


def file_task_spec(config):
    """The :class:`TaskSpec` of a recipe ``task`` section with ``train_file`` or ``dataset`` (see the module
    docstring).

    Raises:
        ConfigError: a classification metric without class labels, or fewer than 2 classes.
        DataError: the train data cannot be read or lacks the label column.
    """
    from dataclasses import replace

    from nxm_deploy.data.tasks import TaskSpec

    if config.dataset is not None:
        where = {"source": "dataset", "dataset": config.dataset, "dataset_config": config.dataset_config,
                 "train_file": config.train_split, "dev_file": config.eval_split}
    else:
        where = {"source": "files", "train_file": str(config.train_file), "dev_file": str(config.eval_file)}
    texts = list(config.text_columns or ["text"])
    base = TaskSpec(name=config.name, glue_dir_name="", hf_config="", label_list=None, metrics=("perplexity",),
                    primary_metric="perplexity", has_header=True, text_a_col=texts[0], text_b_col=None,
                    label_col=config.label_column, **where)
    if config.is_causal_lm:
        return base
    metric = config.metric or "accuracy"
    regression = metric in REGRESSION_METRICS
    if regression:
        label_list, metrics = None, (metric, *[m for m in REGRESSION_METRICS if m != metric])
    else:
        label_list = tuple(config.labels) if config.labels else infer_labels(base, config.label_column)
        if len(label_list) < 2:
            raise ConfigError(f"Task '{config.name}': the train data ({base.train_file}) has one label "
                              f"({label_list[0]!r}); classification needs at least 2.",
                              hint="Check task.label_column, or set task.metric: pearson for a regression target.")
        if metric == "f1" and len(label_list) != 2:
            raise ConfigError(f"Task '{config.name}': metric f1 is binary, but there are {len(label_list)} labels.",
                              hint="Use task.metric: accuracy or matthews_corr.")
        metrics = (metric, "accuracy") if metric != "accuracy" else ("accuracy",)
    return replace(base, label_list=label_list, metrics=metrics, primary_metric=metric,
                   text_b_col=texts[1] if len(texts) > 1 else None)


def load_file_split(spec, split: str, max_examples: int | None) -> tuple[list[str], list[str] | None, np.ndarray]:
    """One split (``train`` or ``dev``) of your own classification / regression data (files or a dataset):
    ``(texts_a, texts_b or None, labels)``, labels int64 class ids or float32 scores
    (:func:`~nxm_deploy.data.glue.load_task_split` makes them a ``TaskExamples``).

    Raises:
        DataError: missing column, empty text, an eval label the train file never had (or a non-number score
            for regression), naming the file and row.
    """
    columns, path = split_columns(spec, split)
    n = len(next(iter(columns.values())))
    keep = n if max_examples is None else min(n, max_examples)
    texts = []
    for col in (spec.text_a_col, spec.text_b_col):
        if col is None:
            texts.append(None)
            continue
        values = column(columns, col, path)[:keep]
        for row, value in enumerate(values):
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(f"Data file {path}, row {row + 1}: empty text in column {col!r}.",
                                hint="Every example needs its text(s).")
        texts.append([str(v) for v in values])
    raw = column(columns, spec.label_col, path)[:keep]
    if spec.is_regression:
        try:
            labels = np.asarray([float(v) for v in raw], dtype=np.float32)
        except (TypeError, ValueError):
            bad = next(i for i, v in enumerate(raw) if not _is_number(v))
            raise DataError(f"Data file {path}, row {bad + 1}: label {raw[bad]!r} in column {spec.label_col!r} is "
                            f"not a number, but metric {spec.primary_metric} is a regression metric.",
                            hint="Use a classification metric (accuracy, f1, matthews_corr) for class labels.") from None
    else:
        index = {label: i for i, label in enumerate(spec.label_list)}
        ids = []
        for row, value in enumerate(raw):
            text = None if value is None else _label_text(value)
            if text not in index:
                raise DataError(f"Data file {path}, row {row + 1}: label {text!r} is not one of the task's labels "
                                f"{list(spec.label_list)} (task.labels, else those of the train file).",
                                hint="Fix the row, or list every label in task.labels.")
            ids.append(index[text])
        labels = np.asarray(ids, dtype=np.int64)
    return texts[0], texts[1], labels


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
