"""Cut a model's encoded inputs by token columns and by batch rows, whatever the family adds to them."""

from __future__ import annotations

from typing import Any

import torch

# Inputs that describe the sequence itself; each caller builds its own.
SEQUENCE_KEYS = frozenset({"input_ids", "attention_mask", "position_ids"})


def is_token_aligned(value: Any, input_ids: torch.Tensor) -> bool:
    """Whether `value` has a value per token of `input_ids` ([batch, tokens, ...], integer).

    Token-aligned side inputs (attention_mask, token_type_ids, mm_token_type_ids, Fuyu's
    image_patches_indices, Mllama's [batch, tokens, images, tiles] cross_attention_mask) are
    integer tensors that start with input_ids' [batch, tokens]; pixels are floats, and per-image
    integer tensors (grids, sizes, aspect ratios) list fewer images than the prompt has tokens.
    """
    return (
        isinstance(value, torch.Tensor)
        and value.dim() >= 2
        and value.shape[:2] == input_ids.shape
        and not value.is_floating_point()
    )


def token_columns(inputs: dict[str, Any], columns: slice) -> dict[str, Any]:
    """The inputs with every token-aligned tensor cut to `columns` of the sequence."""
    input_ids = inputs["input_ids"]

    def cut(key: str, value: Any) -> Any:
        if key == "position_ids" and isinstance(value, torch.Tensor):
            return value[..., columns]  # [batch, tokens], or mrope's [3, batch, tokens]
        return value[:, columns] if is_token_aligned(value, input_ids) else value

    return {key: cut(key, value) for key, value in inputs.items()}


def token_side_inputs(inputs: dict[str, Any], rows: torch.Tensor, columns: slice) -> dict[str, Any]:
    """The token-aligned side inputs (all but the sequence's own) of batch `rows`, cut to `columns`.

    What a decode step over those rows needs besides its tokens, mask, positions and cache:
    per-image inputs (pixels, grids) are left out, as the cache already holds what they gave.
    """
    input_ids = inputs["input_ids"]
    return {
        key: value.index_select(0, rows.to(value.device))[:, columns]
        for key, value in inputs.items()
        if key not in SEQUENCE_KEYS and is_token_aligned(value, input_ids)
    }


def select_rows(tensor: torch.Tensor, rows: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """`tensor`'s batch `rows` along `dim`, indexed on the tensor's own device."""
    return tensor.index_select(dim, rows.to(tensor.device))
