"""The demo job: one task on the default LM, no context vs in-context vs a patched task vector.

Scored by the run's protocol (the paper's): greedy answers of `max_new_tokens` tokens (default 1),
prefix match, so the demo's numbers compare with `taskvec run`'s. The layer is chosen on validation
by the run's rule (`taskvec.layer_choice`): the same candidates, and no patched test when no
candidate layer beats the unpatched validation queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from taskvec.evaluation import accuracy, generate_answers, sweep_accuracy
from taskvec.layer_choice import choose_on_validation, default_candidates, placement_text
from taskvec.models import ModelHandle
from taskvec.prompts import (
    DEFAULT_TEMPLATE,
    Prompt,
    QATemplate,
    TemplateName,
    as_template,
    build_query_prompt,
)
from taskvec.prompts.settings import PromptSettings
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
    patched: float | None  # None when no layer helped: the vector is not tested
    best_layer: int | None  # None: no candidate layer beat the unpatched validation queries
    validation_accuracy_per_layer: list[float]
    candidate_layers: list[int]  # the layers the choice could take
    unpatched_validation: float  # first-token accuracy of the bare validation queries
    max_new_tokens: int = 1
    metric: str = DEMO_METRIC

    @property
    def placement(self) -> str:
        """How the chosen layer reads: "layer 6", or "no layer helped"."""
        return placement_text(self.best_layer)

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

    The layer sweep reads the first token under the patch, and the bare validation queries are
    scored the same way (one generated token); the layer is chosen among all but the last layer as
    the run chooses it, and when none beats the bare queries `patched` and `best_layer` are None.
    Test answers are `max_new_tokens` greedy tokens, prefix-matched (1 token: the run's protocol).
    `template` "chat" asks every prompt as one user turn of the model's chat template.
    """
    template = as_template(template)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 test item (None: the whole split), got {limit}")
    validation, test = task.split("val"), task.split("test")[:limit]
    answers = [item.answers() for item in test]
    prompt_settings = PromptSettings(shots=shots, seed=seed, template=template.name)
    vector = extract_vector(
        handle,
        task,
        VectorSpec.TEXT_ICL,
        settings=prompt_settings,
        progress=f"{task.name} text vectors" if progress else None,
    ).vector
    validation_queries = [build_query_prompt(i, template=template) for i in validation]
    validation_answers = [i.answers() for i in validation]
    per_layer = sweep_accuracy(
        handle,
        validation_queries,
        validation_answers,
        vector.vectors,
        progress="layer sweep on val" if progress else None,
    )
    bare = generate_answers(
        handle, validation_queries, max_new_tokens=1, progress="val: no context" if progress else None
    )
    unpatched = accuracy(bare, validation_answers)
    choice = choose_on_validation(
        {1.0: {task.name: [per_layer]}},
        default_candidates(handle.num_layers),
        unpatched={task.name: unpatched},
        scaled=False,
    )
    best_layer = choice.chosen
    queries = [build_query_prompt(item, template=template) for item in test]
    in_context = icl_prompts(validation, test, prompt_settings, task=task.name)
    label = "test: {}" if progress else None

    def score(prompts: Sequence[Prompt], name: str, layer: int | None = None) -> float:
        generated = generate_answers(
            handle,
            prompts,
            vector=vector.at(layer) if layer is not None else None,
            layer=layer,
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
        patched=score(queries, "patched", best_layer) if best_layer is not None else None,
        best_layer=best_layer,
        validation_accuracy_per_layer=per_layer,
        candidate_layers=choice.candidates,
        unpatched_validation=unpatched,
        max_new_tokens=max_new_tokens,
        metric=DEMO_METRIC,
    )
