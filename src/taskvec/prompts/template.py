"""The paper's prompt format: `Q:{x}\\nA:{y}\\n\\n` per example, optionally in a chat template.

An image input is written as the image placeholder, so `Q:<image>\\nA:` asks about an image; the
model handle turns the placeholder into the model's own image tokens. Under the "chat" template the
same text becomes one user turn of the model's own chat template when it is encoded (see chat.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from PIL import Image

from taskvec.models.handle import IMAGE_PLACEHOLDER, ModelHandle
from taskvec.prompts.chat import user_turn_frame
from taskvec.tasks import Item
from taskvec.tasks.images import read_rgb

Modality = Literal["text", "image"]
# "qa": the paper's plain text; "chat": that text as one user turn of the model's chat template.
TemplateName = Literal["qa", "chat"]
TEMPLATE_NAMES: tuple[TemplateName, ...] = ("qa", "chat")
TEMPLATE_HELP = (
    "prompt format: qa (the paper's Q:/A: text) or chat (that text as one user turn of the model's "
    "chat template; vectors are still read at the last demonstration's A: and patched at the query's)"
)


@dataclass(frozen=True)
class QATemplate:
    query: str = "Q:{input}\nA:"
    answer: str = "{output}\n\n"
    # Task vectors are read, and patched, at the last token of this marker.
    marker: str = "A:"
    # Wrap the whole text in one user turn of the model's chat template when it is encoded.
    chat: bool = False

    @property
    def name(self) -> TemplateName:
        return "chat" if self.chat else "qa"

    def cache_key(self) -> list[str]:
        """What a cached step built from these prompts depends on (qa keys are the same as ever)."""
        return [self.query, self.answer, self.marker, *(["chat"] if self.chat else [])]

    def demonstration(self, input_text: str, output: str) -> str:
        return self.query.format(input=input_text) + self.answer.format(output=output)


DEFAULT_TEMPLATE = QATemplate()
CHAT_TEMPLATE = QATemplate(chat=True)


def as_template(template: QATemplate | TemplateName) -> QATemplate:
    """A template given by name ("qa", "chat") or as itself."""
    if isinstance(template, QATemplate):
        return template
    if template not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {template!r}; use one of {', '.join(TEMPLATE_NAMES)}")
    return CHAT_TEMPLATE if template == "chat" else DEFAULT_TEMPLATE


@dataclass(frozen=True)
class Prompt:
    """A prompt's QA text and its images; `chat`: encoded as one user turn of the chat template."""

    text: str
    images: tuple[Image.Image, ...] = field(default=())
    chat: bool = False


def _input_of(item: Item, modality: Modality, style: str | None) -> tuple[str, tuple[Image.Image, ...]]:
    if modality == "text":
        return item.input, ()
    return IMAGE_PLACEHOLDER, (read_rgb(item.image(style)),)


def build_icl_prompt(
    demonstrations: Sequence[Item],
    query: Item,
    *,
    demo_modality: Modality = "text",
    query_modality: Modality = "text",
    style: str | None = None,
    template: QATemplate | TemplateName = DEFAULT_TEMPLATE,
) -> Prompt:
    """Demonstrations followed by the query, each input as text or as its image in `style`."""
    template = as_template(template)
    text, images = "", list[Image.Image]()
    for item in demonstrations:
        demo_input, demo_images = _input_of(item, demo_modality, style)
        text += template.demonstration(demo_input, item.output)
        images.extend(demo_images)
    query_input, query_images = _input_of(query, query_modality, style)
    images.extend(query_images)
    return Prompt(text + template.query.format(input=query_input), tuple(images), chat=template.chat)


def build_query_prompt(
    query: Item,
    *,
    modality: Modality = "text",
    style: str | None = None,
    template: QATemplate | TemplateName = DEFAULT_TEMPLATE,
) -> Prompt:
    """The query alone (the no-context baseline, and the target of patching)."""
    return build_icl_prompt([], query, query_modality=modality, style=style, template=template)


def with_template(prompt: Prompt, template: QATemplate | TemplateName) -> Prompt:
    """The same text and images, encoded under `template` ("qa" or "chat")."""
    return replace(prompt, chat=as_template(template).chat)


def model_texts(handle: ModelHandle, prompts: Sequence[Prompt]) -> list[str]:
    """What the model's tokenizer is given: chat prompts inside the model's chat template."""
    if not any(prompt.chat for prompt in prompts):
        return [prompt.text for prompt in prompts]
    before, after = user_turn_frame(handle)
    return [before + prompt.text + after if prompt.chat else prompt.text for prompt in prompts]


def encode_prompts(handle: ModelHandle, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
    """A left-padded batch of prompts (with their images, if any) through the model's processor."""
    images = [list(prompt.images) for prompt in prompts] if any(p.images for p in prompts) else None
    return handle.build_inputs(model_texts(handle, prompts), images)
