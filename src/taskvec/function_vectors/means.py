"""Mean attention-head outputs at the last token over many in-context prompts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from taskvec.engine import record_heads
from taskvec.models import ModelHandle
from taskvec.progress import with_progress
from taskvec.prompts import Prompt, encode_prompts


@torch.no_grad()
def mean_head_activations(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    *,
    batch_size: int = 8,
    progress: str | None = None,
) -> list[torch.Tensor]:
    """Per layer, each head's output at the prompt's last token averaged over `prompts`:
    [heads, head_dim] float32 on the CPU (a list: head sizes may differ between layers).

    The last token is where the answer is generated (the query's answer marker under the qa
    template), the position whose heads Todd et al. average. Prompts run in batches of
    `batch_size`, left padded, so any number of prompts costs memory for one batch only.
    """
    if not prompts:
        raise ValueError("mean head activations need at least one prompt")
    sums: list[torch.Tensor] | None = None
    batches = [prompts[start : start + batch_size] for start in range(0, len(prompts), batch_size)]
    for batch in with_progress(batches, progress, leave=False):
        recorded = record_heads(handle, encode_prompts(handle, batch), -1)
        totals = [layer[:, 0].sum(dim=0) for layer in recorded]
        sums = totals if sums is None else [old + new for old, new in zip(sums, totals, strict=True)]
    assert sums is not None
    return [total / len(prompts) for total in sums]
