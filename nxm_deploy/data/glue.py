"""Read GLUE task splits from download-script TSV files or from Hugging Face ``datasets``.

Route choice (:func:`load_task_split`):

1. a GLUE data dir (the ``glue_dir`` argument, else the ``NXM_GLUE_DIR`` environment variable) ->
   ``<glue_dir>/<TaskSpec.glue_dir_name>/<train.tsv | TaskSpec.dev_file>``, read with quoting **off**
   (several GLUE files contain unbalanced ``"`` characters) and ``encoding="utf-8-sig"`` (MRPC starts
   with a UTF-8 BOM); the whole file is checked to be UTF-8 first (:func:`nxm_deploy.fileio.check_utf8`),
   also when ``max_examples`` reads only its first rows;
2. no data dir -> ``datasets.load_dataset("nyu-mll/glue", TaskSpec.hf_config)``, imported lazily.

Both routes map labels to the class ids of the HF ``ClassLabel`` order kept in ``TaskSpec.label_list``.
Texts are returned exactly as stored (no stripping; SST-2 sentences end with a space).

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nxm_deploy.data.tasks import ColumnRef, TaskSpec, get_task
from nxm_deploy.fileio import check_utf8
from nxm_deploy.errors import DataError, ConfigError

logger = logging.getLogger(__name__)

GLUE_DIR_ENV = "NXM_GLUE_DIR"
"""Environment variable naming the GLUE data dir when no explicit dir is passed."""

HF_DATASET = "nyu-mll/glue"
"""Hugging Face dataset used when no GLUE data dir is configured."""

SPLITS: tuple[str, ...] = ("train", "dev")

_GLUE_DIR_HINT = (
    f"Pass --glue-dir or set {GLUE_DIR_ENV} to a folder holding <TASK>/train.tsv and <TASK>/dev.tsv "
    "as written by the GLUE download script (e.g. /work/shared/data/glue)."
)


@dataclass
class TaskExamples:
    """The examples of one task split, in file order.

    Attributes:
        texts_a (list[str]): first sentence of each example (causal LM: each document), length ``N``.
        texts_b (list[str] | None): second sentence of each example (length ``N``), or ``None`` for
            single-sentence tasks.
        labels (np.ndarray): ``[N]`` int64 class ids, or ``[N]`` float32 scores for regression (causal LM:
            zeros; a document's labels are its own tokens).
        skipped_rows (int): malformed rows skipped while reading (only tasks with
            ``TaskSpec.skip_malformed``, i.e. QQP).

    Raises:
        DataError: when the lengths of ``texts_a``, ``texts_b`` and ``labels`` differ.
    """

    texts_a: list[str]
    texts_b: list[str] | None
    labels: np.ndarray
    skipped_rows: int = 0

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.ndim != 1:
            raise DataError(
                f"TaskExamples labels must be 1-D, got shape {labels.shape}.",
                hint="Pass one label (class id or score) per example.",
            )
        self.labels = labels
        n = len(self.texts_a)
        sizes = {"texts_a": n, "labels": int(labels.shape[0])}
        if self.texts_b is not None:
            sizes["texts_b"] = len(self.texts_b)
        if len(set(sizes.values())) != 1:
            raise DataError(
                f"TaskExamples fields have different lengths: {sizes}.",
                hint="Every example needs a text_a, a label and (for pair tasks) a text_b.",
            )

    def __len__(self) -> int:
        return len(self.texts_a)


def resolve_glue_dir(explicit: str | os.PathLike[str] | None) -> Path | None:
    """Return the GLUE data dir to read from, or ``None`` for the Hugging Face route.

    Args:
        explicit (str | os.PathLike | None): a dir given by the caller (e.g. ``--glue-dir``); wins when set.

    Returns:
        Path | None: ``explicit`` if given, else the value of ``NXM_GLUE_DIR`` if set and non-empty, else
        ``None``. ``~`` is expanded; existence is not checked here (:func:`load_task_split` does).
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    env = os.environ.get(GLUE_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return None


def load_task_split(
    task: TaskSpec | str,
    split: str,
    glue_dir: str | os.PathLike[str] | None = None,
    max_examples: int | None = None,
    subset_seed: int | None = None,
) -> TaskExamples:
    """Load one split of a GLUE task.

    Args:
        task (TaskSpec | str): task spec or name (``"rte"``, ``"SST-2"``, ...).
        split (str): ``"train"`` or ``"dev"`` (MNLI dev = matched).
        glue_dir (str | os.PathLike | None): GLUE data dir; ``None`` falls back to ``NXM_GLUE_DIR`` and
            then to the Hugging Face dataset ``nyu-mll/glue``.
        max_examples (int | None): keep only the first ``max_examples`` examples (file order; >= 1).
        subset_seed (int | None): with ``max_examples``: keep a uniform random subset of ``max_examples`` examples
            instead (``numpy.random.default_rng(subset_seed)``, without replacement; file order kept), the same for
            every training seed. Every example is read first.

    Returns:
        TaskExamples: texts and labels (int64 class ids, or float32 scores for STS-B).

    Raises:
        ConfigError: unknown task, ``split`` not in ``("train", "dev")``, or ``max_examples`` < 1.
        DataError: the data dir, task folder or file is missing; the file is not UTF-8; a row is malformed or
            has an unknown label; or the Hugging Face route is unavailable (``datasets`` missing, offline).
    """
    spec = get_task(task)
    if split not in SPLITS:
        raise ConfigError(
            f"Split {split!r} is not one of {SPLITS}.",
            hint="Use 'train' or 'dev' ('dev' reads the validation set; MNLI reads dev_matched).",
        )
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise ConfigError(
            f"max_examples={max_examples!r} must be an integer >= 1 (or None for all examples).",
            hint="Drop the limit, or pass a positive count.",
        )
    if subset_seed is not None and max_examples is not None:
        return random_subset(load_task_split(spec, split, glue_dir), max_examples, subset_seed)
    if spec.is_causal_lm:  # documents; the labels of a causal LM are its tokens (nxm_deploy.data.lm.group_texts)
        from nxm_deploy.data.lm import load_documents

        docs = load_documents(spec, split, max_examples)
        return TaskExamples(texts_a=docs, texts_b=None, labels=np.zeros(len(docs), dtype=np.int64))
    if spec.source in ("files", "dataset"):
        from nxm_deploy.data.files import load_file_split

        texts_a, texts_b, labels = load_file_split(spec, split, max_examples)
        return TaskExamples(texts_a=texts_a, texts_b=texts_b, labels=labels)
    root = resolve_glue_dir(glue_dir)
    if root is None:
        return _load_hf(spec, split, max_examples)
    return _load_tsv(spec, split, root, max_examples, from_env=glue_dir is None or str(glue_dir) == "")


def random_subset(examples: TaskExamples, size: int, seed: int) -> TaskExamples:
    """``size`` examples drawn uniformly without replacement with ``numpy.random.default_rng(seed)``, in their file
    order; all of them when there are no more than ``size``."""
    n = len(examples.labels)
    if size >= n:
        return examples
    keep = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    return TaskExamples(texts_a=[examples.texts_a[i] for i in keep],
                        texts_b=None if examples.texts_b is None else [examples.texts_b[i] for i in keep],
                        labels=np.asarray(examples.labels)[keep], skipped_rows=examples.skipped_rows)


# --------------------------------------------------------------------------------------------------
# TSV route
# --------------------------------------------------------------------------------------------------


def _load_tsv(spec: TaskSpec, split: str, root: Path, max_examples: int | None, *, from_env: bool) -> TaskExamples:
    source = f"from {GLUE_DIR_ENV}" if from_env else "given"
    if not root.is_dir():
        raise DataError(f"GLUE data dir {root} ({source}) does not exist or is not a directory.", hint=_GLUE_DIR_HINT)
    task_dir = root / spec.glue_dir_name
    if not task_dir.is_dir():
        raise DataError(
            f"GLUE task folder {task_dir} for task '{spec.name}' not found.",
            hint=f"The GLUE data dir must hold a '{spec.glue_dir_name}' folder. {_GLUE_DIR_HINT}",
        )
    path = task_dir / (spec.train_file if split == "train" else spec.dev_file)
    if not path.is_file():
        raise DataError(
            f"GLUE file {path} not found (task '{spec.name}', split '{split}').",
            hint=f"Expected {spec.train_file} and {spec.dev_file} in {task_dir}. {_GLUE_DIR_HINT}",
        )
    check_utf8(path, "GLUE file", hint="the GLUE download script writes UTF-8, so downloading the file again "
               "works too.")  # every byte, even when max_examples reads one row (preflight)

    label_ids = {s: i for i, s in enumerate(spec.label_list)} if spec.label_list is not None else None
    texts_a: list[str] = []
    texts_b: list[str] | None = [] if spec.text_b_col is not None else None
    labels: list[Any] = []
    skipped = 0

    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        if spec.has_header:
            header = next(reader, None)
            if header is None:
                raise DataError(f"GLUE file {path} is empty; a header line was expected.", hint=_GLUE_DIR_HINT)
            n_cols = len(header)
            idx_a = _column_index(spec.text_a_col, header, path)
            idx_b = _column_index(spec.text_b_col, header, path) if spec.text_b_col is not None else None
            idx_y = _column_index(spec.label_col, header, path)
        else:
            idx_a = int(spec.text_a_col)
            idx_b = int(spec.text_b_col) if spec.text_b_col is not None else None
            idx_y = int(spec.label_col)
            n_cols = None
        min_cols = max(i for i in (idx_a, idx_b, idx_y) if i is not None) + 1

        for row in reader:
            if max_examples is not None and len(labels) >= max_examples:
                break
            line = reader.line_num
            if not row or (len(row) == 1 and row[0] == ""):
                continue  # blank line
            malformed = len(row) != n_cols if n_cols is not None else len(row) < min_cols
            if malformed:
                if spec.skip_malformed:
                    skipped += 1
                    continue
                want = f"{n_cols} (as the header)" if n_cols is not None else f"at least {min_cols}"
                raise DataError(
                    f"GLUE file {path}, line {line}: row has {len(row)} columns, expected {want}.",
                    hint="Read the file with quoting off; re-download it if the row is truncated.",
                )
            raw = row[idx_y]
            if label_ids is not None:
                if raw not in label_ids:
                    raise DataError(
                        f"GLUE file {path}, line {line}: label {raw!r} is not one of the "
                        f"{spec.name} labels {list(spec.label_list or ())}.",
                        hint="Check that the file belongs to this task and was read with quoting off.",
                    )
                labels.append(label_ids[raw])
            else:
                try:
                    score = float(raw)
                except ValueError:
                    score = math.nan
                if not math.isfinite(score):
                    raise DataError(
                        f"GLUE file {path}, line {line}: score {raw!r} is not a finite number.",
                        hint="The regression label column must hold a float (STS-B: 0 to 5).",
                    )
                labels.append(score)
            texts_a.append(row[idx_a])
            if texts_b is not None and idx_b is not None:
                texts_b.append(row[idx_b])

    if skipped:
        logger.warning("Skipped %d malformed row(s) in %s (column count differs from the header).", skipped, path)
    if not labels:
        raise DataError(f"GLUE file {path} holds no examples.", hint=_GLUE_DIR_HINT)
    return TaskExamples(texts_a, texts_b, _label_array(spec, labels), skipped_rows=skipped)


def _column_index(col: ColumnRef, header: list[str], path: Path) -> int:
    if isinstance(col, int):
        return col
    try:
        return header.index(col)
    except ValueError:
        raise DataError(
            f"GLUE file {path}: header has no column {col!r}; header is {header}.",
            hint="The file does not have the download-script layout for this task; re-download it.",
        ) from None


def _label_array(spec: TaskSpec, labels: list[Any]) -> np.ndarray:
    return np.asarray(labels, dtype=np.float32 if spec.is_regression else np.int64)


# --------------------------------------------------------------------------------------------------
# Hugging Face route
# --------------------------------------------------------------------------------------------------


def _load_hf(spec: TaskSpec, split: str, max_examples: int | None) -> TaskExamples:
    hf_split = "train" if split == "train" else spec.hf_dev_split
    try:
        import datasets  # noqa: PLC0415 - optional, heavy
    except Exception as exc:  # ImportError or a broken install
        raise DataError(
            f"No GLUE data dir is configured and the 'datasets' package cannot be imported "
            f"({type(exc).__name__}: {exc}); cannot read task '{spec.name}'.",
            hint=_GLUE_DIR_HINT,
        ) from exc
    try:
        ds = datasets.load_dataset(HF_DATASET, spec.hf_config, split=hf_split)
    except Exception as exc:  # offline, not cached, renamed config, ...
        raise DataError(
            f"No GLUE data dir is configured and loading {HF_DATASET}/{spec.hf_config} split '{hf_split}' "
            f"from Hugging Face failed ({type(exc).__name__}: {exc}).",
            hint=_GLUE_DIR_HINT + " (Or run once online so that the dataset is cached.)",
        ) from exc

    n = len(ds)
    if max_examples is not None and max_examples < n:
        ds = ds.select(range(max_examples))
    where = f"{HF_DATASET}/{spec.hf_config} split '{hf_split}'"
    try:
        texts_a = [str(t) for t in ds[spec.hf_text_a]]
        texts_b = [str(t) for t in ds[spec.hf_text_b]] if spec.hf_text_b is not None else None
        raw_labels = list(ds["label"])
    except (KeyError, ValueError) as exc:
        raise DataError(
            f"{where} lacks an expected column ({exc}); expected {spec.hf_text_a!r}, {spec.hf_text_b!r}, 'label'.",
            hint=_GLUE_DIR_HINT,
        ) from exc
    labels = _label_array(spec, raw_labels)
    if not spec.is_regression:
        bad = labels[(labels < 0) | (labels >= spec.num_labels)]
        if bad.size:
            raise DataError(
                f"{where} holds label id {int(bad[0])}, outside 0..{spec.num_labels - 1} for task '{spec.name}'.",
                hint="Test splits carry label -1 and cannot be used for training or evaluation.",
            )
    return TaskExamples(texts_a, texts_b, labels)
