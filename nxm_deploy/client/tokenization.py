"""Text -> model inputs with the Hugging Face ``tokenizers`` library (no transformers, no torch).

:class:`TextEncoder` loads the run's ``tokenizer.json`` and reproduces what the ``transformers`` fast tokenizer
gives for ``tokenizer(texts, truncation=True, max_length=L, padding="longest")``: same special tokens,
``longest_first`` truncation of pairs, right padding with the pad token, ``token_type_ids`` 0/1.

The underlying ``tokenizers.Tokenizer`` is configured once in ``__init__`` and never changed afterwards, so
:meth:`TextEncoder.encode` may be called from many threads at once (changing truncation/padding settings
while another thread encodes is what makes shared HF tokenizers fail with "Already borrowed").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nxm_deploy.errors import ConfigError, RunDirError

Item = str | tuple[str, str]
"""One input: a text, or a ``(text, text_pair)`` tuple."""


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _check_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(
            f"{where}: expected a string, got {_describe(value)}.",
            hint="Pass text as str; a sentence pair as a (text, text_pair) tuple of two strings.",
        )
    if not value.strip():
        raise ConfigError(f"{where}: the text is empty.", hint="Pass non-empty text.")
    return value


def _item(value, where: str) -> Item:
    if isinstance(value, str):
        return _check_text(value, where)
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ConfigError(
                f"{where}: a text pair must hold exactly 2 strings, got {len(value)} ({_describe(value)}).",
                hint="Pass (text, text_pair).",
            )
        return (_check_text(value[0], f"{where}[0]"), _check_text(value[1], f"{where}[1]"))
    raise ConfigError(
        f"{where}: expected a string or a (text, text_pair) tuple, got {_describe(value)}.",
        hint="Pass text as str; a sentence pair as a (text, text_pair) tuple of two strings.",
    )


def normalize_inputs(inputs, pair_task: bool | None = None) -> list[Item]:
    """Check and normalize the inputs of ``predict``.

    Accepted forms: one text ``"..."``; one pair ``("premise", "hypothesis")`` (a *tuple* of two strings);
    a list of texts and/or pairs (pairs as 2-tuples or 2-lists). A list of two strings is two texts.

    Args:
        inputs: see above.
        pair_task: True when the model was trained on sentence pairs (every item must be a pair), False for
            single-sentence tasks (no pairs), None when unknown (anything goes).

    Returns:
        list: ``str`` or ``(str, str)`` items, in order.

    Raises:
        ConfigError (a ValueError): empty input, an empty or non-string text, a pair that is not two
            strings, or singles/pairs that do not fit ``pair_task``.
    """
    if isinstance(inputs, str):
        items = [_check_text(inputs, "input")]
    elif isinstance(inputs, tuple) and len(inputs) == 2 and all(isinstance(v, str) for v in inputs):
        items = [_item(inputs, "input")]
    elif isinstance(inputs, Sequence) and not isinstance(inputs, (bytes, bytearray)):
        if len(inputs) == 0:
            raise ConfigError("No inputs: got an empty sequence.", hint="Pass at least one text or text pair.")
        items = [_item(value, f"input {i}") for i, value in enumerate(inputs)]
    else:
        raise ConfigError(
            f"Inputs must be a string, a (text, text_pair) tuple or a list of them, got {_describe(inputs)}.",
            hint="e.g. predict('a text') or predict([('premise', 'hypothesis'), ...]).",
        )
    if pair_task is not None:
        for i, item in enumerate(items):
            if isinstance(item, tuple) != pair_task:
                want = "a (text, text_pair) tuple" if pair_task else "a single text"
                raise ConfigError(
                    f"input {i}: this model classifies {'sentence pairs' if pair_task else 'single texts'}, "
                    f"so each input must be {want}; got {_describe(item)}.",
                    hint="Pass pairs as tuples of two strings." if pair_task else "Pass plain strings, not pairs.",
                )
    return items


@dataclass(frozen=True)
class Encoded:
    """One tokenized batch.

    Attributes:
        feeds: int64 arrays ``[B, L]`` keyed by input name (``L`` = longest row, at least ``min_length``).
        truncated: bool ``[B]``: the row was longer than ``max_length`` tokens and was cut.
    """

    feeds: dict[str, np.ndarray]
    truncated: np.ndarray


def _token_name(value, default: str) -> str:
    if isinstance(value, dict):  # older tokenizer_config.json: {"content": "[PAD]", ...}
        value = value.get("content")
    return value if isinstance(value, str) and value else default


class TextEncoder:
    """Tokenize texts / pairs into the int64 inputs of the exported model.

    Args:
        tokenizer_json: a ``tokenizer.json`` (fast tokenizer) file.
        max_length: longest row in tokens, special tokens included; longer rows are truncated
            (``longest_first`` for pairs) and flagged in :attr:`Encoded.truncated`.
        tokenizer_config: ``tokenizer_config.json`` content: ``pad_token``, ``pad_token_type_id``,
            ``padding_side``, ``truncation_side`` are honoured.
        input_names: which of ``input_ids``, ``attention_mask``, ``token_type_ids`` to return.
        min_length: pad every batch to at least this many tokens (a TensorRT profile's minimum).

    Raises:
        RunDirError: the file cannot be loaded or lacks the pad token.
    """

    def __init__(self, tokenizer_json: str | Path, max_length: int, tokenizer_config: dict | None = None,
                 input_names: Sequence[str] = ("input_ids", "attention_mask", "token_type_ids"), min_length: int = 1):
        import tokenizers  # a dependency of transformers; light, no torch

        cfg = tokenizer_config or {}
        try:
            tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:
            raise RunDirError(f"Cannot load tokenizer {tokenizer_json}: {exc}") from exc
        self.max_length = int(max_length)
        self.min_length = max(1, int(min_length))
        self.input_names = tuple(input_names)
        self.padding_side = str(cfg.get("padding_side", "right"))
        pad_token = _token_name(cfg.get("pad_token"), "[PAD]")
        pad_id = tok.token_to_id(pad_token)
        if pad_id is None:
            raise RunDirError(f"Tokenizer {tokenizer_json} has no pad token {pad_token!r}.")
        self.pad_id = int(pad_id)
        self.pad_type_id = int(cfg.get("pad_token_type_id", 0) or 0)
        tok.no_padding()
        tok.no_truncation()
        tok.enable_truncation(self.max_length, stride=0, strategy="longest_first",
                              direction=str(cfg.get("truncation_side", "right")))
        tok.enable_padding(direction=self.padding_side, pad_id=self.pad_id, pad_type_id=self.pad_type_id,
                           pad_token=pad_token)
        self._tokenizer = tok  # never reconfigured after this point (thread safety)

    def encode(self, items: Sequence[Item]) -> Encoded:
        """Tokenize normalized items (see :func:`normalize_inputs`) into one padded batch.

        Args:
            items: ``str`` or ``(str, str)``, at least one.

        Returns:
            Encoded: int64 feeds ``[B, L]`` and the bool truncation flags ``[B]``.
        """
        encodings = self._tokenizer.encode_batch(list(items), add_special_tokens=True)
        arrays = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        width = arrays["input_ids"].shape[1]
        if width < self.min_length:
            extra = self.min_length - width
            pad = ((0, 0), (extra, 0)) if self.padding_side == "left" else ((0, 0), (0, extra))
            fill = {"input_ids": self.pad_id, "attention_mask": 0, "token_type_ids": self.pad_type_id}
            arrays = {k: np.pad(v, pad, constant_values=fill[k]) for k, v in arrays.items()}
        truncated = np.array([len(e.overflowing) > 0 for e in encodings], dtype=bool)
        return Encoded(feeds={k: arrays[k] for k in self.input_names}, truncated=truncated)
