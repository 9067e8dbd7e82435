"""VectorSpec: how a task is specified to make a task vector, one name used everywhere.

Extraction, the run's conditions, the analyses, vector files' metadata ("spec") and the command
line's `--spec` all take these values. The first three are read from prompts of one model; the others
are made from them: the base language model's text-ICL vector (LLM -> VLM), the mean of a subset
of text-ICL prompts (the ensemble curve's exemplar vector) and its mean with the instruction vector.
"""

from __future__ import annotations

from enum import StrEnum

from taskvec.prompts import Modality


class VectorSpec(StrEnum):
    TEXT_ICL = "text-icl"
    IMAGE_ICL = "image-icl"
    INSTRUCTION = "instruction"
    LLM_TEXT_ICL = "llm-text-icl"
    EXEMPLAR_SUBSET = "exemplar-subset"
    ENSEMBLE = "ensemble"

    @property
    def extractable(self) -> bool:
        """Read directly from prompts (`extract_vector`), not combined from other vectors."""
        return self in EXTRACTABLE_SPECS

    @property
    def demo_modality(self) -> Modality | None:
        """The modality of the demonstrations the vector is read from (None: an instruction)."""
        if self is VectorSpec.IMAGE_ICL:
            return "image"
        return None if self is VectorSpec.INSTRUCTION else "text"

    @property
    def uses_instruction(self) -> bool:
        return self in (VectorSpec.INSTRUCTION, VectorSpec.ENSEMBLE)

    @property
    def from_base_lm(self) -> bool:
        return self is VectorSpec.LLM_TEXT_ICL

    @property
    def source(self) -> VectorSpec:
        """The extractable spec this vector is made from (itself when extractable)."""
        if self.extractable:
            return self
        return VectorSpec.TEXT_ICL

    @property
    def label(self) -> str:
        return SPEC_TITLES[self]


EXTRACTABLE_SPECS: tuple[VectorSpec, ...] = (
    VectorSpec.TEXT_ICL,
    VectorSpec.IMAGE_ICL,
    VectorSpec.INSTRUCTION,
)

SPEC_TITLES: dict[VectorSpec, str] = {
    VectorSpec.TEXT_ICL: "text ICL",
    VectorSpec.IMAGE_ICL: "image ICL",
    VectorSpec.INSTRUCTION: "instruction",
    VectorSpec.LLM_TEXT_ICL: "base-LM text ICL",
    VectorSpec.EXEMPLAR_SUBSET: "exemplar subset",
    VectorSpec.ENSEMBLE: "exemplar + instruction ensemble",
}


def parse_spec(value: str) -> VectorSpec:
    """A VectorSpec from its name, with an error that lists the names."""
    try:
        return VectorSpec(value)
    except ValueError:
        names = ", ".join(spec.value for spec in VectorSpec)
        raise ValueError(f"unknown vector spec {value!r}; use one of {names}") from None
