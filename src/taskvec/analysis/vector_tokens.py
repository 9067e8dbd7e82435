"""What a task vector says on its own: the logit lens of the vector itself, at every layer.

The vector is decoded like a residual (the engine's lens applies the final norm and any logit
softcap once), so a mid-layer text-ICL vector of country-capital may read as "capital" or a
capital city's name.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from taskvec.engine import logit_lens, top_tokens
from taskvec.models import ModelHandle

DecodedTokens = list[list[tuple[str, float]]]  # [layer][rank] -> (token, probability)


@torch.no_grad()
def decode_vector(handle: ModelHandle, vectors: torch.Tensor, k: int = 5) -> DecodedTokens:
    """Top-k tokens of a [layers, hidden] vector at each layer."""
    return top_tokens(handle, logit_lens(handle, vectors), k=k)


def decode_vectors(
    handle: ModelHandle, vectors: Mapping[str, torch.Tensor], k: int = 5
) -> dict[str, DecodedTokens]:
    """Top-k tokens per layer of each labelled vector (JSON-ready: lists of [token, probability])."""
    decoded: dict[str, DecodedTokens] = {}
    for label, vector in vectors.items():
        rows = decode_vector(handle, vector, k)
        decoded[label] = [[(token, round(probability, 4)) for token, probability in row] for row in rows]
    return decoded
