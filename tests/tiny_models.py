"""Tiny, randomly initialised models of every supported family, built offline from configs.

Each family gets the real Hugging Face model class and the real processor class, wired to a small
`tokenizers` WordLevel tokenizer and a PIL image processor sized to the tiny vision tower, so tests
exercise exactly the code paths a real checkpoint would (image-token expansion, extra processor
outputs, 3D rope positions, sliding-window caches...) in milliseconds.

The families are the entries of taskvec's architecture table, and a builder supplies only the model,
its processor and tokenizer: where the layers live, the image token and how the processor takes
images are read from the table entry of the model's class, so the tests check the table itself.
Llama 4's image processor exists for torchvision only (which does not import beside the CPU torch
here), so it gets a PIL port. A few real classes without a table entry are built too, for the
common-layout resolution of models/convention.py.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import BatchFeature, PreTrainedTokenizerFast
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, ProcessorMixin

from taskvec.models import ARCHITECTURES, IMAGE_PLACEHOLDER, Architecture, architecture_for_class

FAMILIES: tuple[str, ...] = tuple(entry.family for entry in ARCHITECTURES)
VLM_FAMILIES: tuple[str, ...] = tuple(entry.family for entry in ARCHITECTURES if entry.is_vision_language)
LM_FAMILIES: tuple[str, ...] = tuple(entry.family for entry in ARCHITECTURES if not entry.is_vision_language)
# Test prompts mark each image with this; make_inputs writes the table entry's image token instead.
IMAGE = IMAGE_PLACEHOLDER

# Pad is id 0 everywhere: FuyuProcessor hard-codes `tokenizer.pad_token_id = 0`.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<unk>",
    "<s>",
    "</s>",
    "<image>",
    "<video>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "|SPEAKER|",
    "|NEWLINE|",
    "<0x04>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
    "<|image|>",
    "<|image>",
    "<image|>",
    "<|video|>",
    "<|audio|>",
    "<|audio>",
    "<audio|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "<|image_start|>",
    "<|image_end|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
    "<|python_tag|>",
)

WORDS: tuple[str, ...] = (
    "Q", "A", ":", "\n", ",", ".", "?", "!", "-", "'", "(", ")",
    "France", "Paris", "Japan", "Tokyo", "Italy", "Rome", "Spain", "Madrid", "Egypt", "Cairo",
    "Peru", "Lima", "Germany", "Berlin", "China", "Beijing", "India", "Delhi", "Kenya", "Nairobi",
    "Canada", "Ottawa", "Brazil", "Brasilia", "Greece", "Athens",
    "cat", "dog", "cow", "horse", "fish", "bird", "lion", "mouse", "sheep", "pig",
    "apple", "banana", "bread", "cheese", "rice", "pizza", "cake", "egg", "soup", "grape",
    "red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown",
    "The", "the", "capital", "city", "of", "country", "is", "a", "an", "what", "What", "colour",
    "animal", "food", "sound", "says", "in", "English", "French", "Spanish", "yes", "no",
    "opposite", "hot", "cold", "big", "small", "up", "down", "day", "night",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
)  # fmt: skip


# Fuyu's tokenizer (sentencepiece) treats these as ordinary pieces and marks the start of every text
# with "▁"; FuyuProcessor relies on that (it drops the first token of the image placeholder text).
FUYU_PLAIN_TOKENS: tuple[str, ...] = ("|SPEAKER|", "|NEWLINE|")
WORD_START = "\u2581"
PIECES = Regex(r"\|[A-Z]+\||\n|[^\W\d_]+|\d|[^\w\s]|_")


def build_tokenizer(
    extra_special: dict[str, str] | None = None, add_bos: bool = True, fuyu_style: bool = False
) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer: one token per word, digit or punctuation mark; each newline is a token,
    other whitespace is dropped. Decoding concatenates pieces, so `decode([id])` is exactly that token's
    text and the pieces of a sequence concatenate back into its text (minus the spaces).

    `fuyu_style` mimics the sentencepiece tokenizer FuyuProcessor expects: "▁" starts every text
    and |SPEAKER| / |NEWLINE| are ordinary tokens.
    """
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *WORDS, WORD_START))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if fuyu_style:
        backend.normalizer = normalizers.Prepend(WORD_START)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(PIECES, behavior="isolated"),
        ]
    )
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens=extra_special or {},
        add_bos_token=add_bos,
    )
    plain = {"<pad>", "<unk>", "<s>", "</s>", *(FUYU_PLAIN_TOKENS if fuyu_style else ())}
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in plain]})
    return tokenizer


@dataclass
class TinyModel:
    model: torch.nn.Module
    processor: Any  # the tokenizer itself for text-only models
    tokenizer: PreTrainedTokenizerFast

    @property
    def architecture(self) -> Architecture:
        return architecture_for_class(type(self.model).__name__)

    @property
    def family(self) -> str:
        return self.architecture.family

    @property
    def is_vlm(self) -> bool:
        return self.architecture.is_vision_language


def resolve(root: Any, dotted_path: str) -> Any:
    for name in dotted_path.split("."):
        root = getattr(root, name)
    return root


def _text(model_type: str, num_layers: int, hidden: int = 32, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
    }
    config.update(overrides)
    return config


