"""What a task vector says on its own: the logit lens of the vector itself, at every layer.

The vector is decoded like a residual (the engine's lens applies the final norm and any logit
softcap once), so a mid-layer text-ICL vector of country-capital may read as "capital" or a
capital city's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from taskvec.engine import logit_lens, top_tokens
from taskvec.models import ModelHandle

DecodedTokens = list[list[tuple[str, float]]]  # [layer][rank] -> (token, probability)


@dataclass
class ScoredToken:
    token: str
    probability: float  # rounded to 4 decimals


# [layer][rank] -> token and probability, as analysis.json holds them.
DecodedLayers = list[list[ScoredToken]]


@dataclass
class DecodedVectors:
    """The `decoded_tokens` analysis: {"vlm" | "llm": {vector label: top tokens per layer}}, each
    vector decoded by the model it was read from."""

    by_model: dict[str, dict[str, DecodedLayers]]


@torch.no_grad()
def decode_vector(handle: ModelHandle, vectors: torch.Tensor, k: int = 5) -> DecodedTokens:
    """Top-k tokens of a [layers, hidden] vector at each layer."""
    return top_tokens(handle, logit_lens(handle, vectors), k=k)


def decode_vectors(
    handle: ModelHandle, vectors: Mapping[str, torch.Tensor], k: int = 5
) -> dict[str, DecodedLayers]:
    """Top-k tokens per layer of each labelled vector."""
    decoded: dict[str, DecodedLayers] = {}
    for label, vector in vectors.items():
        rows = decode_vector(handle, vector, k)
        decoded[label] = [
            [ScoredToken(token, round(probability, 4)) for token, probability in row] for row in rows
        ]
    return decoded
