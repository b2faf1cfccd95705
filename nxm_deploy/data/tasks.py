"""GLUE task registry: one :class:`TaskSpec` per task, looked up with :func:`get_task`.

A spec describes both routes by which task data can be read:

* the TSV files written by the standard GLUE download script (``download_glue_data.py``), read with
  quoting turned off; columns are named by header where the file has a header, by index otherwise;
* the Hugging Face dataset ``nyu-mll/glue`` (config ``hf_config``).

``label_list`` holds the TSV label strings in the index order of the HF ``ClassLabel`` feature, so the
two routes give the same integer class ids (e.g. MNLI: entailment=0, neutral=1, contradiction=2).

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from nxm_deploy.errors import ConfigError

ColumnRef = str | int
"""A TSV column: a header name (files with a header) or a 0-based index (header-less files)."""


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to read and score one GLUE task.

    Args:
        name (str): canonical lower-case name, e.g. ``"rte"``.
        glue_dir_name (str): folder name inside a GLUE data dir, e.g. ``"RTE"``, ``"SST-2"``.
        hf_config (str): config name in the HF dataset ``nyu-mll/glue``.
        label_list (tuple[str, ...] | None): TSV label strings in class-id order (the HF
            ``ClassLabel`` order); ``None`` for regression (STS-B).
        metrics (tuple[str, ...]): metric keys, a subset of ``"accuracy"``, ``"f1"``,
            ``"matthews_corr"``, ``"pearson"``, ``"spearman"``.
        primary_metric (str): the metric used for model selection; must be ``metrics[0]``.
        dev_file (str): dev file name inside the task folder (MNLI: ``"dev_matched.tsv"``).
        has_header (bool): whether the TSV files start with a header line.
        text_a_col (ColumnRef): column of the first sentence.
        text_b_col (ColumnRef | None): column of the second sentence; ``None`` for single-sentence tasks.
        label_col (ColumnRef): column of the label string / score.
        skip_malformed (bool): when True, rows whose column count differs from the header are skipped
            and counted (QQP); when False such rows raise :class:`~nxm_deploy.errors.DataError`.
        hf_text_a (str): HF dataset column of the first sentence.
        hf_text_b (str | None): HF dataset column of the second sentence.
        train_file (str): train file name inside the task folder.
        hf_dev_split (str): HF split used for ``"dev"`` (MNLI: ``"validation_matched"``).
        source (str): ``"glue"`` (a preset, read from the GLUE dir or HF), ``"files"`` (your own data:
            ``train_file`` and ``dev_file`` are paths, :mod:`nxm_deploy.data.files`) or ``"dataset"``
            (a Hugging Face dataset ``dataset`` / ``dataset_config``; ``train_file`` and ``dev_file`` are split
            names).
        dataset (str | None): the Hugging Face dataset of ``source="dataset"`` (hub name or local folder).
        dataset_config (str | None): its config name.

    Raises:
        ConfigError: when the spec is inconsistent (primary metric not first, unknown metric, column
            references of the wrong kind for ``has_header``).
    """

    name: str
    glue_dir_name: str
    hf_config: str
    label_list: tuple[str, ...] | None
    metrics: tuple[str, ...]
    primary_metric: str
    dev_file: str
    has_header: bool
    text_a_col: ColumnRef
    text_b_col: ColumnRef | None
    label_col: ColumnRef
    skip_malformed: bool = False
    hf_text_a: str = "sentence1"
    hf_text_b: str | None = "sentence2"
    train_file: str = "train.tsv"
    hf_dev_split: str = "validation"
    source: str = "glue"
    dataset: str | None = None
    dataset_config: str | None = None

    def __post_init__(self) -> None:
        if not self.metrics or self.primary_metric != self.metrics[0]:
            raise ConfigError(
                f"Task '{self.name}': primary_metric {self.primary_metric!r} is not the first of metrics {self.metrics!r}.",
                hint="List the primary metric first in metrics.",
            )
        unknown = [m for m in self.metrics if m not in KNOWN_METRICS]
        if unknown:
            raise ConfigError(
                f"Task '{self.name}': unknown metric(s) {unknown!r}; known metrics are {sorted(KNOWN_METRICS)}.",
                hint="Use one of the known metric keys.",
            )
        if "perplexity" in self.metrics:
            if self.metrics != ("perplexity",) or self.label_list is not None:
                raise ConfigError(
                    f"Task '{self.name}': perplexity is the only metric of a causal-LM task (no label_list), got "
                    f"metrics {self.metrics!r}, label_list {self.label_list!r}.",
                    hint="Use metrics=('perplexity',) and label_list=None for causal language modelling.",
                )
            return
        regression_metrics = {"pearson", "spearman"}
        only_regression = set(self.metrics) <= regression_metrics
        any_regression = bool(set(self.metrics) & regression_metrics)
        if (self.label_list is None and not only_regression) or (self.label_list is not None and any_regression):
            raise ConfigError(
                f"Task '{self.name}': label_list={self.label_list!r} does not fit metrics {self.metrics!r}; "
                "regression tasks (label_list=None) use only pearson/spearman and classification tasks none of them.",
                hint="Set label_list=None exactly for regression tasks.",
            )
        cols = [c for c in (self.text_a_col, self.text_b_col, self.label_col) if c is not None]
        want = str if self.has_header else int
        bad = [c for c in cols if not isinstance(c, want) or isinstance(c, bool)]
        if bad:
            raise ConfigError(
                f"Task '{self.name}': column reference(s) {bad!r} must be {want.__name__} "
                f"when has_header={self.has_header}.",
                hint="Name columns by header when the file has a header, by 0-based index otherwise.",
            )

    @property
    def is_causal_lm(self) -> bool:
        """True for causal language modelling (next-token prediction, metric perplexity)."""
        return self.primary_metric == "perplexity"

    @property
    def greater_is_better(self) -> bool:
        """Whether a higher primary metric is better (all but perplexity)."""
        return not self.is_causal_lm

    @property
    def is_regression(self) -> bool:
        """True when the task predicts one float score (STS-B)."""
        return self.label_list is None and not self.is_causal_lm

    @property
    def num_labels(self) -> int:
        """Number of classifier outputs: the number of classes, 1 for regression, 0 for a causal LM (its outputs
        are the vocabulary)."""
        if self.is_causal_lm:
            return 0
        return 1 if self.label_list is None else len(self.label_list)

    @property
    def is_pair(self) -> bool:
        """True when each example is a sentence pair."""
        return self.text_b_col is not None


