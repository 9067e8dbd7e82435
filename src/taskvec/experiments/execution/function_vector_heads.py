"""What a run's function vectors say beyond their accuracy: which heads carry each task, whether text
and image demonstrations put it in the same heads, and what the vectors decode to."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from taskvec.engine import logit_lens
from taskvec.experiments.execution.steps import StepRunner
from taskvec.experiments.protocol.conditions import Condition
from taskvec.experiments.protocol.recipes import FunctionVector
from taskvec.experiments.results.run_results import HeadEffects, HeadOverlap
from taskvec.function_vectors.vector import top_heads
from taskvec.tasks import Task

TOP_TOKENS = 5


def heads_of_run(
    steps: StepRunner, conditions: Sequence[Condition], tasks: Sequence[Task], seeds: Sequence[int]
) -> list[HeadEffects]:
    """One record per (model, task, demonstration kind) the run's function-vector conditions used,
    read from the run's vector store (found there by the vector phase)."""
    recipes: dict[str, FunctionVector] = {}
    for condition in conditions:
        if isinstance(condition.vector, FunctionVector):
            recipes.setdefault(condition.vector.id, condition.vector)
    records = []
    for recipe in recipes.values():
        role, spec = recipe.role, recipe.spec
        model = steps.store.model(role)
        for task in tasks:
            found = [steps.store.get(recipe, task, seed)[0] for seed in seeds]
            effects = torch.tensor([vector.metadata["effects"] for vector in found]).mean(dim=0)
            k = int(found[0].metadata["k"])
            mean_vector = torch.stack([vector.vectors[0] for vector in found]).float().mean(dim=0)
            ids = logit_lens(model, mean_vector).topk(TOP_TOKENS).indices.tolist()
            records.append(
                HeadEffects(
                    role=role,
                    task=task.name,
                    spec=spec.value,
                    k=k,
                    seeds=list(seeds),
                    effects=[[round(float(v), 6) for v in row] for row in effects],
                    top_heads=[list(head) for head in top_heads(effects, k)],
                    heads_per_seed=[[list(head) for head in vector.metadata["heads"]] for vector in found],
                    top_tokens=[model.tokenizer.decode([token]) for token in ids],
                )
            )
    return records


def head_overlaps(records: Sequence[HeadEffects]) -> list[HeadOverlap]:
    """Per task, the model's text-ICL and image-ICL heads compared (tasks with both)."""
    overlaps = []
    by_source = {(r.role, r.task, r.spec): r for r in records}
    for record in records:
        if record.role != "vlm" or record.spec != "text-icl":
            continue
        image = by_source.get(("vlm", record.task, "image-icl"))
        if image is None:
            continue
        image_heads = {tuple(head) for head in image.top_heads}
        text_effects = torch.tensor(record.effects).flatten()
        image_effects = torch.tensor(image.effects).flatten()
        overlaps.append(
            HeadOverlap(
                task=record.task,
                k=record.k,
                shared=[head for head in record.top_heads if tuple(head) in image_heads],
                correlation=_pearson(text_effects, image_effects),
            )
        )
    return overlaps


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """None when either side is constant (a correlation is undefined there)."""
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return round(float(a @ b) / denominator, 4) if denominator > 0 else None
