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

    def prepare(self, image: Image.Image) -> Image.Image:
        rgb = image.convert("RGB")
        if self.width is None or rgb.width == self.width:
            return rgb
        height = max(1, round(rgb.height * self.width / rgb.width))
        return rgb.resize((self.width, height), Image.Resampling.BICUBIC)

    def as_record(self) -> dict[str, Any]:
        return {"width": self.width, "processor_kwargs": dict(self.processor_kwargs)}


def image_settings_for(
    architecture: Architecture,
    overrides: Mapping[str, Any] | None = None,
    width: int | None = PAPER_IMAGE_WIDTH,
) -> ImageSettings:
    """The family's image defaults with the user's processor arguments on top."""
    kwargs = {**dict(architecture.image_defaults), **dict(overrides or {})}
    return ImageSettings(width=width, processor_kwargs=kwargs)
