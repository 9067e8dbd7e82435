"""Decoder layers return a tensor in transformers v5 and a tuple in older code: accept both."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def hidden_from_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def output_with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def last_logits_only(model: torch.nn.Module) -> dict[str, Any]:
    """Forward kwargs that skip the unembedding of every position but the last.

    With a 262k-word vocabulary the unembedding of a 600-token prompt costs more than all decoder
    layers together, and every engine path reads only the last position's logits.
    """
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": 1}
    return {}
