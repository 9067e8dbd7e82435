"""Find token positions by rule, e.g. "the ':' of the last answer marker"."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class AnswerMarkerNotFoundError(ValueError):
    """The prompt does not contain the answer marker the position rule asks for."""


def per_row_positions(positions: int | Sequence[int] | torch.Tensor, batch: int) -> torch.Tensor:
    """Read positions as [batch, n] per-row indices: one index or a list for every row, or a
    [batch, n] tensor already per row (negative indices count from the end)."""
    index = torch.as_tensor(positions).reshape(-1) if not isinstance(positions, torch.Tensor) else positions
    return index.reshape(batch, -1) if index.dim() == 2 else index.reshape(1, -1).expand(batch, -1)


def token_pieces(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """Each token's own text; special tokens (images, padding, bos) count as empty."""
    return list(tokenizer.batch_decode([[int(i)] for i in token_ids], skip_special_tokens=True))


def find_marker_positions(tokenizer: Any, token_ids: Sequence[int] | torch.Tensor, marker: str) -> list[int]:
    """Positions of the token holding the last character of each occurrence of `marker`."""
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    pieces = token_pieces(tokenizer, ids)
    owner: list[int] = []  # owner[c] = token index of character c of the joined text
    for index, piece in enumerate(pieces):
        owner.extend([index] * len(piece))
    text = "".join(pieces)
    positions: list[int] = []
    start = text.find(marker)
    while start != -1:
        positions.append(owner[start + len(marker) - 1])
        start = text.find(marker, start + 1)
    return positions


def marker_position(
    tokenizer: Any, token_ids: Sequence[int] | torch.Tensor, marker: str, occurrence: int = -1
) -> int:
    """The position of one occurrence of the marker: -1 the last (the query's), -2 the one before."""
    positions = find_marker_positions(tokenizer, token_ids, marker)
    if not positions or not -len(positions) <= occurrence < len(positions):
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        tail = "".join(token_pieces(tokenizer, ids))[-80:]
        raise AnswerMarkerNotFoundError(
            f"answer marker {marker!r} occurrence {occurrence} not found "
            f"({len(positions)} occurrence(s)) in prompt ending {tail!r}"
        )
    return positions[occurrence]
