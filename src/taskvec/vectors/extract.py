"""Extract task vectors: exemplar (text or image ICL) and instruction vectors.

Exemplar vector (the paper's protocol): for each query of a split, a prompt of `shots`
demonstrations drawn from the other items of that split, then the query; the residual is read at
the last token of the last demonstration's answer marker (a position that has not seen the query)
at every layer, and averaged over the prompts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from tqdm import tqdm

from taskvec.engine import marker_position, record_residuals
from taskvec.models import ModelHandle
from taskvec.prompts import DEFAULT_TEMPLATE, Modality, Prompt, QATemplate, build_icl_prompt, encode_prompts
from taskvec.tasks import Item, Task
from taskvec.vectors.task_vector import TaskVector


def sample_demonstrations(pool: Sequence[Item], query: Item, shots: int, rng: random.Random) -> list[Item]:
    candidates = [item for item in pool if item.input != query.input]
    if len(candidates) < shots:
        raise ValueError(f"need {shots} demonstrations besides the query, the pool has {len(candidates)}")
    return rng.sample(candidates, shots)


def icl_prompts(
    pool: Sequence[Item],
    queries: Sequence[Item],
    *,
    shots: int,
    seed: int,
    modality: Modality = "text",
    style: str | None = None,
    template: QATemplate = DEFAULT_TEMPLATE,
) -> list[Prompt]:
    """One prompt per query: `shots` demonstrations from `pool` (never the query), then the query.

    One seeded stream for the whole list, so the same (pool, queries, seed) gives the same prompts
    wherever they are built: the vectors, the in-context baselines and the analyses agree.
    """
    rng = random.Random(seed)
    return [
        build_icl_prompt(
            sample_demonstrations(pool, query, shots, rng),
            query,
            demo_modality=modality,
            query_modality=modality,
            style=style,
            template=template,
        )
        for query in queries
    ]


def _batched(prompts: Sequence[Prompt], size: int) -> list[Sequence[Prompt]]:
    return [prompts[start : start + size] for start in range(0, len(prompts), size)]


@torch.no_grad()
def mean_residual_at_marker(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    *,
    occurrence: int,
    template: QATemplate = DEFAULT_TEMPLATE,
    batch_size: int = 8,
    progress: str | None = None,
) -> torch.Tensor:
    """Mean over prompts of the residual at the given answer-marker occurrence: [layers, hidden]."""
    total = torch.zeros(handle.num_layers, handle.hidden_size)
    for batch in tqdm(_batched(prompts, batch_size), desc=progress, disable=progress is None, leave=False):
        inputs = encode_prompts(handle, batch)
        positions = torch.tensor(
            [
                [marker_position(handle.tokenizer, row, template.marker, occurrence)]
                for row in inputs["input_ids"]
            ]
        )
        total += record_residuals(handle, inputs, positions)[:, :, 0].sum(dim=0)
    return total / len(prompts)


def exemplar_vector(
    handle: ModelHandle,
    task: Task,
    *,
    shots: int = 5,
    split: str = "val",
    seed: int = 0,
    modality: Modality = "text",
    style: str | None = None,
    template: QATemplate = DEFAULT_TEMPLATE,
    batch_size: int = 8,
) -> TaskVector:
    pool = task.split(split)
    prompts = icl_prompts(
        pool, pool, shots=shots, seed=seed, modality=modality, style=style, template=template
    )
    vectors = mean_residual_at_marker(
        handle,
        prompts,
        occurrence=-2,
        template=template,
        batch_size=batch_size,
        progress=f"{task.name} {modality} vectors",
    )
    metadata = {
        "model": handle.name,
        "task": task.name,
        "spec": f"{modality}-icl",
        "shots": shots,
        "seed": seed,
        "split": split,
        "prompts": len(prompts),
        "style": style,
        "position": f"last token of the last demonstration's {template.marker!r}",
        "template": {"query": template.query, "answer": template.answer},
    }
    return TaskVector(vectors, metadata)


@torch.no_grad()
def instruction_vector(handle: ModelHandle, task: Task, instruction: str | None = None) -> TaskVector:
    """The residual at the last token of the bare instruction, every layer."""
    text = instruction if instruction is not None else task.instruction
    if not text:
        raise ValueError(f"task {task.name!r} has no instruction")
    residuals = record_residuals(handle, handle.build_inputs([text]), -1)
    metadata = {
        "model": handle.name,
        "task": task.name,
        "spec": "instruction",
        "instruction": text,
        "position": "last token of the instruction",
    }
    return TaskVector(residuals[0, :, 0], metadata)
