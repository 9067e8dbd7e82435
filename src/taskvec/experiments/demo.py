"""The demo job: one task on the default LM, no context vs in-context vs a patched task vector."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from taskvec.evaluation import accuracy, generate_answers, sweep_accuracy
from taskvec.models import ModelHandle
from taskvec.prompts import build_query_prompt
from taskvec.tasks import Task
from taskvec.vectors import exemplar_vector, icl_prompts


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

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def run_demo(
    handle: ModelHandle,
    task: Task,
    *,
    shots: int = 5,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
) -> DemoResult:
    """Extract a text-ICL vector on validation, choose its layer there, then score the test split."""
    validation, test = task.split("val"), task.split("test")[:limit]
    answers = [item.answers() for item in test]
    vector = exemplar_vector(handle, task, shots=shots, seed=seed)
    per_layer = sweep_accuracy(
        handle,
        [build_query_prompt(i) for i in validation],
        [i.answers() for i in validation],
        vector.vectors,
        progress="layer sweep on val" if progress else None,
    )
    best_layer = max(range(len(per_layer)), key=lambda layer: (per_layer[layer], -layer))
    queries = [build_query_prompt(item) for item in test]
    in_context = icl_prompts(validation, test, shots=shots, seed=seed)
    label = "test: {}" if progress else None
    return DemoResult(
        model=handle.name,
        task=task.name,
        shots=shots,
        seed=seed,
        test_items=len(test),
        no_context=accuracy(
            generate_answers(handle, queries, progress=label and label.format("no context")), answers
        ),
        in_context=accuracy(
            generate_answers(handle, in_context, progress=label and label.format(f"{shots}-shot")), answers
        ),
        patched=accuracy(
            generate_answers(
                handle,
                queries,
                vector=vector.at(best_layer),
                layer=best_layer,
                progress=label and label.format("patched"),
            ),
            answers,
        ),
        best_layer=best_layer,
        validation_accuracy_per_layer=per_layer,
    )
