"""Do the same heads carry a task given by text and by image demonstrations?

For one task: the function vector from text ICL and from image ICL (heads scored on each), the
overlap of their top-k heads, and each vector added to the queries of both modalities, side by side
with the residual task vector of the same demonstrations patched into the same queries. Each
transfer picks its layer (and, for function vectors, its scale) on validation by the run's rule
(`taskvec.layer_choice`: the same candidate layers, ties, and "no layer helped" when no candidate
beats the bare validation queries), then answers the test queries there: accuracy with a bootstrap
interval over test items, next to no context. A transfer where no layer helped is not tested.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from taskvec.engine import PatchMode
from taskvec.evaluation import (
    LayerPatch,
    accuracy,
    generate_answers,
    generate_patched_answers,
    is_correct_by,
    sweep_accuracy,
)
from taskvec.function_vectors.protocol import find_function_vector
from taskvec.function_vectors.settings import (
    DEFAULT_EFFECT_PROMPTS,
    DEFAULT_MEAN_PROMPTS,
    DEFAULT_SHOTS,
    DEFAULT_TOP_HEADS,
    FunctionVectorSettings,
)
from taskvec.function_vectors.vector import FunctionVector, Head
from taskvec.intervals import Interval, bootstrap_interval
from taskvec.layer_choice import choose_on_validation, default_candidates, placement_text
from taskvec.models import ModelHandle
from taskvec.prompts import (
    DEFAULT_TEMPLATE,
    Modality,
    Prompt,
    QATemplate,
    TemplateName,
    as_template,
    build_query_prompt,
)
from taskvec.prompts.settings import PromptSettings
from taskvec.tasks import Task
from taskvec.vectors import extract_vector

MODALITIES: tuple[Modality, Modality] = ("text", "image")
VectorKind = Literal["function-vector", "task-vector"]
DEFAULT_SCALES = (1.0, 2.0, 4.0, 8.0)
RESIDUAL_SHOTS = 5  # the run's default shots for residual task vectors (RunConfig.shots)


@dataclass(frozen=True)
class Transfer:
    """One vector (from `source` demonstrations) applied to `target` queries.

    `layer` None: no candidate layer (at any scale) beat the bare validation queries, and the
    vector was not tested (`test_accuracy` and `interval` None)."""

    kind: VectorKind
    source: Modality
    target: Modality
    layer: int | None
    scale: float | None  # a function vector's, added; None for a replaced task vector
    validation_per_layer: list[float]  # at the chosen scale (the best one when no layer helped)
    unpatched_validation: float  # first-token accuracy of the bare validation queries
    test_accuracy: float | None
    interval: Interval | None
    test_items: int

    @property
    def name(self) -> str:
        return f"{'FV' if self.kind == 'function-vector' else 'TV'} {self.source} -> {self.target}"

    @property
    def placement(self) -> str:
        """How the choice reads: "layer 6", "layer 6 x4" or "no layer helped"."""
        return placement_text(self.layer, self.scale)


@dataclass(frozen=True)
class ModalityComparison:
    task: str
    k: int
    top_heads: dict[str, list[Head]]
    shared_heads: list[Head]
    effects: dict[str, list[list[float]]]  # modality -> [layer][head] mean indirect effect
    no_context: dict[str, float]  # target modality -> test accuracy of the bare query
    transfers: list[Transfer] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["transfers"] = [
            {"name": t.name, "placement": t.placement, **asdict(t)} for t in self.transfers
        ]
        return record


def compare_modalities(
    handle: ModelHandle,
    task: Task,
    *,
    k: int = DEFAULT_TOP_HEADS,
    shots: int = DEFAULT_SHOTS,
    mean_prompts: int = DEFAULT_MEAN_PROMPTS,
    effect_prompts: int = DEFAULT_EFFECT_PROMPTS,
    residual_shots: int = RESIDUAL_SHOTS,
    scales: Sequence[float] = DEFAULT_SCALES,
    seed: int = 0,
    style: str | None = None,
    template: QATemplate | TemplateName = DEFAULT_TEMPLATE,
    memory_budget: int | None = None,
    progress: bool = False,
) -> ModalityComparison:
    """Function vectors and residual task vectors of `task` from text and image ICL (validation
    demonstrations), each applied to text and image test queries (see the module docstring)."""
    if not scales:
        raise ValueError("at least one scale is needed")
    chosen = as_template(template)
    function_vectors: dict[Modality, FunctionVector] = {
        modality: find_function_vector(
            handle,
            task,
            f"{modality}-icl",
            settings=FunctionVectorSettings(shots, mean_prompts, effect_prompts, k),
            prompts=PromptSettings(seed=seed, style=style, template=chosen.name),
            memory_budget=memory_budget,
            progress=progress,
        )
        for modality in MODALITIES
    }
    residual: dict[Modality, torch.Tensor] = {
        modality: extract_vector(
            handle,
            task,
            f"{modality}-icl",
            settings=PromptSettings(shots=residual_shots, seed=seed, style=style, template=chosen.name),
        ).vector.vectors
        for modality in MODALITIES
    }

    def queries(split: str, modality: Modality) -> list[Prompt]:
        items = task.split(split)
        return [build_query_prompt(item, modality=modality, style=style, template=chosen) for item in items]

    validation_answers = [item.answers() for item in task.split("val")]
    test_answers = [item.answers() for item in task.split("test")]
    transfers: list[Transfer] = []
    no_context: dict[str, float] = {}
    for target in MODALITIES:
        validation, test = queries("val", target), queries("test", target)
        plain = generate_answers(handle, test, max_new_tokens=1)
        hits = [
            is_correct_by(text, answers, "prefix") for text, answers in zip(plain, test_answers, strict=True)
        ]
        no_context[target] = sum(hits) / len(hits)
        # Scored as the sweeps are: the first generated token, prefix match.
        unpatched = accuracy(generate_answers(handle, validation, max_new_tokens=1), validation_answers)
        for source in MODALITIES:
            fv = function_vectors[source].vector.expand(handle.num_layers, -1)
            fv_scales = {
                scale: sweep_accuracy(
                    handle,
                    validation,
                    validation_answers,
                    fv,
                    marker=chosen.marker,
                    memory_budget=memory_budget,
                    mode="add",
                    scale=scale,
                )
                for scale in scales
            }
            transfers.append(
                _transfer(
                    handle,
                    "function-vector",
                    source,
                    target,
                    fv,
                    fv_scales,
                    unpatched,
                    test,
                    test_answers,
                    chosen,
                )
            )
            tv = residual[source]
            tv_curve = sweep_accuracy(
                handle, validation, validation_answers, tv, marker=chosen.marker, memory_budget=memory_budget
            )
            transfers.append(
                _transfer(
                    handle,
                    "task-vector",
                    source,
                    target,
                    tv,
                    {1.0: tv_curve},
                    unpatched,
                    test,
                    test_answers,
                    chosen,
                )
            )
    text_heads, image_heads = (function_vectors[m].heads for m in MODALITIES)
    return ModalityComparison(
        task=task.name,
        k=k,
        top_heads={m: function_vectors[m].heads for m in MODALITIES},
        shared_heads=[head for head in text_heads if head in set(image_heads)],
        effects={m: function_vectors[m].effects.tolist() for m in MODALITIES},
        no_context=no_context,
        transfers=transfers,
    )


def _transfer(
    handle: ModelHandle,
    kind: VectorKind,
    source: Modality,
    target: Modality,
    vectors: torch.Tensor,
    per_scale: dict[float, list[float]],
    unpatched: float,
    test: list[Prompt],
    test_answers: Sequence[Sequence[str]],
    template: QATemplate,
) -> Transfer:
    """The (scale, layer) chosen on validation (`per_scale` {scale: accuracy per layer}) against the
    bare validation queries' `unpatched` accuracy, answered on test; untested when no layer helped."""
    added = kind == "function-vector"
    choice = choose_on_validation(
        {scale: {"validation": [curve]} for scale, curve in per_scale.items()},
        default_candidates(handle.num_layers),
        unpatched={"validation": unpatched},
        scaled=added,
    )
    layer = choice.chosen
    if layer is None:
        return Transfer(
            kind, source, target, None, None, choice.validation_mean, unpatched, None, None, len(test)
        )
    # A function vector is added to the residual; a task vector replaces it (the paper's patch).
    mode: PatchMode = "add" if added else "replace"
    patch = LayerPatch(vectors[layer], layer, mode=mode, scale=1.0 if choice.scale is None else choice.scale)
    answers = generate_patched_answers(handle, test, [patch], marker=template.marker)[0]
    hits = [
        is_correct_by(text, expected, "prefix")
        for text, expected in zip(answers.texts, test_answers, strict=True)
    ]
    return Transfer(
        kind,
        source,
        target,
        layer,
        choice.scale,
        choice.validation_mean,
        unpatched,
        sum(hits) / len(hits),
        bootstrap_interval({"task": [hits]}),
        len(hits),
    )
