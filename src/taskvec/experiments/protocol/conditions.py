"""The paper's conditions as data: what is in the context, what is patched, what is asked, where it is shown.

A list instead of one function per condition: the runner treats every condition alike, a condition
the model cannot run (image input on a text-only model, several images on a one-image model, vectors
of a base LM that is missing or differently shaped) is skipped with a note, and the tables, the CSV
and the report place a condition by its `tables` slots, never by its name. A run takes its list
(`run_experiments(..., conditions=...)`); the default is `paper_conditions(config)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from taskvec.experiments.config import RunConfig
from taskvec.experiments.protocol.recipes import (
    IMAGE_ICL as IMAGE_ICL_VECTOR,
)
from taskvec.experiments.protocol.recipes import (
    INSTRUCTION,
    LLM_TEXT_ICL,
    TEXT_ICL,
    Ensemble,
    ExemplarSubset,
    FunctionVector,
    ModelRole,
    VectorRecipe,
)
from taskvec.models import ModelHandle
from taskvec.prompts import Modality
from taskvec.tasks import Task
from taskvec.vectors import VectorSpec


@dataclass(frozen=True)
class TableSlot:
    """A place of a condition in a result table: the table's id and the column (or curve series)."""

    table: str
    column: str
    x: int | None = None  # a curve's x value (the ensemble curve's number of examples)


@dataclass(frozen=True)
class Condition:
    name: str
    label: str  # what the tables and the report call it
    query: Modality  # the modality of the test query
    demos: Modality | None = None  # in-context demonstrations before the query, if any
    vector: VectorRecipe | None = None  # patched at the query's answer marker if set
    instruction_prompt: bool = False  # the instruction is written before the query
    examples: int | None = None  # ensemble curve: demonstrations behind the exemplar vector
    seeded: bool = False  # depends on the sampled demonstrations, so it is run once per seed
    # On a text-only model the condition still runs, asking text queries instead of images.
    text_fallback: bool = False
    tables: tuple[TableSlot, ...] = ()
    # The analyses use the layer chosen for the run's patched condition of lowest rank.
    analysis_layer_rank: int | None = None

    @property
    def patched(self) -> bool:
        return self.vector is not None

    @property
    def needs_images(self) -> bool:
        vector_images = self.vector is not None and self.vector.needs().images
        return self.query == "image" or self.demos == "image" or vector_images

    @property
    def needs_several_images(self) -> bool:
        return self.demos == "image" or (self.vector is not None and self.vector.needs().several_images)

    @property
    def uses_instruction(self) -> bool:
        return self.instruction_prompt or (self.vector is not None and self.vector.needs().instruction)

    @property
    def model_role(self) -> ModelRole:
        """Which model's vectors the condition patches (the results' "model" field)."""
        return self.vector.role if self.vector is not None else "vlm"

    @property
    def ignores_case(self) -> bool:
        """The ensemble curve is scored as the reference scores its ensembling runs (lower case allowed)."""
        return self.examples is not None

    def seeds(self, config: RunConfig) -> list[int | None]:
        """The seeds the condition is tested on (None: it samples nothing)."""
        if self.vector is not None and self.seeded:
            return list(self.vector.seeds(config))
        return list(config.seeds) if self.seeded else [None]


def _paper(column: str) -> TableSlot:
    return TableSlot("paper", column)


def _direction(column: str) -> TableSlot:
    return TableSlot("directions", column)


def _beside_function_vector(direction: str) -> TableSlot:
    return TableSlot("function_vectors", f"TV {direction}")


NO_CONTEXT = Condition("no-context", "no context (image query)", "image", tables=(_paper("no-context"),))
NO_CONTEXT_TEXT = Condition("no-context-text", "no context (text query)", "text")
IMAGE_ICL = Condition(
    "image-icl", "image ICL", "image", demos="image", seeded=True, tables=(_paper("image-icl"),)
)
TEXT_ICL_CONDITION = Condition("text-icl", "text ICL (text query)", "text", demos="text", seeded=True)
TEXT_ICL_XBASE = Condition(
    "text-icl-xbase",
    "text examples + image query (xBase)",
    "image",
    demos="text",
    seeded=True,
    tables=(_paper("text-icl-xbase"),),
)


