"""Greedy generation of a few tokens, optionally under a patch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from taskvec.engine.patching import Patch, patch_at
from taskvec.models.handle import ModelHandle


@torch.no_grad()
def generate_greedy(
    handle: ModelHandle, inputs: dict[str, Any], patches: Sequence[Patch] = (), max_new_tokens: int = 5
) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of each prompt in the batch."""
    new_tokens = generate_greedy_ids(handle, inputs, patches, max_new_tokens)
    return list(handle.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))


@torch.no_grad()
def generate_greedy_ids(
    handle: ModelHandle, inputs: dict[str, Any], patches: Sequence[Patch] = (), max_new_tokens: int = 5
) -> torch.Tensor:
    """The generated token ids [batch, new tokens] of each prompt in the batch.

    Patches apply to the prefill only (see patch_at): with the KV cache this equals the reference
    code's cache-free loop that re-applies the patch at every step.
    """
    tokenizer = handle.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # generate() derives position ids from the attention mask at every step itself.
    model_inputs = {key: value for key, value in inputs.items() if key != "position_ids"}
    with patch_at(handle, patches, first_call_only=True):
        output = handle.model.generate(  # type: ignore[operator]
            **model_inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            top_p=None,
            top_k=None,
            temperature=None,
        )
    return output[:, inputs["input_ids"].shape[1] :].cpu()
