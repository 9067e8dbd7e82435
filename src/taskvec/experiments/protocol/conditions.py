"""The paper's conditions as data: what is in the context, what is patched, what is asked, where it is shown.

One registry instead of one function per condition: the runner treats every condition alike, a
condition the model cannot run (image input on a text-only model, several images on a one-image
model, vectors of a base LM that is missing or differently shaped) is skipped with a note, and the
tables, the CSV and the report place a condition by its `tables` slots, never by its name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from taskvec.experiments.config import RunConfig
from taskvec.models import ModelHandle
from taskvec.prompts import Modality
from taskvec.tasks import Task
from taskvec.vectors import VectorSpec

ModelRole = Literal["vlm", "llm"]


def heads_used(handle: ModelHandle, k: int) -> int:
    """The run's top-k, or every head of a model that has fewer (a tiny test model)."""
    return min(k, handle.num_layers * int(handle.text_config.num_attention_heads))


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
    vector: VectorSpec | None = None  # patched at the query's answer marker if set
    instruction_prompt: bool = False  # the instruction is written before the query
    examples: int | None = None  # ensemble curve: demonstrations behind the exemplar vector
    seeded: bool = False  # depends on the sampled demonstrations, so it is run once per seed
    # On a text-only model the condition still runs, asking text queries instead of images.
    text_fallback: bool = False
    tables: tuple[TableSlot, ...] = ()
    # The analyses use the layer chosen for the run's patched condition of lowest rank.
    analysis_layer_rank: int | None = None
    # Patches the function vector of `vector`'s demonstrations (its top heads' mean outputs, added
    # at a layer and scale chosen on validation) instead of their residual task vector.
    function_vector: bool = False

    @property
    def patched(self) -> bool:
        return self.vector is not None

    @property
    def needs_images(self) -> bool:
        return self.query == "image" or self.demos == "image" or self.vector == VectorSpec.IMAGE_ICL

    @property
    def needs_several_images(self) -> bool:
        return self.demos == "image" or self.vector == VectorSpec.IMAGE_ICL

    @property
    def uses_instruction(self) -> bool:
        return self.instruction_prompt or (self.vector is not None and self.vector.uses_instruction)

    @property
    def model_role(self) -> ModelRole:
        """Which model's vectors the condition patches (the results' "model" field)."""
        return "llm" if self.vector is not None and self.vector.from_base_lm else "vlm"

    @property
    def ignores_case(self) -> bool:
        """The ensemble curve is scored as the reference scores its ensembling runs (lower case allowed)."""
        return self.examples is not None


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
TEXT_ICL = Condition("text-icl", "text ICL (text query)", "text", demos="text", seeded=True)
TEXT_ICL_XBASE = Condition(
    "text-icl-xbase",
    "text examples + image query (xBase)",
    "image",
    demos="text",
    seeded=True,
    tables=(_paper("text-icl-xbase"),),
)


def _patched(
    name: str, vector: VectorSpec, query: Modality, tables: tuple[TableSlot, ...], rank: int | None = None
) -> Condition:
    label = f"{vector.label} vector -> {query} query"
    return Condition(name, label, query, vector=vector, seeded=True, tables=tables, analysis_layer_rank=rank)


IMAGE_TO_IMAGE = _patched(
    "image->image",
    VectorSpec.IMAGE_ICL,
    "image",
    (_paper("image-icl-patch"), _direction("image->image"), _beside_function_vector("image->image")),
    3,
)
TEXT_TO_IMAGE = _patched(
    "text->image",
    VectorSpec.TEXT_ICL,
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
    VectorSpec.TEXT_ICL,
    "text",
    (_direction("text->text"), _beside_function_vector("text->text")),
    2,
)
IMAGE_TO_TEXT = _patched("image->text", VectorSpec.IMAGE_ICL, "text", (_direction("image->text"),))
LLM_TO_VLM = _patched(
    "llm-xpatch",
    VectorSpec.LLM_TEXT_ICL,
    "image",
    (TableSlot("llm_to_vlm", "llm_vectors"), _beside_function_vector("llm->image")),
    4,
)


