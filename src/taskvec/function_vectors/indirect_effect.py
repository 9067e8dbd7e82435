"""Causal indirect effect of every attention head (Todd et al. 2024), all heads of a prompt in one
prefix pass.

On a prompt whose demonstration labels are shuffled, replace one head's output at the last token
with its mean over clean ICL prompts; the head's effect on that prompt is the gain in the probability
of the correct answer's first token. Every head's replacement changes the last token only, so the
prompt's other tokens run once and each head is one decode row (`engine.shared_prefix`); the
per-head loop of full forwards (`method="loop"`) is the reference it equals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from taskvec.analysis.tokens import first_token_variants, word_probability
from taskvec.engine import HeadPatch, RowPatch, head_layout, patch_heads
from taskvec.engine.layer_outputs import last_logits_only
from taskvec.engine.shared_prefix import patched_logits
from taskvec.models import ModelHandle
from taskvec.progress import with_progress
from taskvec.prompts import Prompt, encode_prompts

EffectMethod = Literal["one_pass", "loop"]


@dataclass(frozen=True)
class IndirectEffects:
    """`per_prompt` [prompts, layers, heads]: the gain in the correct answer's probability when
    that head is replaced; `baseline` [prompts]: that probability unpatched."""

    per_prompt: torch.Tensor
    baseline: torch.Tensor

    @property
    def effects(self) -> torch.Tensor:
        """The mean over prompts, [layers, heads]."""
        return self.per_prompt.mean(dim=0)


@torch.no_grad()
def indirect_effects(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    answers: Sequence[str],
    means: Sequence[torch.Tensor],
    *,
    method: EffectMethod = "one_pass",
    batch_size: int = 2,
    memory_budget: int | None = None,
    progress: str | None = None,
) -> IndirectEffects:
    """Each head's causal indirect effect on each prompt, `answers[i]` the correct answer of
    `prompts[i]` and `means[layer]` [heads, head_dim] the heads' mean outputs (`mean_head_activations`).

    A word's probability is the largest over its first token's spellings (with and without a leading
    space, `analysis.tokens`). `batch_size` prompts share a prefix pass; `memory_budget` bounds
    their decode rows' cache copies as in sweeps.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("indirect effects need at least one prompt")
    layout = head_layout(handle)
    if len(means) != handle.num_layers or any(
        tuple(mean.shape) != (layout.heads, layout.head_dims[layer]) for layer, mean in enumerate(means)
    ):
        raise ValueError(
            f"head means must be one [heads, head_dim] tensor per layer of this model ({handle.num_layers} "
            f"layers of {layout.heads} heads): mean activations of another model?"
        )
    variants = [first_token_variants(handle.tokenizer, answer) for answer in answers]
    heads = [(layer, head) for layer in range(handle.num_layers) for head in range(layout.heads)]
    probabilities: list[torch.Tensor] = []  # per prompt [1 + heads]: unpatched, then each head
    batches = [
        range(start, min(start + batch_size, len(prompts))) for start in range(0, len(prompts), batch_size)
    ]
    for batch in with_progress(batches, progress, leave=False):
        if method == "one_pass":
            logits = _one_pass_logits(handle, [prompts[i] for i in batch], heads, means, memory_budget)
        elif method == "loop":
            logits = torch.cat([_loop_logits(handle, prompts[i], heads, means) for i in batch])
        else:
            raise ValueError(f"unknown method {method!r}; use 'one_pass' or 'loop'")
        rows = logits.softmax(dim=-1).reshape(len(batch), 1 + len(heads), -1)
        probabilities.extend(word_probability(rows[offset], variants[i]) for offset, i in enumerate(batch))
    table = torch.stack(probabilities)
    gains = table[:, 1:] - table[:, :1]
    return IndirectEffects(gains.reshape(len(prompts), handle.num_layers, layout.heads), table[:, 0])


def _one_pass_logits(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    heads: Sequence[tuple[int, int]],
    means: Sequence[torch.Tensor],
    memory_budget: int | None,
) -> torch.Tensor:
    rows = [
        row
        for query in range(len(prompts))
        for row in (
            RowPatch(query),
            *(RowPatch(query, layer, means[layer][head], head=head) for layer, head in heads),
        )
    ]
    return patched_logits(handle, encode_prompts(handle, prompts), rows, memory_budget=memory_budget)


def _loop_logits(
    handle: ModelHandle, prompt: Prompt, heads: Sequence[tuple[int, int]], means: Sequence[torch.Tensor]
) -> torch.Tensor:
    inputs = encode_prompts(handle, [prompt])
    logits = []
    for patches in ([], *([HeadPatch(layer, head, means[layer][head], -1)] for layer, head in heads)):
        with patch_heads(handle, patches):
            output = handle.model(**inputs, use_cache=False, **last_logits_only(handle.model))
            logits.append(output.logits[0, -1].float().cpu())
    return torch.stack(logits)
