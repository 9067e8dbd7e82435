"""Position ids for a hand-built decode step: those a full forward of the prompt gives its last token.

The model cannot be asked for them. A mrope model (Qwen2-VL) numbers text after an image from the
image's grid and keeps the resulting offset on itself, but refreshes it only on forwards with
images: on a fresh model it is absent and after an image prompt a text prompt would inherit that
prompt's offset. So the positions are computed from the prompt itself, every time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from taskvec.models.handle import ModelHandle, resolve_attribute

# The processor's per-token modality (0 text, 1 image, 2 video) that a rope index method reads. A
# prompt from the tokenizer alone has none, and every one of its tokens is text.
MODALITY_TYPES = "mm_token_type_ids"


def prompt_position_ids(handle: ModelHandle, inputs: dict[str, Any]) -> torch.Tensor:
    """The position ids a full forward gives every token of a left-padded batch of prompts: [batch,
    tokens], or [3, batch, tokens] under mrope.

    Each prompt is numbered as if it were alone (from 0 at its first real token), as generation
    numbers them; a plain forward of a padded batch would instead count the padding.
    """
    given = inputs.get("position_ids")
    if given is not None:
        return given
    if handle.architecture.position_style == "mrope":
        return _mrope_position_ids(handle, inputs)
    input_ids = inputs["input_ids"]
    first = handle.architecture.first_position
    mask = inputs.get("attention_mask")
    if mask is None:
        numbers = torch.arange(input_ids.shape[1], device=input_ids.device) + first
        return numbers.expand(input_ids.shape[0], -1)
    # Padding gets position 1, as generation gives it: masked out, its number never matters.
    return (mask.long().cumsum(-1) - 1 + first).masked_fill(mask == 0, 1)


def last_token_position_ids(handle: ModelHandle, inputs: dict[str, Any], rows: int) -> torch.Tensor:
    """The last token's position ids, one copy per row: [rows, 1], or [3, rows, 1] under mrope.

    `inputs` are one whole prompt without left padding, as the full forward would get them.
    """
    return _one_per_row(prompt_position_ids(handle, inputs)[..., -1:], rows)


def _one_per_row(last_column: torch.Tensor, rows: int) -> torch.Tensor:
    """[..., 1, 1] (the batch of one prompt, then its last token) -> [..., rows, 1]."""
    return last_column.expand(*last_column.shape[:-2], rows, 1)


def _mrope_position_ids(handle: ModelHandle, inputs: dict[str, Any]) -> torch.Tensor:
    """The prompts' [3, batch, length] position ids, numbered by the model's own rope index."""
    path = handle.architecture.rope_index_path
    if path is None:
        raise ValueError(f"{handle.architecture.family} uses mrope but the table gives no rope_index_path")
    rope_index: Callable[..., tuple[torch.Tensor, torch.Tensor]] = resolve_attribute(handle.model, path)
    position_ids, _deltas = rope_index(**_rope_index_arguments(rope_index, inputs))
    return position_ids


def _rope_index_arguments(rope_index: Callable[..., Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs the rope index method names (input_ids, image grids, modality types, mask)."""
    parameters = inspect.signature(rope_index).parameters
    named = {
        name
        for name, parameter in parameters.items()
        if parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
    arguments = {key: value for key, value in inputs.items() if key in named}
    if MODALITY_TYPES in named and arguments.get(MODALITY_TYPES) is None:
        arguments[MODALITY_TYPES] = torch.zeros_like(inputs["input_ids"])
    return arguments