@contextlib.contextmanager
def _without_video_processor() -> Iterator[None]:
    """Let a processor be built with `video_processor=None`.

    Video processors need torchvision, which is not installed, and ProcessorMixin type-checks every
    sub-processor (it even fails to look the video base class up without torchvision). The
    processors themselves only touch the video processor when videos are passed.
    """
    original = ProcessorMixin.check_argument_for_proper_class

    def check(self: ProcessorMixin, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return original(self, argument_name, argument)

    ProcessorMixin.check_argument_for_proper_class = check  # type: ignore[method-assign]
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _without_num2words() -> Iterator[None]:
    """SmolVLMProcessor refuses to build without the optional `num2words` package, which it only uses
    to spell out frame counts in video prompts; without a video processor it is never called."""
    from transformers.models.smolvlm import processing_smolvlm

    if processing_smolvlm.num2words is not None:
        yield
        return

    def unavailable(*args: Any, **kwargs: Any) -> str:
        raise ImportError("num2words is not installed (only needed for SmolVLM video prompts)")

    processing_smolvlm.num2words = unavailable
    try:
        yield
    finally:
        processing_smolvlm.num2words = None


class _FuyuImageProcessorPil(transformers.FuyuImageProcessorPil):
    """FuyuImageProcessorPil whose `patchify_image` also takes the torch tensors FuyuProcessor gives it.

    In transformers 5.23 FuyuProcessor asks the image processor for torch tensors and then hands them
    to the PIL processor's numpy-only `patchify_image` (TypeError in `transpose`); the torchvision
    processor that FuyuProcessor was written for cannot be used here.
    """

    def patchify_image(self, image: Any, patch_size: Any = None) -> Any:
        if isinstance(image, torch.Tensor):
            return torch.from_numpy(super().patchify_image(image.cpu().numpy(), patch_size=patch_size))
        return super().patchify_image(image, patch_size=patch_size)


# --------------------------------------------------------------------------------------- builders
# Each builder returns the real model class, processor and tokenizer of its family; everything about
# the layout (layer, norm and unembedding paths, image token, image batching) comes from the table.


def _clip_vision(image_size: int = 16, patch_size: int = 4, layers: int = 2) -> dict[str, Any]:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": 32,
    }


def _siglip_vision(image_size: int = 16, patch_size: int = 4, layers: int = 2) -> dict[str, Any]:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
    }


