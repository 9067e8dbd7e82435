"""Logit lens: decode a residual with the model's own final norm and unembedding."""

from __future__ import annotations

import torch

from taskvec.engine.devices import to_module_input
from taskvec.models.handle import ModelHandle


@torch.no_grad()
def logit_lens(handle: ModelHandle, residual: torch.Tensor) -> torch.Tensor:
    """Logits [..., vocab] in float32 of residuals [..., hidden] taken from decoder-layer outputs.

    Residuals must be raw layer outputs (from record_residuals), never `output_hidden_states[-1]`,
    which already has the final norm applied: normalising twice would distort the last layer.
    They may live anywhere and in any dtype: each step runs on its module's execution device in its
    compute dtype, since with a device map the final norm and the unembedding can sit on different
    devices (or be offloaded) and neither need hold the residuals. The logits are left on the
    unembedding's device: callers reduce them (softmax, top-k, word probabilities) before copying.
    """
    norm, unembedding = handle.final_norm, handle.unembedding
    normed = norm(to_module_input(residual, norm, unembedding))
    logits = unembedding(to_module_input(normed, unembedding, norm)).float()
    softcap = getattr(handle.text_config, "final_logit_softcapping", None)
    if softcap:
        # Gemma-2 style models squash their logits; the lens must match the model's own output.
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def top_tokens(handle: ModelHandle, logits: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
    """The k most probable tokens of each row of [rows, vocab] logits, with their probabilities."""
    probabilities = logits.float().softmax(dim=-1)
    values, indices = (tensor.cpu() for tensor in probabilities.topk(k, dim=-1))
    tokenizer = handle.tokenizer
    return [
        [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(row_values, row_indices, strict=True)]
        for row_values, row_indices in zip(values, indices, strict=True)
    ]
