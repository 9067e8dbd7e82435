"""Prompt templates (the paper's Q:/A: text, optionally in the model's chat template) and where their
answer marker is."""

from taskvec.prompts.chat import (
    MissingChatTemplateError,
    chat_template_of,
    has_chat_template,
    render_user_turn,
    user_turn_frame,
)
from taskvec.prompts.columns import marker_columns, query_marker_columns, text_end_columns
from taskvec.prompts.template import (
    CHAT_TEMPLATE,
    DEFAULT_TEMPLATE,
    TEMPLATE_HELP,
    TEMPLATE_NAMES,
    Modality,
    Prompt,
    QATemplate,
    TemplateName,
    as_template,
    build_icl_prompt,
    build_query_prompt,
    encode_prompts,
    model_texts,
    with_template,
)

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_TEMPLATE",
    "TEMPLATE_HELP",
    "TEMPLATE_NAMES",
    "MissingChatTemplateError",
    "Modality",
    "Prompt",
    "QATemplate",
    "TemplateName",
    "as_template",
    "build_icl_prompt",
    "build_query_prompt",
    "chat_template_of",
    "encode_prompts",
    "has_chat_template",
    "marker_columns",
    "model_texts",
    "query_marker_columns",
    "render_user_turn",
    "text_end_columns",
    "user_turn_frame",
    "with_template",
]
