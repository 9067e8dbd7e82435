"""ModelHandle: one model, its processor and its architecture entry, behind one small interface."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from taskvec.models.architectures import Architecture, architecture_for_class

# Prompts throughout taskvec mark an image with this text; the handle rewrites it into whatever the
# model's own processor expects, so task and prompt code never knows the model family.
IMAGE_PLACEHOLDER = "<image>"


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the model's context window."""


class MissingImageError(ValueError):
    """The number of images does not match the image placeholders of a prompt."""


def resolve_attribute(root: torch.nn.Module, dotted_path: str) -> Any:
    target: Any = root
    for name in dotted_path.split("."):
        target = getattr(target, name)
    return target


@dataclass
class ModelHandle:
    model: torch.nn.Module
    processor: Any  # a ProcessorMixin for VLMs, the tokenizer itself for text-only models
    architecture: Architecture
    name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def wrap(cls, model: torch.nn.Module, processor: Any, name: str = "") -> ModelHandle:
        """A handle on an already loaded model; raises for an architecture not in the table."""
        architecture = architecture_for_class(type(model).__name__)
        return cls(model.eval(), processor, architecture, name or type(model).__name__)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def layers(self) -> torch.nn.ModuleList:
        return resolve_attribute(self.model, self.architecture.layers_path)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def final_norm(self) -> torch.nn.Module:
        return resolve_attribute(self.model, self.architecture.norm_path)

    @property
    def unembedding(self) -> torch.nn.Module:
        return resolve_attribute(self.model, self.architecture.unembed_path)

    @property
    def text_config(self) -> Any:
        config: Any = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def context_length(self) -> int | None:
        config = self.text_config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
        return None

    def build_inputs(
        self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenise a batch (left padded) through the model's own processor.

        Prompts write each image as IMAGE_PLACEHOLDER; `images[i]` holds prompt i's images in order.
        """
        prompts = list(prompts)
        per_prompt_images = [list(row) for row in images] if images is not None else [[] for _ in prompts]
        if len(per_prompt_images) != len(prompts):
            raise MissingImageError(f"{len(prompts)} prompts but {len(per_prompt_images)} image lists")
        for index, (prompt, row) in enumerate(zip(prompts, per_prompt_images, strict=True)):
            expected = prompt.count(IMAGE_PLACEHOLDER)
            if expected != len(row):
                raise MissingImageError(
                    f"prompt {index} has {expected} {IMAGE_PLACEHOLDER} "
                    f"placeholder(s) but {len(row)} image(s)"
                )
        any_images = any(per_prompt_images)
        if any_images:
            encoded = self._encode_with_images(prompts, per_prompt_images)
        else:
            encoded = self.tokenizer(prompts, return_tensors="pt", padding=True)
        # PaliGemma's processor derives training labels from the prompt; they are not a model input.
        batch = {
            key: value.to(self.device) if isinstance(value, torch.Tensor) else value
            for key, value in dict(encoded).items()
            if key != "labels"
        }
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                batch[key] = value.to(self.dtype)
        self._check_context(batch["input_ids"])
        if self.architecture.position_style == "absolute" and "attention_mask" in batch:
            # Learned absolute positions must skip left padding; rotary ones are shift-invariant.
            batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return batch

    def _encode_with_images(self, prompts: list[str], images: list[list[Image.Image]]) -> Any:
        if not self.architecture.is_vision_language:
            raise MissingImageError(
                f"{self.architecture.model_class} is a text-only model and cannot take images"
            )
        if not self.architecture.multi_image and any(len(row) > 1 for row in images):
            raise MissingImageError(f"{self.architecture.family}: {self.architecture.notes}")
        image_token = self.architecture.image_token or ""
        texts = [prompt.replace(IMAGE_PLACEHOLDER, image_token) for prompt in prompts]
        rgb = [[image.convert("RGB") for image in row] for row in images]
        batched: list[Any] = rgb
        if self.architecture.image_batching == "single":
            if any(len(row) != 1 for row in rgb):
                raise MissingImageError(f"{self.architecture.family}: {self.architecture.notes}")
            batched = [row[0] for row in rgb]
        return self.processor(
            text=texts,
            images=batched,
            return_tensors="pt",
            padding=True,
            **dict(self.architecture.processor_kwargs),
        )

    def _check_context(self, input_ids: torch.Tensor) -> None:
        limit = self.context_length
        if limit is not None and input_ids.shape[-1] > limit:
            raise PromptTooLongError(
                f"prompt has {input_ids.shape[-1]} tokens, longer than {self.name}'s context of {limit}"
            )
