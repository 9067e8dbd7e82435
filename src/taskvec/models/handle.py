"""ModelHandle: one model, its processor and its architecture entry, behind one small interface."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from taskvec.models.architectures import Architecture
from taskvec.models.convention import resolve_architecture
from taskvec.models.devices import compute_dtype, execution_device
from taskvec.models.image_settings import ImageSettings, image_settings_for

# Prompts throughout taskvec mark an image with this text; the handle rewrites it into whatever the
# model's own processor expects, so task and prompt code never knows the model family.
IMAGE_PLACEHOLDER = "<image>"


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the model's context window."""


class MissingImageError(ValueError):
    """The number of images does not match the image placeholders of a prompt."""


class MissingPadTokenError(ValueError):
    """A tokenizer has no pad, eos or unk token to pad a batch with."""


def prepare_tokenizer(tokenizer: Any) -> dict[str, Any]:
    """Left padding and a pad token, which batched prompts need; returns what was set, for the record.

    Left padding keeps every prompt's last token at position -1, where the engine patches and reads.
    A tokenizer without a pad token (Mistral-7B-v0.1, Llama) pads with its eos (else unk): padded
    positions are masked out, so which token fills them does not change any result.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is not None:
        return {"pad_token": str(tokenizer.pad_token), "pad_token_from": "tokenizer"}
    for source in ("eos_token", "unk_token"):
        token = getattr(tokenizer, source, None)
        if token is not None:
            tokenizer.pad_token = token
            return {"pad_token": str(token), "pad_token_from": source}
    raise MissingPadTokenError(
        f"{type(tokenizer).__name__} has no pad, eos or unk token to pad batches with; "
        "set tokenizer.pad_token"
    )


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
    image_settings: ImageSettings = field(default_factory=ImageSettings)

    @classmethod
    def wrap(
        cls,
        model: torch.nn.Module,
        processor: Any,
        name: str = "",
        *,
        architecture: Architecture | None = None,
        image_settings: ImageSettings | None = None,
    ) -> ModelHandle:
        """A handle on an already loaded model, prepared as `load_model` prepares its own: left
        padding, a pad token, the family's image defaults (images keep their size unless
        `image_settings` says otherwise). The architecture is the table's entry, or found by
        transformers' common layout (with a warning); raises for a model that has neither."""
        if architecture is None:
            architecture = resolve_architecture(model, processor)
        handle = cls(
            model.eval(),
            processor,
            architecture,
            name or type(model).__name__,
            image_settings=image_settings or image_settings_for(architecture, width=None),
        )
        handle.metadata["tokenizer"] = prepare_tokenizer(handle.tokenizer)
        return handle

    def settings_record(self) -> dict[str, Any]:
        """What a result must record to say which model ran and how: source, loading, images."""
        return {
            "family": self.architecture.family,
            "model_class": type(self.model).__name__,
            "images": self.image_settings.as_record(),
            **self.metadata,
        }

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
        """Where inputs go: where the token embedding computes (with a device map, its GPU, even
        when its weights are offloaded between calls)."""
        return execution_device(self._embeddings()) or torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations run in; a quantized model's first weights may be packed integers."""
        return compute_dtype(self._embeddings()) or torch.float32

    def _embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()  # type: ignore[operator]

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
        if self.architecture.prefix_token_types and "token_type_ids" not in batch:
            # The whole prompt is the prefix, as the processor marks a prompt with images.
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
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
        rgb = [[self.image_settings.prepare(image) for image in row] for row in images]
        batched: list[Any] = rgb
        if self.architecture.image_batching == "single":
            if any(len(row) != 1 for row in rgb):
                raise MissingImageError(f"{self.architecture.family}: {self.architecture.notes}")
            batched = [row[0] for row in rgb]
        self.image_settings.apply_to(self.processor)
        return self.processor(
            text=texts,
            images=batched,
            return_tensors="pt",
            padding=True,
            **{**dict(self.image_settings.processor_kwargs), **dict(self.architecture.processor_kwargs)},
        )

    def _check_context(self, input_ids: torch.Tensor) -> None:
        limit = self.context_length
        if limit is not None and input_ids.shape[-1] > limit:
            raise PromptTooLongError(
                f"prompt has {input_ids.shape[-1]} tokens, longer than {self.name}'s context of {limit}"
            )
