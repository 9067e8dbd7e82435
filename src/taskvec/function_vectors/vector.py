"""Function vectors: the summed mean outputs of the heads with the largest indirect effect, as a
vector added to the residual stream (Todd et al. 2024), stored like a task vector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from taskvec.engine import heads_in_residual
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
    """What `heads` add to the residual stream when each outputs its mean: [hidden].

    On families whose attention output joins the residual as it is, this is Todd et al.'s sum of
    the heads' mean outputs projected by the attention output projection (bias excluded). Where a
    norm follows the attention block (Gemma 2-4) or a gate scales it (Mllama), each layer's heads are
    mapped through it to first order at that layer's mean attention output
    (`engine.heads_in_residual`): the pre-norm sum lives in another space, whose norm against the
    residual stream's is arbitrary.
    """
    if not heads:
        raise ValueError("a function vector needs at least one head")
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    total = torch.zeros(handle.hidden_size)
    for layer, layer_heads in by_layer.items():
        total += heads_in_residual(handle, layer, layer_heads, means[layer])
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