KNOWN_METRICS: frozenset[str] = frozenset({"accuracy", "f1", "matthews_corr", "pearson", "spearman", "perplexity"})

CAUSAL_LM = "causal_lm"
"""``task.name`` of causal language modelling on your own text (:mod:`nxm_deploy.data.lm`)."""

TASKS: dict[str, TaskSpec] = {}
"""Canonical task name -> spec. Filled by :func:`register_task`."""


def normalize_task_name(name: str) -> str:
    """A task name as the registry keys it: lower case, without spaces, ``_`` and ``-`` (``"SST-2"`` -> ``"sst2"``)."""
    return re.sub(r"[\s_\-]+", "", name).lower()


def register_task(name: str) -> Callable[[Callable[[], TaskSpec]], Callable[[], TaskSpec]]:
    """Decorator that registers the :class:`TaskSpec` built by a zero-argument factory under ``name``.

    Example::

        @register_task("rte")
        def _rte() -> TaskSpec:
            return TaskSpec(name="rte", ...)

    Args:
        name (str): canonical lower-case task name; must equal the spec's ``name``.

    Returns:
        Callable: the decorator; it returns the factory unchanged.

    Raises:
        ConfigError: when ``name`` is already registered or differs from the spec's ``name``.
    """
    key = normalize_task_name(name)

    def decorator(factory: Callable[[], TaskSpec]) -> Callable[[], TaskSpec]:
        spec = factory()
        if not isinstance(spec, TaskSpec):
            raise ConfigError(
                f"Task factory for '{name}' returned {type(spec).__name__}, not a TaskSpec.",
                hint="Return a TaskSpec from the decorated function.",
            )
        if normalize_task_name(spec.name) != key or spec.name != spec.name.lower():
            raise ConfigError(
                f"Task registered as '{name}' has spec name {spec.name!r}; they must match and be lower-case.",
                hint="Use the same lower-case name in register_task and TaskSpec.",
            )
        if key in TASKS:
            raise ConfigError(
                f"Task '{name}' is already registered.",
                hint="Pick a new name, or remove the existing entry from TASKS first.",
            )
        TASKS[key] = spec
        return factory

    return decorator


def get_task(name: str | TaskSpec) -> TaskSpec:
    """Look up a task by name, ignoring case, hyphens, underscores and spaces.

    ``"RTE"``, ``"sst-2"``, ``"STS-B"`` and ``"sts_b"`` all resolve. A :class:`TaskSpec` is returned as is.

    Args:
        name (str | TaskSpec): task name or spec.

    Returns:
        TaskSpec: the registered spec.

    Raises:
        ConfigError: the name is not a registered task; the message lists the known tasks.
    """
    if isinstance(name, TaskSpec):
        return name
    if not isinstance(name, str):
        raise ConfigError(
            f"Task name must be a string, got {type(name).__name__} {name!r}.",
            hint=f"Use one of: {', '.join(sorted(TASKS))}.",
        )
    spec = TASKS.get(normalize_task_name(name))
    if spec is None:
        raise ConfigError(
            f"Unknown task {name!r}; known tasks are: {', '.join(sorted(TASKS))}.",
            hint="Task names ignore case and hyphens, e.g. 'RTE', 'sst-2', 'sts-b'.",
        )
    return spec