def _patched(
    name: str, vector: VectorRecipe, query: Modality, tables: tuple[TableSlot, ...], rank: int | None = None
) -> Condition:
    label = f"{vector.label} vector -> {query} query"
    return Condition(name, label, query, vector=vector, seeded=True, tables=tables, analysis_layer_rank=rank)


IMAGE_TO_IMAGE = _patched(
    "image->image",
    IMAGE_ICL_VECTOR,
    "image",
    (_paper("image-icl-patch"), _direction("image->image"), _beside_function_vector("image->image")),
    3,
)
TEXT_TO_IMAGE = _patched(
    "text->image",
    TEXT_ICL,
    "image",
    (
        _paper("text-icl-xpatch"),
        _direction("text->image"),
        TableSlot("llm_to_vlm", "vlm_vectors"),
        _beside_function_vector("text->image"),
    ),
    1,
)
TEXT_TO_TEXT = _patched(
    "text->text",
    TEXT_ICL,
    "text",
    (_direction("text->text"), _beside_function_vector("text->text")),
    2,
)
IMAGE_TO_TEXT = _patched("image->text", IMAGE_ICL_VECTOR, "text", (_direction("image->text"),))
LLM_TO_VLM = _patched(
    "llm-xpatch",
    LLM_TEXT_ICL,
    "image",
    (TableSlot("llm_to_vlm", "llm_vectors"), _beside_function_vector("llm->image")),
    4,
)


def _function_vector(direction: str, vector: FunctionVector, query: Modality) -> Condition:
    """The function vector of `vector`'s demonstrations added to `query` queries; its table column
    sits beside the residual task vector's of the same direction (`_beside_function_vector`)."""
    label = f"{vector.label} function vector -> {query} query"
    slots = (TableSlot("function_vectors", f"FV {direction}"),)
    return Condition(f"fv-{direction}", label, query, vector=vector, seeded=True, tables=slots)


FV_TEXT_TO_IMAGE = _function_vector("text->image", FunctionVector(VectorSpec.TEXT_ICL), "image")
FV_TEXT_TO_TEXT = _function_vector("text->text", FunctionVector(VectorSpec.TEXT_ICL), "text")
FV_IMAGE_TO_IMAGE = _function_vector("image->image", FunctionVector(VectorSpec.IMAGE_ICL), "image")
FV_LLM_TO_VLM = _function_vector("llm->image", FunctionVector(VectorSpec.TEXT_ICL, role="llm"), "image")

INSTRUCTION_PATCH = Condition(
    "instruction-patch",
    "instruction vector patched",
    "image",
    vector=INSTRUCTION,
    text_fallback=True,
    tables=(TableSlot("instruction", "instruction-patch"),),
)
INSTRUCTION_PROMPT = Condition(
    "instruction-prompt",
    "instruction written before the query",
    "image",
    instruction_prompt=True,
    text_fallback=True,
    tables=(TableSlot("instruction", "instruction-prompt"),),
)

# The paper's conditions, in the order the run plans them (then the ensemble curve of the options).
PAPER_CONDITIONS: tuple[Condition, ...] = (
    NO_CONTEXT,
    NO_CONTEXT_TEXT,
    IMAGE_ICL,
    TEXT_ICL_CONDITION,
    TEXT_ICL_XBASE,
    IMAGE_TO_IMAGE,
    TEXT_TO_IMAGE,
    TEXT_TO_TEXT,
    IMAGE_TO_TEXT,
    LLM_TO_VLM,
    FV_TEXT_TO_IMAGE,
    FV_TEXT_TO_TEXT,
    FV_IMAGE_TO_IMAGE,
    FV_LLM_TO_VLM,
    INSTRUCTION_PATCH,
    INSTRUCTION_PROMPT,
)


def with_condition(conditions: Sequence[Condition], condition: Condition) -> list[Condition]:
    """`conditions` with `condition` added, or in place of the condition of the same name."""
    names = [existing.name for existing in conditions]
    if condition.name in names:
        listed = list(conditions)
        listed[names.index(condition.name)] = condition
        return listed
    return [*conditions, condition]


