"""Prompt templates and where their answer marker is."""

from taskvec.prompts.template import (
    DEFAULT_TEMPLATE,
    Modality,
    Prompt,
    QATemplate,
    build_icl_prompt,
    build_query_prompt,
    encode_prompts,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "Modality",
    "Prompt",
    "QATemplate",
    "build_icl_prompt",
    "build_query_prompt",
    "encode_prompts",
]
