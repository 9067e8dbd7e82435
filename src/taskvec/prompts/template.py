"""The paper's prompt format: `Q:{x}\\nA:{y}\\n\\n` per example, no chat template.

An image input is written as the image placeholder, so `Q:<image>\\nA:` asks about an image; the
model handle turns the placeholder into the model's own image tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image

from taskvec.models.handle import IMAGE_PLACEHOLDER, ModelHandle
from taskvec.tasks import Item

Modality = Literal["text", "image"]


@dataclass(frozen=True)
class QATemplate:
    query: str = "Q:{input}\nA:"
    answer: str = "{output}\n\n"
    # Task vectors are read, and patched, at the last token of this marker.
    marker: str = "A:"

    def demonstration(self, input_text: str, output: str) -> str:
        return self.query.format(input=input_text) + self.answer.format(output=output)


DEFAULT_TEMPLATE = QATemplate()


@dataclass(frozen=True)
class Prompt:
    text: str
    images: tuple[Image.Image, ...] = field(default=())


def _input_of(item: Item, modality: Modality, style: str | None) -> tuple[str, tuple[Image.Image, ...]]:
    if modality == "text":
        return item.input, ()
    with Image.open(item.image(style)) as image:
        return IMAGE_PLACEHOLDER, (image.convert("RGB"),)


def build_icl_prompt(
    demonstrations: Sequence[Item],
    query: Item,
    *,
    demo_modality: Modality = "text",
    query_modality: Modality = "text",
    style: str | None = None,
    template: QATemplate = DEFAULT_TEMPLATE,
) -> Prompt:
    """Demonstrations followed by the query, each input as text or as its image in `style`."""
    text, images = "", list[Image.Image]()
    for item in demonstrations:
        demo_input, demo_images = _input_of(item, demo_modality, style)
        text += template.demonstration(demo_input, item.output)
        images.extend(demo_images)
    query_input, query_images = _input_of(query, query_modality, style)
    images.extend(query_images)
    return Prompt(text + template.query.format(input=query_input), tuple(images))


def build_query_prompt(
    query: Item,
    *,
    modality: Modality = "text",
    style: str | None = None,
    template: QATemplate = DEFAULT_TEMPLATE,
) -> Prompt:
    """The query alone (the no-context baseline, and the target of patching)."""
    return build_icl_prompt([], query, query_modality=modality, style=style, template=template)


def encode_prompts(handle: ModelHandle, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
    """A left-padded batch of prompts (with their images, if any) through the model's processor."""
    images = [list(prompt.images) for prompt in prompts] if any(p.images for p in prompts) else None
    return handle.build_inputs([prompt.text for prompt in prompts], images)