def _curve_point(name: str, label: str, n: int, vector: VectorRecipe | None, series: str) -> Condition:
    return Condition(
        name,
        label,
        "image",
        vector=vector,
        examples=n,
        seeded=vector is not None and n > 0,
        text_fallback=True,
        tables=(TableSlot("ensemble", series, n),),
    )


def ensemble_conditions(counts: Sequence[int]) -> list[Condition]:
    """The curve: exemplar-only vs (exemplar + instruction) / 2 for each number of examples.

    n=0 has no exemplar: the ensemble is the instruction vector alone and exemplar-only is the
    unpatched query (what the curve starts from).
    """
    conditions = []
    for n in counts:
        if n == 0:
            conditions.append(_curve_point("exemplar-0", "no vector (n=0)", 0, None, "exemplar"))
            conditions.append(
                _curve_point("ensemble-0", "instruction vector alone (n=0)", 0, INSTRUCTION, "ensemble")
            )
            continue
        conditions.append(
            _curve_point(
                f"exemplar-{n}", f"exemplar vector of {n} examples", n, ExemplarSubset(n), "exemplar"
            )
        )
        conditions.append(
            _curve_point(f"ensemble-{n}", f"(exemplar of {n} + instruction) / 2", n, Ensemble(n), "ensemble")
        )
    return conditions


def paper_conditions(config: RunConfig) -> list[Condition]:
    """The paper's conditions and the ensemble curve at the configured numbers of examples."""
    return [*PAPER_CONDITIONS, *ensemble_conditions(config.ensemble_examples)]


def plan_conditions(
    handle: ModelHandle,
    tasks: list[Task],
    config: RunConfig,
    llm: ModelHandle | None,
    conditions: Sequence[Condition] | None = None,
) -> tuple[list[Condition], list[str]]:
    """The conditions of `conditions` (default: `paper_conditions(config)`) this model can run, and a
    note for each group it cannot."""
    conditions = paper_conditions(config) if conditions is None else list(conditions)
    names = [condition.name for condition in conditions]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"conditions repeat a name: {', '.join(repeated)} (use with_condition to replace one)"
        )
    notes: list[str] = []
    architecture = handle.architecture
    images_ok = architecture.is_vision_language
    if not images_ok:
        notes.append(f"{handle.name} is a text-only model: image conditions skipped")
    missing = [task.name for task in tasks if not task.styles()]
    if images_ok and missing:
        images_ok = False
        notes.append(
            f"tasks without an image for every item ({', '.join(missing)}): image conditions skipped"
        )
    several_ok = images_ok and architecture.multi_image
    if images_ok and not several_ok:
        notes.append(f"{architecture.family} takes one image per prompt: image-ICL conditions skipped")
    llm_ok = llm is not None and images_ok
    if llm is not None and images_ok:
        if (llm.num_layers, llm.hidden_size) != (handle.num_layers, handle.hidden_size):
            llm_ok = False
            notes.append(
                f"base LM {llm.name} has {llm.num_layers} layers x {llm.hidden_size}, the model "
                f"{handle.num_layers} x {handle.hidden_size}: base-LM vector conditions skipped"
            )
    elif llm is None and images_ok:
        notes.append("no base LM given: base-LM vector conditions skipped")
    instructions_ok = all(task.instruction for task in tasks)
    if not instructions_ok:
        notes.append("a task has no instruction: instruction and ensemble conditions skipped")
    planned = []
    for condition in conditions:
        if not images_ok and condition.text_fallback and condition.query == "image":
            condition = replace(condition, query="text")
        if condition.needs_images and not images_ok:
            continue
        if condition.needs_several_images and not several_ok:
            continue
        if condition.model_role == "llm" and not llm_ok:
            continue
        if condition.uses_instruction and not instructions_ok:
            continue
        if condition.vector is not None and not condition.vector.enabled(config):
            continue
        planned.append(condition)
    recipes = {c.vector.id: c.vector for c in planned if c.vector is not None}
    for recipe in recipes.values():
        note = recipe.plan_note(handle, config)
        if note is not None and note not in notes:
            notes.append(note)
    return planned, notes
