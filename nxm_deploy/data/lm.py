"""Causal language modelling on your own text (``task.name: causal_lm``): documents in, fixed-size token blocks out.

The data route is :mod:`nxm_deploy.data.files` (a ``.txt`` file with one document per line, another data file or
a Hugging Face dataset with the documents in ``text_columns[0]``, e.g. ``wikitext``). As Hugging Face's
``run_clm.py`` does, the documents of a split are tokenized, concatenated and cut into blocks of
``task.max_seq_length`` tokens (the remainder is dropped); the labels of a block are its input ids (the model
shifts them: token ``t`` is predicted from tokens ``< t``). Blank lines (wikitext's paragraph breaks) are skipped.

The metric is perplexity, ``exp`` of the mean next-token negative log-likelihood over all predicted tokens of the
split (:func:`nxm_deploy.data.metrics.lm_nll_sums`).

This module imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import Any

from nxm_deploy.errors import DataError


def load_documents(spec, split: str, max_documents: int | None) -> list[str]:
    """The non-blank documents of a causal-LM task's ``train`` or ``dev`` split, in order.

    Args:
        spec (TaskSpec): the causal-LM task (:func:`nxm_deploy.data.files.file_task_spec`).
        split (str): ``"train"`` or ``"dev"``.
        max_documents (int | None): keep the first ``max_documents`` non-blank documents.

    Raises:
        DataError: the file is missing, empty or not UTF-8; the text column is missing; no document is left.
    """
    from nxm_deploy.data.files import column, split_columns

    columns, where = split_columns(spec, split)
    values = column(columns, spec.text_a_col, where)
    docs = [str(v) for v in values if v is not None and str(v).strip()]
    if not docs:
        raise DataError(f"{where} holds no text (every line / value of column {spec.text_a_col!r} is blank).",
                        hint="Give at least one document (one per line in a .txt file).")
    return docs if max_documents is None else docs[:max_documents]


def group_texts(tokenizer: Any, documents: list[str], block_size: int, where: str = "the data") -> list[dict]:
    """Tokenize ``documents``, concatenate them and cut the tokens into blocks of ``block_size``.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        documents (list[str]): the split's documents.
        block_size (int): tokens per block (``task.max_seq_length``).
        where (str): the data's name for messages.

    Returns:
        list[dict]: one feature per block: ``input_ids`` and ``attention_mask`` (all ones), lists of
        ``block_size`` ints, and ``labels`` equal to ``input_ids``.

    Raises:
        DataError: fewer tokens than one block.
    """
    ids: list[int] = []
    for row in tokenizer(list(documents), add_special_tokens=True)["input_ids"]:
        ids.extend(row)
    blocks = len(ids) // block_size
    if blocks == 0:
        raise DataError(f"{where} has {len(ids)} tokens, fewer than one block of task.max_seq_length={block_size}.",
                        hint="Give more text, or lower task.max_seq_length (the block size).")
    out = []
    for b in range(blocks):
        block = ids[b * block_size:(b + 1) * block_size]
        out.append({"input_ids": block, "attention_mask": [1] * block_size, "labels": list(block)})
    return out
