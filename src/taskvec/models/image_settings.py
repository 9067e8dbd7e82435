"""How images reach a model's processor: a resize and the processor's keyword arguments.

The defaults follow the paper (images resized to width 224, each family's `image_defaults` from the
architecture table, e.g. Idefics2 without image splitting); a user's overrides win over both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from taskvec.models.architectures import Architecture

PAPER_IMAGE_WIDTH = 224


@dataclass(frozen=True)
class ImageSettings:
    width: int | None = PAPER_IMAGE_WIDTH  # None: images reach the processor at their own size
    processor_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # Set on the processor's image processor before each call (settings it reads nowhere else).
    image_processor_attributes: Mapping[str, Any] = field(default_factory=dict)

    def prepare(self, image: Image.Image) -> Image.Image:
        rgb = image.convert("RGB")
        if self.width is None or rgb.width == self.width:
            return rgb
        height = max(1, round(rgb.height * self.width / rgb.width))
        return rgb.resize((self.width, height), Image.Resampling.BICUBIC)

    def apply_to(self, processor: Any) -> None:
        image_processor = getattr(processor, "image_processor", None)
        for name, value in self.image_processor_attributes.items():
            if image_processor is None or not hasattr(image_processor, name):
                raise ValueError(f"{type(processor).__name__} has no image processor setting {name!r}")
            setattr(image_processor, name, value)

    def as_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"width": self.width, "processor_kwargs": dict(self.processor_kwargs)}
        if self.image_processor_attributes:
            record["image_processor"] = dict(self.image_processor_attributes)
        return record


def image_settings_for(
    architecture: Architecture,
    overrides: Mapping[str, Any] | None = None,
    width: int | None = PAPER_IMAGE_WIDTH,
) -> ImageSettings:
    """The family's image defaults with the user's processor arguments on top (a text-only model
    takes no images, so it gets none: its record and fingerprint stay free of image settings)."""
    if not architecture.is_vision_language:
        return ImageSettings(width=None)
    attributes = dict(architecture.image_processor_defaults)
    kwargs = dict(architecture.image_defaults)
    for name, value in (overrides or {}).items():
        (attributes if name in attributes else kwargs)[name] = value
    return ImageSettings(width=width, processor_kwargs=kwargs, image_processor_attributes=attributes)