# --------------------------------------------------------------------------------------------------
# The nine GLUE tasks. Label orders follow the ClassLabel features of HF "nyu-mll/glue".
# --------------------------------------------------------------------------------------------------


@register_task("cola")
def _cola() -> TaskSpec:
    # Header-less: source, label, author_label, sentence. HF: unacceptable=0, acceptable=1.
    return TaskSpec(
        name="cola", glue_dir_name="CoLA", hf_config="cola", label_list=("0", "1"),
        metrics=("matthews_corr",), primary_metric="matthews_corr", dev_file="dev.tsv",
        has_header=False, text_a_col=3, text_b_col=None, label_col=1,
        hf_text_a="sentence", hf_text_b=None,
    )  # fmt: skip


@register_task("sst2")
def _sst2() -> TaskSpec:
    # HF: negative=0, positive=1.
    return TaskSpec(
        name="sst2", glue_dir_name="SST-2", hf_config="sst2", label_list=("0", "1"),
        metrics=("accuracy",), primary_metric="accuracy", dev_file="dev.tsv",
        has_header=True, text_a_col="sentence", text_b_col=None, label_col="label",
        hf_text_a="sentence", hf_text_b=None,
    )  # fmt: skip


@register_task("mrpc")
def _mrpc() -> TaskSpec:
    # HF: not_equivalent=0, equivalent=1.
    return TaskSpec(
        name="mrpc", glue_dir_name="MRPC", hf_config="mrpc", label_list=("0", "1"),
        metrics=("f1", "accuracy"), primary_metric="f1", dev_file="dev.tsv",
        has_header=True, text_a_col="#1 String", text_b_col="#2 String", label_col="Quality",
    )  # fmt: skip


@register_task("stsb")
def _stsb() -> TaskSpec:
    return TaskSpec(
        name="stsb", glue_dir_name="STS-B", hf_config="stsb", label_list=None,
        metrics=("pearson", "spearman"), primary_metric="pearson", dev_file="dev.tsv",
        has_header=True, text_a_col="sentence1", text_b_col="sentence2", label_col="score",
    )  # fmt: skip


@register_task("qqp")
def _qqp() -> TaskSpec:
    # HF: not_duplicate=0, duplicate=1. The TSVs hold a few malformed rows; they are skipped and counted.
    return TaskSpec(
        name="qqp", glue_dir_name="QQP", hf_config="qqp", label_list=("0", "1"),
        metrics=("f1", "accuracy"), primary_metric="f1", dev_file="dev.tsv",
        has_header=True, text_a_col="question1", text_b_col="question2", label_col="is_duplicate",
        skip_malformed=True, hf_text_a="question1", hf_text_b="question2",
    )  # fmt: skip


@register_task("mnli")
def _mnli() -> TaskSpec:
    # HF: entailment=0, neutral=1, contradiction=2. Dev = matched.
    return TaskSpec(
        name="mnli", glue_dir_name="MNLI", hf_config="mnli",
        label_list=("entailment", "neutral", "contradiction"),
        metrics=("accuracy",), primary_metric="accuracy", dev_file="dev_matched.tsv",
        has_header=True, text_a_col="sentence1", text_b_col="sentence2", label_col="gold_label",
        hf_text_a="premise", hf_text_b="hypothesis", hf_dev_split="validation_matched",
    )  # fmt: skip


@register_task("qnli")
def _qnli() -> TaskSpec:
    # HF: entailment=0, not_entailment=1.
    return TaskSpec(
        name="qnli", glue_dir_name="QNLI", hf_config="qnli", label_list=("entailment", "not_entailment"),
        metrics=("accuracy",), primary_metric="accuracy", dev_file="dev.tsv",
        has_header=True, text_a_col="question", text_b_col="sentence", label_col="label",
        hf_text_a="question", hf_text_b="sentence",
    )  # fmt: skip


@register_task("rte")
def _rte() -> TaskSpec:
    # HF: entailment=0, not_entailment=1.
    return TaskSpec(
        name="rte", glue_dir_name="RTE", hf_config="rte", label_list=("entailment", "not_entailment"),
        metrics=("accuracy",), primary_metric="accuracy", dev_file="dev.tsv",
        has_header=True, text_a_col="sentence1", text_b_col="sentence2", label_col="label",
    )  # fmt: skip


@register_task("wnli")
def _wnli() -> TaskSpec:
    # HF: not_entailment=0, entailment=1 (TSV writes "0"/"1").
    return TaskSpec(
        name="wnli", glue_dir_name="WNLI", hf_config="wnli", label_list=("0", "1"),
        metrics=("accuracy",), primary_metric="accuracy", dev_file="dev.tsv",
        has_header=True, text_a_col="sentence1", text_b_col="sentence2", label_col="label",
    )  # fmt: skip
