"""The paper's conditions as data: what is in the context, what is patched, what is asked.

One table instead of one function per condition, so the runner treats every condition alike and a
condition the model cannot run (image input on a text-only model, several images on a one-image
model, vectors of a base LM that is missing or differently shaped) is skipped with a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from taskvec.experiments.config import RunConfig
from taskvec.models import ModelHandle
from taskvec.prompts import Modality
from taskvec.tasks import Task

# Where a patched vector comes from: the run model's (vlm) or base LM's (llm) vectors, or the
# ensemble curve's subset ("exemplar") and mean-with-instruction ("ensemble") vectors.
VectorSource = Literal["text-icl", "image-icl", "llm-text-icl", "instruction", "exemplar", "ensemble"]


@dataclass(frozen=True)
class Condition:
    name: str
    query: Modality  # the modality of the test query
    demos: Modality | None = None  # in-context demonstrations before the query, if any
    vector: VectorSource | None = None  # patched at the query's last ':' if set
    instruction_prompt: bool = False  # the instruction is written before the query
    examples: int | None = None  # ensemble curve: demonstrations behind the exemplar vector
    seeded: bool = False  # depends on the sampled demonstrations, so it is run once per seed

    @property
    def patched(self) -> bool:
        return self.vector is not None

    @property
    def needs_images(self) -> bool:
        return self.query == "image" or self.demos == "image" or self.vector == "image-icl"

    @property
    def needs_several_images(self) -> bool:
        return self.demos == "image" or self.vector == "image-icl"

    @property
    def model_role(self) -> Literal["vlm", "llm"]:
        """Which model's vectors the condition patches (results.json's "model" field)."""
        return "llm" if self.vector == "llm-text-icl" else "vlm"


def core_conditions(query: Modality) -> list[Condition]:
    """Baselines, xPatch and the four directions; `query` is the modality of cross-modal queries."""
    return [
        Condition("no-context", "image"),
        Condition("no-context-text", "text"),
        Condition("image-icl", "image", demos="image", seeded=True),
        Condition("text-icl", "text", demos="text", seeded=True),
        Condition("text-icl-xbase", "image", demos="text", seeded=True),
        Condition("image-icl-patch", "image", vector="image-icl", seeded=True),
        Condition("text-icl-xpatch", "image", vector="text-icl", seeded=True),
        Condition("text->text", "text", vector="text-icl", seeded=True),
        Condition("image->text", "text", vector="image-icl", seeded=True),
        Condition("llm-xpatch", "image", vector="llm-text-icl", seeded=True),
        Condition("instruction-patch", query, vector="instruction"),
        Condition("instruction-prompt", query, instruction_prompt=True),
    ]


def ensemble_conditions(counts: tuple[int, ...], query: Modality) -> list[Condition]:
    """The curve: exemplar-only vs (exemplar + instruction) / 2 for each number of examples.

    n=0 has no exemplar: the ensemble is the instruction vector alone and exemplar-only is the
    unpatched query (what the curve starts from).
    """
    conditions = []
    for n in counts:
        if n == 0:
            conditions.append(Condition("exemplar-0", query, examples=0))
            conditions.append(Condition("ensemble-0", query, vector="instruction", examples=0))
        else:
            conditions.append(Condition(f"exemplar-{n}", query, vector="exemplar", examples=n, seeded=True))
            conditions.append(Condition(f"ensemble-{n}", query, vector="ensemble", examples=n, seeded=True))
    return conditions


def plan_conditions(
    handle: ModelHandle, tasks: list[Task], config: RunConfig, llm: ModelHandle | None
) -> tuple[list[Condition], list[str]]:
    """The conditions this model can run, and a note for each group it cannot."""
    notes: list[str] = []
    images_ok = handle.architecture.is_vision_language
    if not images_ok:
        notes.append(f"{handle.name} is a text-only model: image conditions skipped")
    missing = [task.name for task in tasks if not task.styles()]
    if images_ok and missing:
        images_ok = False
        notes.append(
            f"tasks without an image for every item ({', '.join(missing)}): image conditions skipped"
        )
    several_ok = images_ok and handle.architecture.multi_image
    if images_ok and not several_ok:
        notes.append(f"{handle.architecture.family} takes one image per prompt: image-ICL conditions skipped")
    llm_ok = llm is not None and images_ok
    if llm is not None and images_ok:
        if (llm.num_layers, llm.hidden_size) != (handle.num_layers, handle.hidden_size):
            llm_ok = False
            notes.append(
                f"base LM {llm.name} has {llm.num_layers} layers x {llm.hidden_size}, the model "
                f"{handle.num_layers} x {handle.hidden_size}: llm-xpatch skipped"
            )
    elif llm is None and images_ok:
        notes.append("no base LM given: llm-xpatch skipped")
    if any(not task.instruction for task in tasks):
        notes.append("a task has no instruction: instruction and ensemble conditions skipped")
    cross_query: Modality = "image" if images_ok else "text"
    planned = []
    for condition in core_conditions(cross_query) + ensemble_conditions(
        config.ensemble_examples, cross_query
    ):
        if condition.needs_images and not images_ok:
            continue
        if condition.needs_several_images and not several_ok:
            continue
        if condition.vector == "llm-text-icl" and not llm_ok:
            continue
        uses_instruction = condition.instruction_prompt or condition.vector in ("instruction", "ensemble")
        if uses_instruction and any(not task.instruction for task in tasks):
            continue
        planned.append(condition)
    return planned, notes
