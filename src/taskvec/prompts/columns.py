"""Columns of an encoded, left-padded batch where a rule puts a position: markers, a text's end.

Under the chat template the prompt does not end at its answer marker (the end of the user turn and
the assistant header follow), so every position is found in the tokens by rule, never as -1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from taskvec.engine import AnswerMarkerNotFoundError, marker_position
from taskvec.models import ModelHandle


def marker_columns(
    handle: ModelHandle, inputs: Mapping[str, torch.Tensor], marker: str, occurrence: int = -1
) -> list[int]:
    """Per row, the column of the token holding the last character of one occurrence of `marker`
    (-1 the last); a row without that occurrence raises AnswerMarkerNotFoundError naming the row."""
    columns: list[int] = []
    for row, ids in enumerate(inputs["input_ids"]):
        try:
            columns.append(marker_position(handle.tokenizer, ids, marker, occurrence))
        except AnswerMarkerNotFoundError as error:
            raise AnswerMarkerNotFoundError(f"batch row {row}: {error}") from None
    return columns


def query_marker_columns(
    handle: ModelHandle, inputs: Mapping[str, torch.Tensor], marker: str = "A:"
) -> list[int]:
    """Per row, the non-negative column of the query's answer marker (the marker's last occurrence):
    where a task vector is patched and, under the qa template, the last column."""
    return marker_columns(handle, inputs, marker, occurrence=-1)


def text_end_columns(
    handle: ModelHandle, inputs: Mapping[str, torch.Tensor], texts: Sequence[str]
) -> list[int]:
    """Per row, the column of the last token of `texts[row]` inside the encoded prompt: the last
    occurrence of the text's final word (a word, not the whole text, because some tokenizers decode
    a lone token without its leading space)."""
    if len(texts) != len(inputs["input_ids"]):
        raise ValueError(f"{len(texts)} texts for a batch of {len(inputs['input_ids'])} rows")
    columns: list[int] = []
    for row, (ids, text) in enumerate(zip(inputs["input_ids"], texts, strict=True)):
        words = text.split()
        if not words:
            raise ValueError(f"batch row {row}: no text to find the end of")
        try:
            columns.append(marker_position(handle.tokenizer, ids, words[-1], -1))
        except AnswerMarkerNotFoundError as error:
            raise AnswerMarkerNotFoundError(f"batch row {row}: {error}") from None
    return columns
