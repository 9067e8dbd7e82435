"""The prompts the analyses read: ICL prompts (text or image demonstrations) and instruction prompts.

Queries come from the test split and demonstrations from the validation split, as in the
experiments, so an analysis never shows the model the query among its own demonstrations.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from taskvec.models import ModelHandle
from taskvec.prompts import DEFAULT_TEMPLATE, Modality, Prompt, QATemplate, build_icl_prompt
from taskvec.tasks import Item, Task
from taskvec.vectors import sample_demonstrations

Spec = Literal["text-icl", "image-icl", "instruction"]
SPECS: tuple[Spec, ...] = ("text-icl", "image-icl", "instruction")


def spec_modality(spec: Spec) -> Modality:
    """The modality of an ICL spec's demonstrations (an instruction is text)."""
    return "image" if spec == "image-icl" else "text"


def query_items(task: Task, limit: int | None = None) -> list[Item]:
    """Items to ask about: the test split, else the validation split, else every item."""
    for split in ("test", "val"):
        if split in task.splits:
            return task.split(split)[:limit]
    return list(task.items)[:limit]


def demonstration_pool(task: Task) -> list[Item]:
    return task.split("val") if "val" in task.splits else list(task.items)


def unsupported_reason(handle: ModelHandle, task: Task, spec: Spec) -> str | None:
    """Why `spec` cannot be run for this model and task, or None when it can."""
    if spec == "image-icl" and not handle.architecture.is_vision_language:
        return f"{handle.name} is a text-only model"
    if spec == "image-icl" and not task.has_images:
        return f"task {task.name} has no images"
    if spec == "image-icl" and not handle.architecture.multi_image:
        return f"{handle.architecture.family} takes one image per prompt"
    if spec == "instruction" and not task.instruction:
        return f"task {task.name} has no instruction"
    return None


def instruction_prompt(
    task: Task,
    query: Item,
    *,
    modality: Modality = "text",
    style: str | None = None,
    template: QATemplate = DEFAULT_TEMPLATE,
) -> Prompt:
    """The task's instruction on its own line, then the query."""
    bare = build_icl_prompt([], query, query_modality=modality, style=style, template=template)
    return Prompt(f"{task.instruction}\n{bare.text}", bare.images)


def icl_prompts(
    task: Task,
    queries: Sequence[Item],
    *,
    modality: Modality,
    shots: int = 5,
    seed: int = 0,
    style: str | None = None,
    query_modality: Modality | None = None,
    template: QATemplate = DEFAULT_TEMPLATE,
) -> list[Prompt]:
    """One prompt per query: `shots` seeded demonstrations (never the query itself), then the query."""
    pool = demonstration_pool(task)
    rng = random.Random(seed)
    prompts = []
    for query in queries:
        available = len([item for item in pool if item.input != query.input])
        demonstrations = sample_demonstrations(pool, query, min(shots, available), rng)
        prompts.append(
            build_icl_prompt(
                demonstrations,
                query,
                demo_modality=modality,
                query_modality=query_modality or modality,
                style=style,
                template=template,
            )
        )
    return prompts


def spec_prompts(
    task: Task,
    spec: Spec,
    queries: Sequence[Item],
    *,
    shots: int = 5,
    seed: int = 0,
    style: str | None = None,
    template: QATemplate = DEFAULT_TEMPLATE,
) -> list[Prompt]:
    """Prompts that specify the task by `spec`; image ICL asks about the query's image too."""
    if spec == "instruction":
        return [instruction_prompt(task, query, template=template) for query in queries]
    modality: Modality = "image" if spec == "image-icl" else "text"
    return icl_prompts(
        task, queries, modality=modality, shots=shots, seed=seed, style=style, template=template
    )


def batches(prompts: Sequence[Prompt], size: int) -> list[Sequence[Prompt]]:
    return [prompts[start : start + size] for start in range(0, len(prompts), size)]


def seeded_sample(items: Sequence[Item], limit: int, seed: int) -> list[Item]:
    """Up to `limit` items, a fixed sample when there are more."""
    if len(items) <= limit:
        return list(items)
    return random.Random(seed).sample(list(items), limit)
