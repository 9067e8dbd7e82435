"""Logit lens: decode a residual with the model's own final norm and unembedding."""

from __future__ import annotations

import torch

from taskvec.models.handle import ModelHandle


@torch.no_grad()
def logit_lens(handle: ModelHandle, residual: torch.Tensor) -> torch.Tensor:
    """Logits [..., vocab] of residuals [..., hidden] taken from decoder-layer outputs.

    Residuals must be raw layer outputs (from record_residuals), never `output_hidden_states[-1]`,
    which already has the final norm applied: normalising twice would distort the last layer.
    """
    parameters = next(handle.final_norm.parameters(), None)
    device = parameters.device if parameters is not None else handle.device
    dtype = parameters.dtype if parameters is not None else handle.dtype
    normed = handle.final_norm(residual.to(device=device, dtype=dtype))
    logits = handle.unembedding(normed).float()
    softcap = getattr(handle.text_config, "final_logit_softcapping", None)
    if softcap:
        # Gemma-2 style models squash their logits; the lens must match the model's own output.
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def top_tokens(handle: ModelHandle, logits: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
    """The k most probable tokens of each row of [rows, vocab] logits, with their probabilities."""
    probabilities = logits.float().softmax(dim=-1)
    values, indices = probabilities.topk(k, dim=-1)
    tokenizer = handle.tokenizer
    return [
        [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(row_values, row_indices, strict=True)]
        for row_values, row_indices in zip(values, indices, strict=True)
    ]
