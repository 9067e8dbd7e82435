"""The prompts of the function-vector protocol (Todd et al. 2024): clean ICL prompts whose head
activations are averaged, and prompts whose demonstration labels are shuffled, on which each head's
causal indirect effect is measured."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from taskvec.prompts import Modality, Prompt, as_template, build_icl_prompt
from taskvec.prompts.settings import PromptSettings
from taskvec.tasks import Item
from taskvec.vectors.extract import sample_demonstrations

LABEL_SEED_OFFSET = 7919


def cycled_queries(pool: Sequence[Item], count: int) -> list[Item]:
    """`count` queries taken from the pool in order, round and round: many-shot means average over
    many prompts, more than the split has items (each prompt draws its own demonstrations)."""
    if not pool:
        raise ValueError("an empty split has no queries")
    return [pool[index % len(pool)] for index in range(count)]


def function_prompts(
    pool: Sequence[Item],
    queries: Sequence[Item],
    settings: PromptSettings,
    *,
    modality: Modality = "text",
    shuffle_labels: bool = False,
    task: str | None = None,
) -> list[Prompt]:
    """One prompt per query: `settings.shots` demonstrations from `pool` (never the query), then the
    query, inputs in `modality` (images in `settings.style`), under `settings.template`, seeded by
    `settings.seed`; with `shuffle_labels`, each prompt's demonstration outputs permuted among its
    demonstrations, so the prompt shows the inputs and the answer format but not the task."""
    seed, template = settings.seed, as_template(settings.template)
    rng = random.Random(seed)
    # Labels shuffle from a stream of their own, so the same seed gives the same demonstrations with
    # and without shuffling: a shuffled prompt is its clean prompt with the labels permuted.
    label_rng = random.Random(seed + LABEL_SEED_OFFSET)
    prompts = []
    for query in queries:
        demonstrations = sample_demonstrations(pool, query, settings.shots, rng, task=task)
        if shuffle_labels:
            outputs = [item.output for item in demonstrations]
            label_rng.shuffle(outputs)
            demonstrations = [
                replace(item, output=output, aliases=())
                for item, output in zip(demonstrations, outputs, strict=True)
            ]
        prompts.append(
            build_icl_prompt(
                demonstrations,
                query,
                demo_modality=modality,
                query_modality=modality,
                style=settings.style,
                template=template,
            )
        )
    return prompts
