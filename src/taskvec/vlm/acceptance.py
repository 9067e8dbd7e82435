"""The default VLM's acceptance measurements, written into its model card.

- recognition: the naming prompt on every picture, accuracy per family and style (held-out marked);
- text-only in-context learning on the six paper tasks, VLM vs the base LM it was built on (LoRA must
  not have broken the language model);
- image in-context learning (image demonstrations and query) vs the image query alone;
- cosine similarity of base-LM and VLM residuals at the answer marker, per layer: how far
  instruction tuning moved the language model (what makes LLM -> VLM transfer a real test).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from taskvec.evaluation import accuracy, generate_answers
from taskvec.models.handle import ModelHandle
from taskvec.prompts import Modality, build_query_prompt
from taskvec.prompts.settings import PromptSettings
from taskvec.tasks import Task
from taskvec.vectors import VectorSpec, extract_vector, icl_prompts
from taskvec.vlm.data import EntityImage
from taskvec.vlm.evaluation import name_pictures


def recognition_by_style(
    handle: ModelHandle, images: Sequence[EntityImage], held_out: Mapping[str, str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """{family: {style: {"accuracy", "pictures", "held_out"}}} with the naming prompt, prefix match."""
    marks: dict[tuple[str, str], list[int]] = {}
    for naming in name_pictures(handle, images):
        marks.setdefault((naming.image.family, naming.image.style), []).append(int(naming.correct))
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for (family, style), hits in sorted(marks.items()):
        table.setdefault(family, {})[style] = {
            "accuracy": sum(hits) / len(hits),
            "pictures": len(hits),
            "held_out": held_out.get(family) == style,
        }
    return table


def icl_accuracy(
    handle: ModelHandle,
    task: Task,
    *,
    modality: Modality,
    shots: int = 5,
    seed: int = 0,
    limit: int | None = None,
) -> float:
    """Test accuracy of `shots`-shot ICL (demonstrations from val), prefix metric; shots=0: query alone."""
    test = task.split("test")[:limit]
    if shots == 0:
        prompts = [build_query_prompt(item, modality=modality) for item in test]
    else:
        prompts = icl_prompts(
            task.split("val"), test, PromptSettings(shots=shots, seed=seed), modality=modality, task=task.name
        )
    return accuracy(generate_answers(handle, prompts), [item.answers() for item in test])


@torch.no_grad()
def residual_cosine_per_layer(
    base: ModelHandle, vlm: ModelHandle, tasks: Sequence[Task], *, shots: int = 5, seed: int = 0
) -> list[float]:
    """Per layer, the cosine of the two models' text-ICL vectors (the mean residual at the last
    demonstration's marker over each task's val prompts), averaged over tasks."""
    totals = torch.zeros(base.num_layers)
    for task in tasks:
        means = [
            extract_vector(
                handle, task, VectorSpec.TEXT_ICL, settings=PromptSettings(shots=shots, seed=seed)
            ).vector.vectors
            for handle in (base, vlm)
        ]
        totals += torch.nn.functional.cosine_similarity(means[0], means[1], dim=-1)
    return (totals / len(tasks)).tolist()


def measure_acceptance(
    base: ModelHandle,
    vlm: ModelHandle,
    tasks: Sequence[Task],
    images: Sequence[EntityImage],
    held_out: Mapping[str, str],
    *,
    limit: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """All of the module's measurements as one JSON-ready dict."""
    log("recognition of every picture with the naming prompt")
    results: dict[str, Any] = {"recognition": recognition_by_style(vlm, images, held_out)}
    rows: dict[str, dict[str, float]] = {}
    for task in tasks:
        log(f"in-context learning: {task.name}")
        rows[task.name] = {
            "text_icl_base_lm": icl_accuracy(base, task, modality="text", limit=limit),
            "text_icl_vlm": icl_accuracy(vlm, task, modality="text", limit=limit),
            "image_icl_vlm": icl_accuracy(vlm, task, modality="image", limit=limit),
            "no_context_image_vlm": icl_accuracy(vlm, task, modality="image", shots=0, limit=limit),
        }
    results["icl"] = rows
    log("residual cosine, base LM vs VLM")
    results["residual_cosine_per_layer"] = residual_cosine_per_layer(base, vlm, tasks)
    results["settings"] = {"shots": 5, "seed": 0, "test_limit": limit, "metric": "prefix (paper)"}
    return results
