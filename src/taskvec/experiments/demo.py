"""The demo job: one task on the default LM, no context vs in-context vs a patched task vector.

Scored by the run's protocol (the paper's): greedy answers of `max_new_tokens` tokens (default 1),
prefix match, so the demo's numbers compare with `taskvec run`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from taskvec.evaluation import accuracy, generate_answers, sweep_accuracy
from taskvec.models import ModelHandle
from taskvec.prompts import (
    DEFAULT_TEMPLATE,
    Prompt,
    QATemplate,
    TemplateName,
    as_template,
    build_query_prompt,
)
from taskvec.tasks import Task
from taskvec.vectors import VectorSpec, extract_vector, icl_prompts

DEMO_METRIC = "prefix"  # taskvec.evaluation.is_correct: one of generated and answer starts the other


@dataclass
class DemoResult:
    model: str
    task: str
    shots: int
    seed: int
    test_items: int
    no_context: float
    in_context: float
    patched: float
    best_layer: int
    validation_accuracy_per_layer: list[float]
    max_new_tokens: int = 1
    metric: str = DEMO_METRIC

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def run_demo(
    handle: ModelHandle,
    task: Task,
    *,
    shots: int = 5,
    seed: int = 0,
    limit: int | None = None,
    max_new_tokens: int = 1,
    progress: bool = True,
    template: QATemplate | TemplateName = DEFAULT_TEMPLATE,
) -> DemoResult:
    """Extract a text-ICL vector on validation, choose its layer there, then score the test split.

    The layer sweep reads the first token under the patch; test answers are `max_new_tokens` greedy
    tokens, prefix-matched (1 token: the run's protocol). `template` "chat" asks every prompt as one
    user turn of the model's chat template.
    """
    template = as_template(template)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 test item (None: the whole split), got {limit}")
    validation, test = task.split("val"), task.split("test")[:limit]
    answers = [item.answers() for item in test]
    vector = extract_vector(
        handle,
        task,
        VectorSpec.TEXT_ICL,
        shots=shots,
        seed=seed,
        progress=f"{task.name} text vectors" if progress else None,
        template=template,
    ).vector
    per_layer = sweep_accuracy(
        handle,
        [build_query_prompt(i, template=template) for i in validation],
        [i.answers() for i in validation],
        vector.vectors,
        progress="layer sweep on val" if progress else None,
    )
    best_layer = max(range(len(per_layer)), key=lambda layer: (per_layer[layer], -layer))
    queries = [build_query_prompt(item, template=template) for item in test]
    in_context = icl_prompts(validation, test, shots=shots, seed=seed, template=template, task=task.name)
    label = "test: {}" if progress else None

    def score(prompts: Sequence[Prompt], name: str, patched: bool = False) -> float:
        generated = generate_answers(
            handle,
            prompts,
            vector=vector.at(best_layer) if patched else None,
            layer=best_layer if patched else None,
            max_new_tokens=max_new_tokens,
            progress=label and label.format(name),
        )
        return accuracy(generated, answers)

    return DemoResult(
        model=handle.name,
        task=task.name,
        shots=shots,
        seed=seed,
        test_items=len(test),
        no_context=score(queries, "no context"),
        in_context=score(in_context, f"{shots}-shot"),
        patched=score(queries, "patched", patched=True),
        best_layer=best_layer,
        validation_accuracy_per_layer=per_layer,
        max_new_tokens=max_new_tokens,
        metric=DEMO_METRIC,
    )
