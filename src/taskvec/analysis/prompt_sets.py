"""The prompts the analyses read: ICL prompts (text or image demonstrations) and instruction prompts.

Queries come from the test split and demonstrations from the validation split, as in the
experiments, so an analysis never shows the model the query among its own demonstrations. ICL
prompts are built by `taskvec.vectors.icl_prompts`, the function the vectors are extracted with.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from taskvec.models import ModelHandle
from taskvec.prompts import DEFAULT_TEMPLATE, Modality, Prompt, QATemplate, as_template, build_icl_prompt
from taskvec.prompts.settings import PromptSettings
from taskvec.tasks import Item, Task
from taskvec.vectors import VectorSpec, icl_prompts, parse_spec

ANALYSIS_PROMPT_SETTINGS = PromptSettings(shots=5, seed=0, template="qa", batch_size=4)
"""The analyses' prompts: 5 demonstrations seeded by 0, each item's first image style, the QA
template, in batches of 4 (`AnalysisSettings.prompts`, the lens's and the map's default)."""


def query_items(task: Task, limit: int | None = None) -> list[Item]:
    """Items to ask about: the test split, else the validation split, else every item."""
    for split in ("test", "val"):
        if split in task.splits:
            return task.split(split)[:limit]
    return list(task.items)[:limit]


def demonstration_pool(task: Task) -> list[Item]:
    return task.split("val") if "val" in task.splits else list(task.items)


def unsupported_reason(handle: ModelHandle, task: Task, spec: VectorSpec | str) -> str | None:
    """Why `spec` cannot be run for this model and task, or None when it can."""
    spec = parse_spec(spec)
    if spec is VectorSpec.IMAGE_ICL and not handle.architecture.is_vision_language:
        return f"{handle.name} is a text-only model"
    if spec is VectorSpec.IMAGE_ICL and not task.has_images:
        return f"task {task.name} has no images"
    if spec is VectorSpec.IMAGE_ICL and not handle.architecture.multi_image:
        return f"{handle.architecture.family} takes one image per prompt"
    if spec.uses_instruction and not task.instruction:
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
    """The task's instruction on its own line, then the query (in the same chat turn under chat)."""
    bare = build_icl_prompt([], query, query_modality=modality, style=style, template=template)
    return Prompt(f"{task.instruction}\n{bare.text}", bare.images, chat=bare.chat)


def task_icl_prompts(
    task: Task,
    queries: Sequence[Item],
    *,
    modality: Modality,
    settings: PromptSettings = ANALYSIS_PROMPT_SETTINGS,
) -> list[Prompt]:
    """ICL prompts of `queries` with demonstrations from the task's demonstration pool, drawn and
    shown by `settings` (`icl_prompts`).

    Too small a pool is an error naming the task and the counts (`TooFewDemonstrationsError`).
    """
    return icl_prompts(demonstration_pool(task), queries, settings, modality=modality, task=task.name)


def spec_prompts(
    task: Task,
    spec: VectorSpec | str,
    queries: Sequence[Item],
    *,
    settings: PromptSettings = ANALYSIS_PROMPT_SETTINGS,
) -> list[Prompt]:
    """Prompts that specify the task by `spec`; image ICL asks about the query's image too.
    Instruction prompts take only the template of `settings`."""
    spec = parse_spec(spec)
    if spec is VectorSpec.INSTRUCTION:
        template = as_template(settings.template)
        return [instruction_prompt(task, query, template=template) for query in queries]
    return task_icl_prompts(task, queries, modality=spec.demo_modality or "text", settings=settings)


def seeded_sample(items: Sequence[Item], limit: int, seed: int) -> list[Item]:
    """Up to `limit` items, a fixed sample when there are more."""
    if len(items) <= limit:
        return list(items)
    return random.Random(seed).sample(list(items), limit)
