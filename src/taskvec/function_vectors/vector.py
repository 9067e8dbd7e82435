"""Function vectors: the summed mean outputs of the heads with the largest indirect effect, as a
vector added to the residual stream (Todd et al. 2024), stored like a task vector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from taskvec.engine import head_contribution
from taskvec.models import ModelHandle
from taskvec.vectors.task_vector import TaskVector

Head = tuple[int, int]  # (layer, head)


def top_heads(effects: torch.Tensor, k: int) -> list[Head]:
    """The `k` (layer, head) pairs of [layers, heads] `effects` with the largest effect, largest first."""
    if not 1 <= k <= effects.numel():
        raise ValueError(f"k must be between 1 and the {effects.numel()} heads, got {k}")
    order = torch.argsort(effects.flatten(), descending=True, stable=True)[:k]
    heads = effects.shape[1]
    return [(int(index) // heads, int(index) % heads) for index in order]


def function_vector(
    handle: ModelHandle, means: Sequence[torch.Tensor], heads: Sequence[Head]
) -> torch.Tensor:
    """Sum over `heads` of each head's mean output projected into the residual stream: [hidden].

    The projection is the head's share of its attention output projection (`head_contribution`,
    bias excluded). On families that normalise the attention block's output before the residual
    (Gemma 2-4's post-attention norm) this is the heads' sum before that norm, as Todd et al. define
    it for models without one; the scale a patch adds it with absorbs the difference.
    """
    if not heads:
        raise ValueError("a function vector needs at least one head")
    total = torch.zeros(handle.hidden_size)
    for layer, head in heads:
        total += head_contribution(handle, layer, head, means[layer][head])
    return total


@dataclass(frozen=True)
class FunctionVector:
    """A function vector with the heads behind it and each layer-head's indirect effect."""

    vector: torch.Tensor  # [hidden]
    heads: list[Head]
    effects: torch.Tensor  # [layers, heads], mean over the corrupted prompts
    metadata: dict[str, Any]

    def as_task_vector(self, num_layers: int) -> TaskVector:
        """The same vector at every layer, so sweeps and `taskvec patch --mode add` take it as they
        take a residual task vector (a function vector is added, not substituted)."""
        return TaskVector(self.vector.expand(num_layers, -1).clone(), dict(self.metadata))
