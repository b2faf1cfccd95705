"""Tokenize :class:`~nxm_deploy.data.glue.TaskExamples` into PyTorch data loaders and fixed-shape batches.

:func:`make_dataloader` tokenizes once and pads per batch (dynamic padding) or to ``max_seq_length``;
:func:`encode_fixed` builds one ``[batch_size, max_seq_length]`` batch of numpy arrays for latency runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from nxm_deploy.data.glue import TaskExamples
from nxm_deploy.errors import ConfigError, DataError


class _EncodedDataset(Dataset):
    """Pre-tokenized examples: item ``i`` is a dict of token id lists plus a scalar ``labels``."""

    def __init__(self, features: list[dict[str, Any]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]

    def lengths(self) -> list[int]:
        """Token count of each example."""
        return [len(f["input_ids"]) for f in self.features]

    def longest_first(self) -> list[int]:
        """Example indices, longest first (evaluation batches with the least padding)."""
        lengths = self.lengths()
        return sorted(range(len(lengths)), key=lambda i: -lengths[i])


class _Collator:
    """Pads with ``transformers.DataCollatorWithPadding`` and fixes the ``labels`` dtype."""

    def __init__(self, tokenizer: Any, *, max_length: int | None, label_dtype: torch.dtype):
        from transformers import DataCollatorWithPadding  # noqa: PLC0415 - heavy import

        if max_length is None:
            self.inner = DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")
        else:
            self.inner = DataCollatorWithPadding(
                tokenizer, padding="max_length", max_length=max_length, return_tensors="pt"
            )
        self.label_dtype = label_dtype

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = [f["labels"] for f in features]
        batch = dict(self.inner([{k: v for k, v in f.items() if k != "labels"} for f in features]))
        batch["labels"] = torch.tensor(labels, dtype=self.label_dtype)
        return batch


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}.", hint=f"Pass a positive {name}.")


def encode_dataset(
    tokenizer: Any,
    examples: TaskExamples,
    *,
    max_seq_length: int,
    pad_to_max_length: bool = False,
    causal_lm: bool = False,
) -> tuple[Dataset, Any]:
    """Tokenize ``examples`` once: a map-style dataset of token id lists plus the collator that pads its batches.

    Args:
        tokenizer: a Hugging Face tokenizer (e.g. ``BertTokenizerFast``).
        examples (TaskExamples): texts (pairs when ``texts_b`` is not None) and labels.
        max_seq_length (int): truncation length in tokens (>= 2); pairs are truncated longest-first.
        pad_to_max_length (bool): the collator pads every batch to ``max_seq_length`` instead of its longest row.
        causal_lm (bool): ``examples.texts_a`` are documents, cut into blocks of ``max_seq_length`` tokens whose
            labels are their tokens (:func:`nxm_deploy.data.lm.group_texts`).

    Returns:
        (dataset, collator): item ``i`` of the dataset is a dict of int lists (``input_ids``, ``attention_mask``,
        ``token_type_ids`` when the tokenizer returns them) and a scalar ``labels``; the collator turns a list of
        items into int64 ``[b, L]`` tensors and ``labels`` int64 ``[b]`` (class ids) or float32 ``[b]``
        (regression), or int64 ``[b, L]`` token ids (causal LM). Both are what ``transformers.Trainer`` takes as
        ``train_dataset`` / ``data_collator``.

    Raises:
        ConfigError: ``max_seq_length`` < 2.
        DataError: ``examples`` is empty; a causal-LM split shorter than one block.
    """
    _check_positive("max_seq_length", max_seq_length, minimum=2)
    if len(examples) == 0:
        raise DataError("Cannot build a data loader from 0 examples.", hint="Check the task split and max_examples.")
    if causal_lm:
        from nxm_deploy.data.lm import group_texts

        features = group_texts(tokenizer, examples.texts_a, max_seq_length)
        return _EncodedDataset(features), _Collator(tokenizer, max_length=None, label_dtype=torch.int64)

    enc = tokenizer(
        list(examples.texts_a),
        list(examples.texts_b) if examples.texts_b is not None else None,
        truncation=True,
        max_length=max_seq_length,
        padding=False,
    )
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    is_float = np.issubdtype(examples.labels.dtype, np.floating)
    label_values = examples.labels.astype(np.float32 if is_float else np.int64).tolist()
    features = [{**{k: enc[k][i] for k in keys}, "labels": label_values[i]} for i in range(len(examples))]
    collator = _Collator(
        tokenizer,
        max_length=max_seq_length if pad_to_max_length else None,
        label_dtype=torch.float32 if is_float else torch.int64,
    )
    return _EncodedDataset(features), collator


def make_dataloader(
    tokenizer: Any,
    examples: TaskExamples,
    *,
    batch_size: int,
    max_seq_length: int,
    shuffle: bool,
    seed: int = 0,
    pad_to_max_length: bool = False,
    group_by_length: bool = False,
    causal_lm: bool = False,
) -> DataLoader:
    """Tokenize ``examples`` once (:func:`encode_dataset`) and wrap them in a padded, optionally shuffled ``DataLoader``.

    Args:
        tokenizer: a Hugging Face tokenizer (e.g. ``BertTokenizerFast``).
        examples (TaskExamples): texts (pairs when ``texts_b`` is not None) and labels.
        batch_size (int): examples per batch (>= 1); the last batch may be smaller.
        max_seq_length (int): truncation length in tokens (>= 2); pairs are truncated longest-first.
        shuffle (bool): shuffle each epoch; the order is reproducible from ``seed``.
        seed (int): seed of the ``torch.Generator`` that drives shuffling.
        pad_to_max_length (bool): pad every batch to ``max_seq_length`` instead of its longest row.
        group_by_length (bool): put examples of similar length in the same batch to cut padding: with
            ``shuffle``, ``transformers``' ``LengthGroupedSampler`` (random mega-batches sorted by length);
            without, a fixed longest-first order. Metrics do not depend on the order (labels travel with
            the batch).
        causal_lm (bool): as :func:`encode_dataset`.

    Returns:
        DataLoader: yields dicts of tensors: ``input_ids``, ``attention_mask`` and (if the tokenizer
        returns them) ``token_type_ids``, each int64 ``[b, L]``; ``labels`` int64 ``[b]`` (class ids) or
        float32 ``[b]`` (regression scores, when ``examples.labels`` is floating point).

    Raises:
        ConfigError: ``batch_size`` < 1 or ``max_seq_length`` < 2.
        DataError: ``examples`` is empty.
    """
    _check_positive("batch_size", batch_size)
    dataset, collator = encode_dataset(tokenizer, examples, max_seq_length=max_seq_length,
                                       pad_to_max_length=pad_to_max_length, causal_lm=causal_lm)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    sampler = None
    if group_by_length:
        if shuffle:
            from transformers.trainer_pt_utils import LengthGroupedSampler

            sampler = LengthGroupedSampler(batch_size, lengths=dataset.lengths(), generator=generator)
        else:
            sampler = dataset.longest_first()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        collate_fn=collator,
        generator=generator,
    )


def encode_fixed(
    tokenizer: Any, examples: TaskExamples, max_seq_length: int, batch_size: int
) -> dict[str, np.ndarray]:
    """Build one fixed-shape input batch for latency measurements.

    Takes the first ``batch_size`` examples (cycling through them when there are fewer), truncates and pads
    every row to exactly ``max_seq_length`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer.
        examples (TaskExamples): source texts (labels are ignored).
        max_seq_length (int): sequence length ``L`` (>= 2).
        batch_size (int): batch size ``B`` (>= 1).

    Returns:
        dict[str, np.ndarray]: ``input_ids``, ``attention_mask`` and (if the tokenizer returns them)
        ``token_type_ids``, each int64 of shape ``[B, L]``.

    Raises:
        ConfigError: ``batch_size`` < 1 or ``max_seq_length`` < 2.
        DataError: ``examples`` is empty.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("max_seq_length", max_seq_length, minimum=2)
    n = len(examples)
    if n == 0:
        raise DataError("Cannot build a fixed batch from 0 examples.", hint="Check the task split and max_examples.")
    idx = [i % n for i in range(batch_size)]
    texts_a = [examples.texts_a[i] for i in idx]
    texts_b = [examples.texts_b[i] for i in idx] if examples.texts_b is not None else None
    enc = tokenizer(texts_a, texts_b, truncation=True, max_length=max_seq_length, padding="max_length")
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return {k: np.asarray(enc[k], dtype=np.int64).reshape(batch_size, max_seq_length) for k in keys}


class EpochSeededLengthGroupedSampler(Sampler):
    """``transformers``' length-grouped order (random mega-batches sorted by length), seeded by ``seed + epoch``.

    The order of epoch ``e`` depends only on ``(seed, e)``, never on the global RNG, so a run resumed in the
    middle of an epoch sees the same batches as an uninterrupted one, and every DDP rank draws the same order
    (accelerate then hands each rank its own batches).

    Args:
        lengths (list[int]): token count of each example.
        batch_size (int): examples per global batch (all processes together).
        seed (int): base seed.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class TaskData:
    """The tokenised train and dev sets of a recipe's task, with their collator (what a Trainer takes).

    Args:
        task (TaskSpec): the task (labels, metrics).
        tokenizer: the model's tokenizer.
        train_examples, dev_examples (TaskExamples): raw splits.
        max_seq_length (int): truncation length in tokens.

    Attributes:
        train, dev (Dataset): encoded splits (:func:`encode_dataset`); ``collator`` pads their batches.
    """

    def __init__(self, task, tokenizer: Any, train_examples: TaskExamples, dev_examples: TaskExamples,
                 max_seq_length: int):
        self.task = task
        self.train_examples, self.dev_examples = train_examples, dev_examples
        self.train, self.collator = encode_dataset(tokenizer, train_examples, max_seq_length=max_seq_length,
                                                   causal_lm=task.is_causal_lm)
        self.dev, _ = encode_dataset(tokenizer, dev_examples, max_seq_length=max_seq_length, causal_lm=task.is_causal_lm)

    @classmethod
    def from_recipe(cls, recipe, tokenizer: Any, glue_dir: str | None = None) -> "TaskData":
        """Read the recipe's task (``task.name``, example limits, ``max_seq_length``) from the GLUE TSV root.

        ``glue_dir`` (else ``task.glue_dir``, ``NXM_GLUE_DIR``, Hugging Face ``datasets``) as
        :func:`nxm_deploy.data.resolve_glue_dir`.

        Raises:
            DataError: missing or malformed task files.
        """
        from nxm_deploy.data.glue import load_task_split, resolve_glue_dir

        task = recipe.task.spec()
        root = resolve_glue_dir(glue_dir or recipe.task.glue_dir)
        cfg = recipe.task
        train = load_task_split(task, "train", root, cfg.max_train_examples, cfg.train_subset_seed)
        dev = load_task_split(task, "dev", root, cfg.max_eval_examples)
        return cls(task, tokenizer, train, dev, cfg.max_seq_length)

    def train_loader(self, batch_size: int, seed: int, epoch: int = 0) -> DataLoader:
        """The training batches of ``epoch`` in the Trainer's order (:class:`EpochSeededLengthGroupedSampler`,
        ``batch_size`` = the global batch), e.g. for calibration: the same on every torchrun rank."""
        sampler = EpochSeededLengthGroupedSampler(self.train.lengths(), batch_size, seed)
        sampler.set_epoch(epoch)
        return DataLoader(self.train, batch_size=batch_size, sampler=sampler, collate_fn=self.collator)
