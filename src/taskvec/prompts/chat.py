"""Chat templates: the whole QA text of a prompt as one user turn, then the start of the reply.

Instruction-tuned models expect their own chat template. Under `template="chat"` a prompt's text
(demonstrations and query, in the paper's `Q:{x}\\nA:{y}` format, images as IMAGE_PLACEHOLDER) is
rendered as the content of a single user message with `add_generation_prompt=True`, so the model's
end-of-turn and assistant header follow the query's `A:`. The wrapping is done on the text, before
tokenising: the handle then turns placeholders into the model's image tokens as it does for plain
prompts, so images stay exactly where the QA text puts them, and tokenizer-only models work too.
"""

from __future__ import annotations

from typing import Any

from taskvec.models.handle import ModelHandle

# Stands for the user's text while the template renders: the template may iterate or filter its
# content, and nothing it does to this text can touch the prompt's own characters.
_CONTENT_SENTINEL = "TASKVEC_USER_TURN_CONTENT"


class MissingChatTemplateError(ValueError):
    """template='chat' was asked of a model whose processor and tokenizer carry no chat template."""


def chat_template_of(handle: ModelHandle) -> str:
    """The model's chat template: the processor's (VLMs keep theirs there), else the tokenizer's."""
    for owner in (handle.processor, handle.tokenizer):
        template = getattr(owner, "chat_template", None)
        if isinstance(template, dict):  # named templates (tool use...): the default one
            template = template.get("default")
        if isinstance(template, str) and template:
            return template
    raise MissingChatTemplateError(f"{handle.name} has no chat template; use template='qa'")


def has_chat_template(handle: ModelHandle) -> bool:
    try:
        chat_template_of(handle)
    except MissingChatTemplateError:
        return False
    return True


def _render(tokenizer: Any, template: str, content: Any) -> str | None:
    """The template rendered around `content`, or None when it does not take content in that form."""
    messages = [{"role": "user", "content": content}]
    try:
        rendered = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception:  # a template that indexes its content as the other form fails in Jinja
        return None
    if not isinstance(rendered, str) or rendered.count(_CONTENT_SENTINEL) != 1:
        return None
    return rendered


def _adds_bos(tokenizer: Any) -> bool:
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    return list(tokenizer("Q", add_special_tokens=True)["input_ids"][:1]) == [bos_id]


def user_turn_frame(handle: ModelHandle) -> tuple[str, str]:
    """The rendered text before and after a single user turn's content (the assistant header last).

    Templates take the content as a string (text LMs) or as a list of typed parts (most VLM
    processors); the string form is tried first because a string-only template renders a list as
    its Python repr. A leading bos the tokenizer adds by itself is dropped from the frame, so the
    tokenised prompt starts with one bos, not two.
    """
    template = chat_template_of(handle)
    tokenizer = handle.tokenizer
    rendered = _render(tokenizer, template, _CONTENT_SENTINEL)
    if rendered is None:
        rendered = _render(tokenizer, template, [{"type": "text", "text": _CONTENT_SENTINEL}])
    if rendered is None:
        raise MissingChatTemplateError(
            f"{handle.name}'s chat template does not render a user turn of text; use template='qa'"
        )
    before, after = rendered.split(_CONTENT_SENTINEL)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and before.startswith(bos) and _adds_bos(tokenizer):
        before = before[len(bos) :]
    return before, after


def render_user_turn(handle: ModelHandle, text: str) -> str:
    """`text` as the one user turn of the model's chat template, ending with the assistant header."""
    before, after = user_turn_frame(handle)
    return before + text + after