def _function_vector(direction: str, vector: VectorSpec, query: Modality) -> Condition:
    """The function vector of `vector`'s demonstrations added to `query` queries; its table column
    sits beside the residual task vector's of the same direction (`_beside_function_vector`)."""
    label = f"{vector.label} function vector -> {query} query"
    slots = (TableSlot("function_vectors", f"FV {direction}"),)
    return Condition(
        f"fv-{direction}", label, query, vector=vector, seeded=True, tables=slots, function_vector=True
    )


FV_TEXT_TO_IMAGE = _function_vector("text->image", VectorSpec.TEXT_ICL, "image")
FV_TEXT_TO_TEXT = _function_vector("text->text", VectorSpec.TEXT_ICL, "text")
FV_IMAGE_TO_IMAGE = _function_vector("image->image", VectorSpec.IMAGE_ICL, "image")
FV_LLM_TO_VLM = _function_vector("llm->image", VectorSpec.LLM_TEXT_ICL, "image")

INSTRUCTION_PATCH = Condition(
    "instruction-patch",
    "instruction vector patched",
    "image",
    vector=VectorSpec.INSTRUCTION,
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

# The registry: the run plans these in order (then the ensemble curve, built from the options).
CONDITIONS: list[Condition] = [
    NO_CONTEXT,
    NO_CONTEXT_TEXT,
    IMAGE_ICL,
    TEXT_ICL,
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
]


def register_condition(condition: Condition) -> Condition:
    """Add a condition to every later run (its name must be new)."""
    if any(existing.name == condition.name for existing in CONDITIONS):
        raise ValueError(f"a condition named {condition.name!r} is already registered")
    CONDITIONS.append(condition)
    return condition


def unregister_condition(name: str) -> None:
    CONDITIONS[:] = [condition for condition in CONDITIONS if condition.name != name]


def _curve_point(name: str, label: str, n: int, vector: VectorSpec | None, series: str) -> Condition:
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


def ensemble_conditions(counts: tuple[int, ...]) -> list[Condition]:
    """The curve: exemplar-only vs (exemplar + instruction) / 2 for each number of examples.

    n=0 has no exemplar: the ensemble is the instruction vector alone and exemplar-only is the
    unpatched query (what the curve starts from).
    """
    conditions = []
    for n in counts:
        if n == 0:
            conditions.append(_curve_point("exemplar-0", "no vector (n=0)", 0, None, "exemplar"))
            conditions.append(
                _curve_point(
                    "ensemble-0", "instruction vector alone (n=0)", 0, VectorSpec.INSTRUCTION, "ensemble"
                )
            )
            continue
        conditions.append(
            _curve_point(
                f"exemplar-{n}", f"exemplar vector of {n} examples", n, VectorSpec.EXEMPLAR_SUBSET, "exemplar"
            )
        )
        conditions.append(
            _curve_point(
                f"ensemble-{n}", f"(exemplar of {n} + instruction) / 2", n, VectorSpec.ENSEMBLE, "ensemble"
            )
        )
    return conditions


def plan_conditions(
    handle: ModelHandle, tasks: list[Task], config: RunConfig, llm: ModelHandle | None
) -> tuple[list[Condition], list[str]]:
    """The conditions this model can run, and a note for each group it cannot."""
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
    heads = heads_used(handle, config.fv_heads)
    if config.function_vectors and heads < config.fv_heads:
        notes.append(f"{handle.name} has {heads} attention heads: function vectors sum all of them")
    instructions_ok = all(task.instruction for task in tasks)
    if not instructions_ok:
        notes.append("a task has no instruction: instruction and ensemble conditions skipped")
    planned = []
    for condition in [*CONDITIONS, *ensemble_conditions(config.ensemble_examples)]:
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
        if condition.function_vector and not config.function_vectors:
            continue
        planned.append(condition)
    return planned, notes