def _llava_processor() -> transformers.LlavaProcessor:
    """CLIP preprocessing at 16 px, 4 px patches: 16 <image> tokens per image (CLS dropped)."""
    tokenizer = build_tokenizer({"image_token": "<image>"}, add_bos=True)
    image_processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    return transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def _build_llava(seed: int) -> TinyModel:
    """CLIP tower (16px images, 4px patches, feature layer -2, CLS dropped): 16 <image> tokens per
    image. Several images per prompt work."""
    processor = _llava_processor()
    tokenizer = processor.tokenizer
    config = transformers.LlavaConfig(
        text_config=_text("llama", 3, vocab_size=len(tokenizer)),
        vision_config=_clip_vision(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return TinyModel(
        _init(transformers.LlavaForConditionalGeneration, config, seed, tokenizer), processor, tokenizer
    )


PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]


def _build_llava_next(seed: int) -> TinyModel:
    """AnyRes: the image is tiled (pinpoints up to 32x32 of 16px tiles) so the number of <image>
    tokens depends on the image's size; pixel_values is 5-D (image, tile, C, H, W) and image_sizes
    must be passed along. Several images per prompt work."""
    tokenizer = build_tokenizer({"image_token": "<image>"}, add_bos=True)
    image_processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=PINPOINTS
    )
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = transformers.LlavaNextConfig(
        text_config=_text("llama", 2, hidden=48, vocab_size=len(tokenizer)),
        vision_config=_clip_vision(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = _init(transformers.LlavaNextForConditionalGeneration, config, seed, tokenizer)
    return TinyModel(model, processor, tokenizer)


def _build_llava_onevision(seed: int) -> TinyModel:
    """Qwen2 text, SigLIP tower. A prompt with one image uses AnyRes tiling (token count depends on
    image size); a prompt with several images uses 16+1 tokens per image (batch_num_images tells the
    model which). No video processor (needs torchvision)."""
    tokenizer = build_tokenizer({"image_token": "<image>", "video_token": "<video>"}, add_bos=False)
    image_processor = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": 16, "width": 16}, image_grid_pinpoints=PINPOINTS
    )
    with _without_video_processor():
        processor = transformers.LlavaOnevisionProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=16,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )
    config = transformers.LlavaOnevisionConfig(
        text_config=_text("qwen2", 3, hidden=48, vocab_size=len(tokenizer)),
        vision_config=_siglip_vision(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )
    model = _init(transformers.LlavaOnevisionForConditionalGeneration, config, seed, tokenizer)
    return TinyModel(model, processor, tokenizer)


def _build_idefics2(seed: int) -> TinyModel:
    """Mistral text; perceiver resampler -> 4 <image> tokens per sub-image, wrapped in
    <fake_token_around_image>. As in the checkpoint's processor, each image is split into 4 crops
    plus the whole (5 sub-images, 20 tokens); the processor counts the tokens from its image
    processor's do_image_splitting, whatever the call says (see the table's image_processor_defaults).
    pixel_values is 5-D (sample, sub-image, C, H, W) padded across the batch, with
    pixel_attention_mask. Several images per prompt work."""
    tokenizer = build_tokenizer(add_bos=True)
    image_processor = transformers.Idefics2ImageProcessorPil(
        size={"shortest_edge": 16, "longest_edge": 16}, do_image_splitting=True
    )
    processor = transformers.Idefics2Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4
    )
    config = transformers.Idefics2Config(
        text_config=_text("mistral", 4, vocab_size=len(tokenizer), sliding_window=None),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 16,
            "patch_size": 4,
        },
        perceiver_config={
            "hidden_size": 32,
            "resampler_n_latents": 4,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 8,
            "num_key_value_heads": 1,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = _init(transformers.Idefics2ForConditionalGeneration, config, seed, tokenizer)
    # The perceiver's latents start as ones: every image token would be identical and the image's
    # contribution, added to those large latents, would vanish under the resampler's final norm.
    _reinit(model.model.connector.perceiver_resampler.latents, seed, 0.02)
    return TinyModel(model, processor, tokenizer)


def _idefics3_like(family: str, seed: int) -> TinyModel:
    """Llama text; pixel shuffle -> 4 <image> tokens per 16px tile. The image is split into up to
    2x2 tiles (<row_i_col_j>) plus a global view (<global-img>), so one image is ~30 tokens.
    pixel_values is 5-D (sample, tile, C, H, W) with pixel_attention_mask. Several images per prompt
    work."""
    tokenizer = build_tokenizer(add_bos=True)
    if family == "idefics3":
        image_processor = transformers.Idefics3ImageProcessorPil(
            size={"longest_edge": 32}, max_image_size={"longest_edge": 16}
        )
        processor = transformers.Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4
        )
        config_class, model_class = transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration
        vision_type, layers = "idefics3_vision", 3
    else:
        image_processor = transformers.SmolVLMImageProcessorPil(
            size={"longest_edge": 32}, max_image_size={"longest_edge": 16}
        )
        with _without_video_processor(), _without_num2words():
            processor = transformers.SmolVLMProcessor(
                image_processor=image_processor, tokenizer=tokenizer, video_processor=None, image_seq_len=4
            )
        config_class, model_class = transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration
        vision_type, layers = "smolvlm_vision", 2
    config = config_class(
        text_config=_text(
            "llama", layers, hidden=64 if family == "smolvlm" else 32, vocab_size=len(tokenizer)
        ),
        vision_config={
            "model_type": vision_type,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 16,
            "patch_size": 4,
        },
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return TinyModel(_init(model_class, config, seed, tokenizer), processor, tokenizer)


def _qwen_vl(family: str, seed: int) -> TinyModel:
    """Native resolution with the checkpoints' patch geometry (14px patches, 16px on Qwen3-VL, 2x2
    merged per <|image_pad|>): images are resized to multiples of 28px (32px) within the processor's
    pixel bounds, 56x56 (64x64) at least, so a 24px image has 4 tokens and token counts depend on
    image size; the table's image defaults pin images to ~224x224 pixels (64 tokens, 49 on Qwen3-VL).
    pixel_values is 2-D (all patches of all images, C*T*P*P) with image_grid_thw; mm_token_type_ids
    is required with images (ValueError otherwise). 3D M-RoPE: the prefill stores per-row
    model.model.rope_deltas; a manual decode step must pass position_ids of shape (3, B, 1) =
    attention_mask.sum(-1) - 1 + rope_deltas (with a full-length attention_mask and no position_ids,
    transformers 5.23 builds positions for the whole mask and crashes). Qwen3-VL: interleaved M-RoPE
    sections, q/k RMSNorm, and DeepStack (vision features of tower layer 0 are added to the output
    of decoder layer 0 at image positions). No video processor (needs torchvision). Several images
    per prompt work."""
    tokenizer = build_tokenizer(
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}, add_bos=False
    )
    patch = 16 if family == "qwen3_vl" else 14
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": (4 * patch) ** 2, "longest_edge": 28 * 28 * 1280},
    )
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    processor_class, config_class, model_class = {
        "qwen2_vl": (
            transformers.Qwen2VLProcessor,
            transformers.Qwen2VLConfig,
            transformers.Qwen2VLForConditionalGeneration,
        ),
        "qwen2_5_vl": (
            transformers.Qwen2_5_VLProcessor,
            transformers.Qwen2_5_VLConfig,
            transformers.Qwen2_5_VLForConditionalGeneration,
        ),
        "qwen3_vl": (
            transformers.Qwen3VLProcessor,
            transformers.Qwen3VLConfig,
            transformers.Qwen3VLForConditionalGeneration,
        ),
    }[family]
    with _without_video_processor():
        processor = processor_class(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None
        )
    geometry = {"patch_size": patch, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_heads": 4}
    text_overrides: dict[str, Any] = {}
    if family == "qwen2_vl":
        hidden, layers, mrope = 32, 3, [2, 1, 1]
        vision: dict[str, Any] = {
            **geometry,
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": hidden,
            "mlp_ratio": 2,
        }
    elif family == "qwen2_5_vl":
        hidden, layers, mrope = 48, 4, [2, 2, 2]
        vision = {
            **geometry,
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": hidden,
            # 112px windows (the checkpoints'): 2x2 merged patches per window.
            "window_size": 112,
            "fullatt_block_indexes": [1],
        }
    else:
        hidden, layers, mrope = 32, 2, [4, 2, 2]
        text_overrides = {"head_dim": 16}
        vision = {
            **geometry,
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": hidden,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        }
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
    if family == "qwen3_vl":
        rope["mrope_interleaved"] = True
    text = _text(
        f"{family}_text",
        layers,
        hidden=hidden,
        vocab_size=len(tokenizer),
        rope_parameters=rope,
        **text_overrides,
    )
    config = config_class(text_config=text, vision_config=vision, **ids)
    return TinyModel(_init(model_class, config, seed, tokenizer), processor, tokenizer)


def _build_internvl(seed: int) -> TinyModel:
    """InternVL3: Qwen2 text, InternViT tower (CLS dropped), pixel shuffle 0.5 -> 4 <IMG_CONTEXT> per
    16px tile, wrapped in <img>...</img>. The processor crops each image into a grid of up to 4
    tiles chosen by its aspect ratio and size, plus a thumbnail tile when there are several, so token
    counts depend on the image (16x16: 1 tile; 24x24: 2x2 + 1; 40x12: 3x1 + 1). pixel_values is 4-D
    (all tiles of all images). Several images per prompt work."""
    tokenizer = build_tokenizer(
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        add_bos=False,
    )
    image_processor = transformers.GotOcr2ImageProcessorPil(
        size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    with _without_video_processor():
        processor = transformers.InternVLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None, image_seq_length=4
        )
    config = transformers.InternVLConfig(
        text_config=_text("qwen2", 3, vocab_size=len(tokenizer)),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 16,
            "patch_size": 4,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    model = _init(transformers.InternVLForConditionalGeneration, config, seed, tokenizer)
    return TinyModel(model, processor, tokenizer)


@contextlib.contextmanager
def _pixtral_processor_class() -> Iterator[type]:
    """transformers.PixtralProcessor is a placeholder without torchvision: its module imports a resize
    helper (used only to count tokens for vLLM) from the torchvision image processor's module. The PIL
    image processor's module defines the same helper, so it stands in for that one import."""
    torchvision_module = "transformers.models.pixtral.image_processing_pixtral"
    from transformers.models.pixtral import image_processing_pil_pixtral

    previous = sys.modules.get(torchvision_module)
    sys.modules[torchvision_module] = image_processing_pil_pixtral
    try:
        yield importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor
    finally:
        if previous is None:
            del sys.modules[torchvision_module]
        else:
            sys.modules[torchvision_module] = previous


def _build_mistral3(seed: int) -> TinyModel:
    """Mistral 3 (Small 3.1): Mistral text, Pixtral tower (2-D rope over 4px patches) whose features
    the projector merges 2x2 (Mistral3PatchMerger). The processor keeps each image's aspect ratio
    within longest_edge=32 pixels in multiples of 8, and writes a row of [IMG] per 8px of width, each
    row ending in [IMG_BREAK] and the last in [IMG_END]; image_sizes must be passed along. Several
    images per prompt work."""
    tokenizer = build_tokenizer(add_bos=True)
    image_processor = transformers.PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size=4)
    with _pixtral_processor_class() as processor_class:
        processor = processor_class(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=4, spatial_merge_size=2
        )
    config = transformers.Mistral3Config(
        text_config=_text("mistral", 2, hidden=48, vocab_size=len(tokenizer), sliding_window=None),
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "head_dim": 8,
            "image_size": 32,
            "patch_size": 4,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    model = _init(transformers.Mistral3ForConditionalGeneration, config, seed, tokenizer)
    return TinyModel(model, processor, tokenizer)


class _Llama4ImagesKwargs(ImagesKwargs, total=False):
    max_patches: int
    resize_to_max_canvas: bool


class _Llama4ImageProcessorPil(PilBackend):
    """Llama4ImageProcessor, which transformers ships for torchvision only, ported step for step to
    PIL/NumPy: pick the tile canvas (up to `max_patches` tiles) that needs the least upscaling (or the
    least downscaling), resize without distortion, never upscaling past one tile, pad with zeros to the
    canvas, split it into tiles and, with several tiles, add the whole image squashed into one. The
    original rescales and normalises in bfloat16; here it is float32."""

    valid_kwargs = _Llama4ImagesKwargs
    resample = PILImageResampling.BILINEAR
    image_mean: ClassVar[list[float]] = [0.5, 0.5, 0.5]
    image_std: ClassVar[list[float]] = [0.5, 0.5, 0.5]
    size: ClassVar[dict[str, int]] = {"height": 336, "width": 336}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    max_patches = 16
    resize_to_max_canvas = False
    model_input_names: ClassVar[list[str]] = ["pixel_values", "aspect_ratios"]

    def _preprocess(  # type: ignore[override]
        self,
        images: list[np.ndarray],
        size: SizeDict,
        resample: PILImageResampling,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: list[float],
        image_std: list[float],
        max_patches: int,
        resize_to_max_canvas: bool,
        return_tensors: str | None,
        **kwargs: Any,
    ) -> BatchFeature:
        tile = int(size.height)
        canvases = _llama4_canvases(max_patches, tile)

        def finish(image: np.ndarray) -> np.ndarray:
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            return self.normalize(image, image_mean, image_std) if do_normalize else image

        tiles, aspect_ratios = [], []
        for image in images:
            height, width = image.shape[-2:]
            canvas_height, canvas_width = _llama4_best_canvas((height, width), canvases, resize_to_max_canvas)
            limit = (canvas_height, canvas_width)
            if not resize_to_max_canvas:
                limit = (min(max(height, tile), canvas_height), min(max(width, tile), canvas_width))
            new_height, new_width = _max_size_without_distortion((height, width), limit)
            resized = self.resize(
                image, SizeDict(height=max(new_height, 1), width=max(new_width, 1)), resample
            )
            padded = np.pad(resized, ((0, 0), (0, canvas_height - new_height), (0, canvas_width - new_width)))
            rows, columns = canvas_height // tile, canvas_width // tile
            channels = padded.shape[0]
            image_tiles = (
                finish(padded)
                .reshape(channels, rows, tile, columns, tile)
                .transpose(1, 3, 0, 2, 4)
                .reshape(rows * columns, channels, tile, tile)
            )
            if rows * columns > 1:
                whole = finish(self.resize(image, SizeDict(height=tile, width=tile), resample))
                image_tiles = np.concatenate([image_tiles, whole[None]])
            tiles.append(image_tiles)
            aspect_ratios.append((rows, columns))
        data = {"pixel_values": np.concatenate(tiles), "aspect_ratios": np.array(aspect_ratios)}
        return BatchFeature(data=data, tensor_type=return_tensors)


def _llama4_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """Every (rows, columns) grid of at most `max_tiles` tiles, in pixels, ordered as transformers'
    find_supported_resolutions orders them (it decides ties)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, count + 1) if count % d == 0):
            by_ratio.setdefault(rows / (count // rows), []).append((rows, count // rows))
    return [(rows * tile, columns * tile) for grids in by_ratio.values() for rows, columns in grids]


def _llama4_best_canvas(
    size: tuple[int, int], canvases: list[tuple[int, int]], largest: bool
) -> tuple[int, int]:
    scales = [
        min(canvas_height / size[0], canvas_width / size[1]) for canvas_height, canvas_width in canvases
    ]
    upscaling = [scale for scale in scales if scale >= 1]
    if upscaling:
        chosen_scale = max(upscaling) if largest else min(upscaling)
    else:
        chosen_scale = max(scale for scale in scales if scale < 1)
    chosen = [canvas for canvas, scale in zip(canvases, scales, strict=True) if scale == chosen_scale]
    return min(chosen, key=lambda canvas: canvas[0] * canvas[1])


def _max_size_without_distortion(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    scale_height, scale_width = target[0] / size[0], target[1] / size[1]
    if scale_width < scale_height:
        return min(math.floor(size[0] * scale_width), target[0]), target[1]
    return target[0], min(math.floor(size[1] * scale_height), target[1])


def _build_llama4(seed: int) -> TinyModel:
    """Llama 4: the text model (language_model.model) has 4 layers with qk L2-norm, the 4th without
    rope (NoPE, with attention temperature tuning past 8192 tokens), chunked attention (8192-token
    chunks) on the rope layers, and every second layer a mixture of 2 experts (top-1) plus a shared
    expert. Vision: 16px tiles of 4px patches, pixel shuffle 0.5 -> 4 <|patch|> per tile. The
    processor tiles each image onto a canvas of up to 4 tiles (plus a global tile when there are
    several), written '<|image_start|>' + tile rows + '<|image|>' + global patches + '<|image_end|>';
    pixel_values is 4-D (all tiles) and aspect_ratios must not reach the model (the processor drops
    it). The table's image token is the processor's '<|image|>' placeholder. Several images per
    prompt work."""
    tokenizer = build_tokenizer(add_bos=True)
    image_processor = _Llama4ImageProcessorPil(size={"height": 16, "width": 16}, max_patches=4)
    processor = transformers.Llama4Processor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=4, pixel_shuffle_ratio=0.5
    )
    text = _text(
        "llama4_text",
        4,
        vocab_size=len(tokenizer),
        head_dim=8,
        intermediate_size=32,
        intermediate_size_mlp=64,
        num_local_experts=2,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
    )
    vision = {
        "hidden_size": 32,
        "intermediate_size": 128,  # the pixel-shuffled features: 4 x hidden_size
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 16,
        "patch_size": 4,
        "pixel_shuffle_ratio": 0.5,
        "projector_input_dim": 32,
        "projector_output_dim": 32,
        "vision_output_dim": 32,
    }
    config = transformers.Llama4Config(
        text_config=text,
        vision_config=vision,
        boi_token_index=tokenizer.convert_tokens_to_ids("<|image_start|>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<|image_end|>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<|patch|>"),
    )
    model = _init(transformers.Llama4ForConditionalGeneration, config, seed, tokenizer)
    return TinyModel(model, processor, tokenizer)


def _build_mllama(seed: int) -> TinyModel:
    """Mllama (Llama 3.2 Vision): images never enter the token sequence. Each <|image|> stays one
    token, and text tokens from it on attend to that image's tiles through the cross-attention
    decoder layer (layer 1 of 3, model.language_model.cross_attention_layers); a forward without
    images skips that layer altogether (no hook fires on it, and hidden_states has one entry fewer).
    The processor tiles each image onto up to 4 16px tiles (aspect-ratio ids and masks come along)
    and derives cross_attention_mask (batch, tokens, images, tiles); a decode step needs its last
    row, cached cross-attention keys and values stand in for the images. The processor writes the
    bos itself (after leading <|image|> tokens). Vision: a local encoder (2 layers, features of layer
    0 kept) and a global one (1 layer). Several images per prompt work."""
    tokenizer = build_tokenizer({"image_token": "<|image|>"}, add_bos=False)
    image_processor = transformers.MllamaImageProcessorPil(
        size={"height": 16, "width": 16}, max_image_tiles=4
    )
    processor = transformers.MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = _text("mllama_text_model", 3, vocab_size=len(tokenizer), cross_attention_layers=[1])
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_global_layers": 1,
        "attention_heads": 4,
        "image_size": 16,
        "patch_size": 4,
        "max_num_tiles": 4,
        "intermediate_layers_indices": [0],
        "vision_output_dim": 64,  # the last layer's features and those of layer 0, concatenated
    }
    config = transformers.MllamaConfig(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("<|image|>")
    )
    model = _init(transformers.MllamaForConditionalGeneration, config, seed, tokenizer)
    # The cross-attention layer's tanh gates start closed (checkpoints open them): images would have
    # no effect at all on a random model.
    cross_attention_layer = model.model.language_model.layers[1]
    with torch.no_grad():
        cross_attention_layer.cross_attn_attn_gate.fill_(1.0)
        cross_attention_layer.cross_attn_mlp_gate.fill_(1.0)
    return TinyModel(model, processor, tokenizer)


def _build_fuyu(seed: int) -> TinyModel:
    """One image per prompt only: FuyuProcessor always puts the image (rows of |SPEAKER| patches
    ending in |NEWLINE|, then <s>) before the text and appends <0x04> (beginning of answer); the
    table's image token is empty, so make_inputs removes IMAGE from the prompt. Persimmon text model
    (LayerNorm, partial rotary, qk-layernorm)."""
    tokenizer = build_tokenizer(add_bos=True, fuyu_style=True)
    image_processor = _FuyuImageProcessorPil(
        size={"height": 32, "width": 32}, patch_size={"height": 8, "width": 8}
    )
    processor = transformers.FuyuProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = transformers.FuyuConfig(
        text_config=_text(
            "persimmon", 2, vocab_size=len(tokenizer), num_key_value_heads=4, hidden_act="relu2"
        ),
        image_size=32,
        patch_size=8,
        num_channels=3,
        image_token_id=tokenizer.convert_tokens_to_ids("|SPEAKER|"),
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return TinyModel(_init(transformers.FuyuForCausalLM, config, seed, tokenizer), processor, tokenizer)


def _build_gemma3(seed: int) -> TinyModel:
    """Gemma3 text (sliding_window=8, layers sliding, sliding, full: sliding layers cache only the
    last 7 tokens), SigLIP tower pooled to 4 <image_soft_token> per image, expanded as
    '\\n\\n<start_of_image><image_soft_token>x4<end_of_image>\\n\\n'. token_type_ids (1 on image
    tokens; the processor renames mm_token_type_ids) must be passed with pixel_values: each image's
    tokens attend to each other bidirectionally (without it they are causal and the logits differ
    silently). Embeddings are scaled by sqrt(hidden); RMSNorm uses (1 + weight). Several images per
    prompt work."""
    tokenizer = build_tokenizer(
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
        add_bos=True,
    )
    image_processor = transformers.Gemma3ImageProcessorPil(size={"height": 16, "width": 16})
    processor = transformers.Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4
    )
    config = transformers.Gemma3Config(
        text_config=_gemma3_text(
            3, len(tokenizer), ["sliding_attention", "sliding_attention", "full_attention"]
        ),
        vision_config=_siglip_vision(),
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    model = _init(transformers.Gemma3ForConditionalGeneration, config, seed, tokenizer)
    # Gemma3 zero-initialises the projector's input matrix (checkpoints overwrite it): images would
    # have no effect at all on a random model.
    _reinit(model.model.multi_modal_projector.mm_input_projection_weight, seed, config.initializer_range)
    return TinyModel(model, processor, tokenizer)


def _gemma3_text(layers: int, vocab_size: int, layer_types: list[str], **overrides: Any) -> dict[str, Any]:
    return _text(
        "gemma3_text",
        layers,
        vocab_size=vocab_size,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=8,
        layer_types=layer_types,
        hidden_activation="gelu_pytorch_tanh",
        **overrides,
    )


def _build_gemma4(seed: int) -> TinyModel:
    """Gemma4 text: 4 layers (sliding_window=8, sliding and full alternating, head_dim 8 on both),
    per-layer input embeddings (PLE), and the last 2 layers reuse the keys and values of the last
    earlier layer of their type (num_kv_shared_layers=2); final logits soft-capped at 30. Vision:
    4px patches pooled 3x3 into soft tokens; the processor resizes each image (aspect ratio kept) to
    the budget of max_soft_tokens=70 (its smallest setting), so a square image has 64 soft tokens,
    expanded as '<|image>' + '<|image|>' * n + '<image|>'. mm_token_type_ids (1 on image tokens) must
    be passed with pixel_values and image_position_ids: each image's tokens attend to each other
    bidirectionally. The processor needs an audio feature extractor and the tokenizer's audio tokens
    even without audio. No video processor (needs torchvision). Several images per prompt work."""
    tokenizer = build_tokenizer(
        {
            "image_token": "<|image|>",
            "boi_token": "<|image>",
            "eoi_token": "<image|>",
            "audio_token": "<|audio|>",
            "boa_token": "<|audio>",
            "eoa_token": "<audio|>",
        },
        add_bos=True,
    )
    image_processor = transformers.Gemma4ImageProcessorPil(
        patch_size=4, max_soft_tokens=70, pooling_kernel_size=3
    )
    with _without_video_processor():
        processor = transformers.Gemma4Processor(
            feature_extractor=transformers.Gemma4AudioFeatureExtractor(),
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            image_seq_length=70,
        )
    text = _text(
        "gemma4_text",
        4,
        vocab_size=len(tokenizer),
        head_dim=8,
        global_head_dim=8,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=2,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=len(tokenizer),
        use_bidirectional_attention="vision",
        final_logit_softcapping=30.0,
    )
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 8,
        "patch_size": 4,
        "pooling_kernel_size": 3,
        "position_embedding_size": 64,
    }
    config = transformers.Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
        boi_token_id=tokenizer.convert_tokens_to_ids("<|image>"),
        eoi_token_id=tokenizer.convert_tokens_to_ids("<image|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio|>"),
    )
    model = _init(transformers.Gemma4ForConditionalGeneration, config, seed, tokenizer)
    # The patch position table starts as ones (checkpoints overwrite it): every patch would get the
    # same position embedding.
    _reinit(model.model.vision_tower.patch_embedder.position_embedding_table, seed, 0.02)
    return TinyModel(model, processor, tokenizer)


def _build_paligemma(seed: int) -> TinyModel:
    """Prefix-LM: the text config has use_bidirectional_attention=True, so every prompt token with
    token_type_ids 0 (the processor's marks for a whole prompt) attends to the whole prompt; only
    token_type_ids 1 (suffix, generated tokens) is causal. Without token_type_ids the mask is the
    attention implementation's: none under sdpa for one unpadded prompt (both ways), causal once a
    mask is built (a padded batch, eager attention). A residual therefore depends on later
    prompt tokens, and a decode step over the cache of the prompt minus its last token equals a full
    forward only if that last token has token_type_ids 1. Positions are 1-indexed (position_ids =
    cache_position + 1). Images belong first (checkpoints are trained so), but the processor accepts
    several, anywhere: it inserts <s> after the last <image> and appends '\\n'; 16 <image> tokens per
    image. make_inputs drops the processor's labels. The processor adds 1152 <locXXXX>/<segXXX>
    tokens. Gemma text: embeddings scaled by sqrt(hidden), RMSNorm uses (1 + weight)."""
    tokenizer = build_tokenizer({"image_token": "<image>"}, add_bos=False)
    image_processor = transformers.SiglipImageProcessorPil(size={"height": 16, "width": 16})
    image_processor.image_seq_length = 16
    processor = transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = transformers.PaliGemmaConfig(
        text_config=_text("gemma", 3, vocab_size=len(tokenizer), head_dim=8),
        vision_config=_siglip_vision(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=len(tokenizer),
        projection_dim=32,
        hidden_size=32,
    )
    model = _init(transformers.PaliGemmaForConditionalGeneration, config, seed, tokenizer)
    return TinyModel(model, processor, tokenizer)


def _build_lm(family: str, seed: int) -> TinyModel:
    """A text-only model. Quirks by family:

    gpt2: learned absolute positions, so a left-padded forward needs position_ids =
    (attention_mask.cumsum(-1) - 1).clamp(min=0) (generate computes them itself); LayerNorm; lm_head
    tied to wte; no bos added.
    gemma3_text: sliding_window=8 with layer_types sliding x3 + full (hybrid cache);
    final_logit_softcapping=30 (logits = 30*tanh(lm_head(norm(h))/30)).
    gemma2: sliding and full layers alternating (sliding_window=8), attention logits soft-capped at
    50 and final logits at 30.
    gemma, gemma2, gemma3_text: embeddings scaled by sqrt(hidden); RMSNorm uses (1 + weight); tied
    embeddings.
    qwen3: RMSNorm on queries and keys; head_dim is its own setting (128 unless set).
    qwen3_moe: qwen3 attention; every layer's MLP is a mixture of 4 experts (top-2).
    qwen2, qwen3, qwen3_moe: no bos added.
    """
    add_bos = family not in ("qwen2", "qwen3", "qwen3_moe", "gpt2")
    tokenizer = build_tokenizer(add_bos=add_bos)
    vocab = len(tokenizer)
    if family == "gpt2":
        config: transformers.PreTrainedConfig = transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=256,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        )
        model_class: type = transformers.GPT2LMHeadModel
    elif family == "gemma3_text":
        config = transformers.Gemma3TextConfig(
            **_gemma3_text(
                4,
                vocab,
                ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
                final_logit_softcapping=30.0,
            )
        )
        model_class = transformers.Gemma3ForCausalLM
    elif family == "gemma2":
        config = transformers.Gemma2Config(
            **_text(
                "gemma2",
                4,
                vocab_size=vocab,
                head_dim=8,
                query_pre_attn_scalar=8,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention"] * 2,
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
                hidden_activation="gelu_pytorch_tanh",
            )
        )
        model_class = transformers.Gemma2ForCausalLM
    elif family == "gemma":
        config = transformers.GemmaConfig(**_text("gemma", 3, hidden=48, vocab_size=vocab, head_dim=12))
        model_class = transformers.GemmaForCausalLM
    elif family == "qwen3":
        config = transformers.Qwen3Config(**_text("qwen3", 3, hidden=32, vocab_size=vocab, head_dim=8))
        model_class = transformers.Qwen3ForCausalLM
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **_text(
                "qwen3_moe",
                2,
                vocab_size=vocab,
                head_dim=8,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                decoder_sparse_step=1,
            )
        )
        model_class = transformers.Qwen3MoeForCausalLM
    else:
        config_class, model_class, layers, hidden = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, 4, 32),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, 3, 64),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, 2, 48),
        }[family]
        config = config_class(**_text(family, layers, hidden=hidden, vocab_size=vocab))
    return TinyModel(_init(model_class, config, seed, tokenizer), tokenizer, tokenizer)


def _init(
    model_class: type, config: transformers.PreTrainedConfig, seed: int, tokenizer: PreTrainedTokenizerFast
) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):  # a fixed seed without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_class(config).float().eval()
    generation = model.generation_config
    generation.pad_token_id = tokenizer.pad_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    return model


def _reinit(parameter: torch.nn.Parameter, seed: int, std: float) -> None:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 1)
        parameter.normal_(0.0, std)


BUILDERS: dict[str, Callable[[int], TinyModel]] = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "llava_onevision": _build_llava_onevision,
    "idefics2": _build_idefics2,
    "idefics3": functools.partial(_idefics3_like, "idefics3"),
    "smolvlm": functools.partial(_idefics3_like, "smolvlm"),
    "qwen2_vl": functools.partial(_qwen_vl, "qwen2_vl"),
    "qwen2_5_vl": functools.partial(_qwen_vl, "qwen2_5_vl"),
    "qwen3_vl": functools.partial(_qwen_vl, "qwen3_vl"),
    "internvl": _build_internvl,
    "mistral3": _build_mistral3,
    "mllama": _build_mllama,
    "llama4": _build_llama4,
    "fuyu": _build_fuyu,
    "gemma3": _build_gemma3,
    "gemma4": _build_gemma4,
    "paligemma": _build_paligemma,
    **{
        family: functools.partial(_build_lm, family)
        for family in (
            "gemma3_text",
            "gemma",
            "gemma2",
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "qwen3_moe",
            "gpt2",
        )
    },
}


# ------------------------------------------------------------------------- models outside the table
# Real transformers classes that have no table entry, for models/convention.py: whether they follow
# transformers' common layout is what the tests ask, so these TinyModels have no architecture.


def build_vipllava(seed: int = 0) -> TinyModel:
    """VipLlava: LLaVA's layout (model.vision_tower, model.multi_modal_projector,
    model.language_model, lm_head) and LlavaProcessor; the projector normalises and maps the
    concatenated features of two CLIP layers (CLS dropped): 16 <image> tokens per image."""
    processor = _llava_processor()
    tokenizer = processor.tokenizer
    config = transformers.VipLlavaConfig(
        text_config=_text("llama", 2, vocab_size=len(tokenizer)),
        vision_config=_clip_vision(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layers=[-2, -1],
    )
    return TinyModel(
        _init(transformers.VipLlavaForConditionalGeneration, config, seed, tokenizer), processor, tokenizer
    )


def build_phi3(seed: int = 0) -> TinyModel:
    """Phi3ForCausalLM: the common causal-LM layout (model.layers, model.norm, lm_head), rotary."""
    tokenizer = build_tokenizer(add_bos=True)
    config = transformers.Phi3Config(**_text("phi3", 2, vocab_size=len(tokenizer)))
    return TinyModel(_init(transformers.Phi3ForCausalLM, config, seed, tokenizer), tokenizer, tokenizer)


def build_opt(seed: int = 0) -> TinyModel:
    """OPTForCausalLM: its decoder stack is model.decoder.layers, with learned absolute positions."""
    tokenizer = build_tokenizer(add_bos=True)
    config = transformers.OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return TinyModel(_init(transformers.OPTForCausalLM, config, seed, tokenizer), tokenizer, tokenizer)


@functools.cache
def build_tiny(family: str, seed: int = 0) -> TinyModel:
    if family not in BUILDERS:
        raise ValueError(f"no tiny builder for family {family!r}; builders: {sorted(BUILDERS)}")
    return BUILDERS[family](seed)


def save_tiny_checkpoint(family: str, directory: Path) -> Path:
    """The tiny model of `family` saved as a Hugging Face checkpoint directory (weights, processor)."""
    tiny = build_tiny(family)
    tiny.model.save_pretrained(directory)
    tiny.processor.save_pretrained(directory)
    return directory


def make_inputs(
    tiny: TinyModel, prompts: list[str], images: list[list[PIL.Image.Image]] | None = None
) -> BatchFeature:
    """Tokenize a batch (left padding, PyTorch tensors) ready for `tiny.model(**inputs)`.

    Prompts write each image as IMAGE and `images[i]` are the images of `prompts[i]`, in order. IMAGE
    becomes the table entry's image token, and the images reach the processor as the entry says
    (one list per prompt, or one image per prompt, with the entry's extra processor arguments).
    """
    architecture = tiny.architecture
    rows = images if images is not None else [[] for _ in prompts]
    if len(rows) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(rows)} image lists")
    for prompt, prompt_images in zip(prompts, rows, strict=True):
        if prompt.count(IMAGE) != len(prompt_images):
            raise ValueError(f"{prompt!r} has {prompt.count(IMAGE)} {IMAGE}, {len(prompt_images)} images")
    if not architecture.is_vision_language:
        if any(rows):
            raise ValueError(f"{tiny.family} is a text-only model")
        return BatchFeature(dict(tiny.tokenizer(prompts, padding=True, return_tensors="pt")))
    if not any(rows):
        return tiny.processor(text=prompts, padding=True, return_tensors="pt")
    texts = [prompt.replace(IMAGE, architecture.image_token or "") for prompt in prompts]
    batched: list[Any] = list(rows)
    if architecture.image_batching == "single":
        if any(len(prompt_images) != 1 for prompt_images in rows):
            raise ValueError(f"{tiny.family} takes exactly one image per prompt: {architecture.notes}")
        batched = [prompt_images[0] for prompt_images in rows]
    inputs = tiny.processor(
        text=texts, images=batched, padding=True, return_tensors="pt", **dict(architecture.processor_kwargs)
    )
    # PaliGemma's processor derives training labels from the prompt; they are not a model input here.
    inputs.pop("labels", None)
    return inputs
