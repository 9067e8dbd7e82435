"""Benchmark: full-size VLMs with random weights on a GPU, or their memory estimated without one.

Builds LLaVA-1.5-7B, Idefics2-8B, Qwen2-VL-7B, Qwen2.5-VL-7B and Gemma-3-4B from their configs,
written out below (no hub access: each names the config.json it copies), with random weights:
speed and memory do not depend on the weights' values.

On a CUDA machine, per family and for bf16 and (with bitsandbytes installed) 4-bit NF4, first runs
`taskvec check` on the model (its table is printed, its "n of n pass" goes into the timing table;
random text prompts and the bare image query stand in for the checks' own prompts, which need a
tokenizer), so the numbers timed are proven on the same model and GPU; then prints the
build time, the weights' memory, and for a bare image query and a 5-shot image ICL prompt the
one-pass and batched layer sweeps over all layers: seconds and peak memory
(torch.cuda.max_memory_allocated). Pixels come from the checkpoint's own image-processor settings;
token ids are random text around the family's image tokens (no tokenizer without the hub), with the
lengths a real prompt has.

With --estimate (the default without CUDA) every model is built on the meta device and the table
shows parameters, weights in bf16 and NF4, and the KV cache of both prompts and of the one-pass
sweep, from these rules:
- bf16 weights: 2 bytes per parameter.
- NF4 weights: transformers' bitsandbytes rule quantizes every nn.Linear except the unembedding
  (and weights tied to it); a quantized weight costs 4 bits plus one float32 absmax per block of 64
  (bnb_4bit_use_double_quant off, transformers' default): 0.5625 bytes per parameter. Everything
  else (embeddings, unembedding, norms, convolutions, biases) stays bf16.
- KV cache: layers x 2 (keys, values) x kv_heads x head_dim x tokens x 2 bytes (bf16). Gemma-3's
  sliding-window layers keep at most `sliding_window` tokens.
- The one-pass sweep repeats the cache of the prompt minus its last token once per layer (one
  batch row per swept layer), so its cache is num_layers times that of the prompt.
- Tokens: an image is 576 tokens for LLaVA-1.5 (336 px, 14 px patches), 64 + 2 delimiters for
  Idefics2 (perceiver latents, no image splitting), 64 + 2 for Qwen2-VL and Qwen2.5-VL (a 224x224
  image: 16x16 patches merged 2x2), 256 + 4 for Gemma-3 (pooled SigLIP tokens, with the
  begin/end-of-image and blank-line tokens); text is 8 tokens for the query ("Q:<image>\\nA:" with
  its bos) and 10 per demonstration (its answer and the blank line after it).

A second table gives, per family and prompt, one copy of the cache the one-pass sweep repeats (the
prompt's minus its last token), all layers' copies, and the rows per chunk (and so the decode steps)
that `taskvec.engine.sweep_memory.rows_per_chunk` picks with the default budget
(DEFAULT_FREE_MEMORY_FRACTION of the free memory) on a 24 GiB card with bf16 or NF4 weights and an
80 GiB card with bf16 weights. Free memory is what `chunk_size` would read after the prompt's
forward: the card minus the weights, a 1 GiB CUDA context and the prefix's own cache; memory the
caching allocator still holds from that forward's activations is left out (it would only lower the
free memory, and the chunks with it).

    python bench/gpu.py                           # every family (falls back to --estimate without CUDA)
    python bench/gpu.py --estimate
    python bench/gpu.py --families llava-1.5-7b --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import transformers
from accelerate import init_empty_weights

from taskvec.checks import format_table, run_checks
from taskvec.checks.prompts import EncodedPrompts
from taskvec.engine import sweep_layers
from taskvec.engine.sweep_memory import DEFAULT_FREE_MEMORY_FRACTION, rows_per_chunk
from taskvec.models import ModelHandle, architecture_for_class

GIB = 1024**3
MIB = 1024**2
BF16 = torch.bfloat16
NF4_BYTES_PER_PARAMETER = 0.5 + 4 / 64  # 4-bit codes + a float32 absmax per 64-weight block
QUERY_TEXT_TOKENS = 8
DEMONSTRATION_TEXT_TOKENS = 10
SHOTS = 5
IMAGE_SIZE = 224  # the side of the random test images, before each family's own resizing


@dataclass(frozen=True)
class Family:
    name: str
    checkpoint: str
    model_class: type
    config: Callable[[], Any]
    image_block: Callable[[Any], list[int]]  # the token ids one image occupies in the prompt
    image_processor: Callable[[], Any]  # the checkpoint's preprocessor settings
    nested_images: bool = False  # the image processor takes one list of images per prompt


# ----------------------------------------------------------------------------------------- configs


def llava_config() -> Any:
    # llava-hf/llava-1.5-7b-hf config.json: Vicuna-7B text (Llama defaults but the padded vocabulary),
    # CLIP ViT-L/14 at 336 px, features of the second-to-last layer without CLS.
    return transformers.LlavaConfig(
        text_config={
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "vocab_size": 32064,
        },
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 768,
        },
        image_token_index=32000,
        pad_token_id=32001,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
        tie_word_embeddings=False,
    )


def idefics2_config() -> Any:
    # HuggingFaceM4/idefics2-8b config.json: Mistral-7B-v0.1 text (vocabulary 32003 with
    # <fake_token_around_image> 32000, <image> 32001, <end_of_utterance> 32002), SigLIP so400m at
    # 980 px, a 3-layer perceiver resampler to 64 latents (transformers' Idefics2PerceiverConfig
    # defaults are the checkpoint's).
    return transformers.Idefics2Config(
        text_config={
            "model_type": "mistral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5,
            "sliding_window": 4096,
            "vocab_size": 32003,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 980,
            "patch_size": 14,
        },
        perceiver_config={
            "hidden_size": 4096,
            "rms_norm_eps": 1e-5,
            "resampler_n_latents": 64,
            "resampler_depth": 3,
            "resampler_n_heads": 16,
            "resampler_head_dim": 96,
            "num_key_value_heads": 4,
        },
        image_token_id=32001,
        tie_word_embeddings=False,
    )


QWEN_VL_TOKENS = {
    # Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct config.json share these ids.
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


def qwen_text_config(model_type: str, max_positions: int) -> dict[str, Any]:
    # The Qwen2-7B / Qwen2.5-7B text decoder of both checkpoints, with mrope sections [16, 24, 24].
    return {
        "model_type": model_type,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6,
        "vocab_size": 152064,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    }


def qwen2_vl_config() -> Any:
    # Qwen/Qwen2-VL-7B-Instruct config.json: a 32-block ViT (width 1280, 14 px patches, 2x2 merge).
    return transformers.Qwen2VLConfig(
        text_config=qwen_text_config("qwen2_vl_text", 32768),
        vision_config={
            "depth": 32,
            "embed_dim": 1280,
            "hidden_size": 3584,
            "mlp_ratio": 4,
            "num_heads": 16,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        tie_word_embeddings=False,
        **QWEN_VL_TOKENS,
    )


def qwen2_5_vl_config() -> Any:
    # Qwen/Qwen2.5-VL-7B-Instruct config.json: window-attention ViT (SwiGLU 3420, full attention in
    # blocks 7, 15, 23, 31) over the Qwen2.5-7B decoder.
    return transformers.Qwen2_5_VLConfig(
        text_config=qwen_text_config("qwen2_5_vl_text", 128000),
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "hidden_act": "silu",
            "num_heads": 16,
            "out_hidden_size": 3584,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        tie_word_embeddings=False,
        **QWEN_VL_TOKENS,
    )


def gemma3_config() -> Any:
    # google/gemma-3-4b-it config.json names only these text keys (transformers' Gemma3TextConfig
    # defaults give the rest: 8 heads, 4 kv heads of 256, vocabulary 262208, 5 sliding layers per
    # full one); SigLIP so400m at 896 px pooled to 256 tokens. Its rope scaling (linear, 8x) changes
    # neither speed nor memory and is left out.
    return transformers.Gemma3Config(
        text_config={
            "model_type": "gemma3_text",
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "vocab_size": 262208,
            "sliding_window": 1024,
            "query_pre_attn_scalar": 256,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 896,
            "patch_size": 14,
            "vision_use_head": False,
        },
        mm_tokens_per_image=256,
        boi_token_index=255999,
        eoi_token_index=256000,
        image_token_index=262144,
    )


def qwen_image_block(config: Any) -> list[int]:
    return [config.vision_start_token_id, *[config.image_token_id] * 64, config.vision_end_token_id]


GEMMA_BLANK_LINE = 108  # "\n\n" in Gemma's vocabulary, around every image

FAMILIES: tuple[Family, ...] = (
    Family(
        "llava-1.5-7b",
        "llava-hf/llava-1.5-7b-hf",
        transformers.LlavaForConditionalGeneration,
        llava_config,
        lambda config: [config.image_token_index] * 576,
        lambda: transformers.CLIPImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        ),
    ),
    Family(
        "idefics2-8b",
        "HuggingFaceM4/idefics2-8b",
        transformers.Idefics2ForConditionalGeneration,
        idefics2_config,
        lambda config: [32000, *[config.image_token_id] * 64, 32000],
        lambda: transformers.Idefics2ImageProcessorPil(
            do_image_splitting=False, size={"shortest_edge": 378, "longest_edge": 980}
        ),
        nested_images=True,
    ),
    Family(
        "qwen2-vl-7b",
        "Qwen/Qwen2-VL-7B-Instruct",
        transformers.Qwen2VLForConditionalGeneration,
        qwen2_vl_config,
        qwen_image_block,
        transformers.Qwen2VLImageProcessorPil,
    ),
    Family(
        "qwen2.5-vl-7b",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        transformers.Qwen2_5_VLForConditionalGeneration,
        qwen2_5_vl_config,
        qwen_image_block,
        transformers.Qwen2VLImageProcessorPil,
    ),
    Family(
        "gemma-3-4b",
        "google/gemma-3-4b-it",
        transformers.Gemma3ForConditionalGeneration,
        gemma3_config,
        lambda config: [
            GEMMA_BLANK_LINE,
            config.boi_token_index,
            *[config.image_token_index] * config.mm_tokens_per_image,
            config.eoi_token_index,
            GEMMA_BLANK_LINE,
        ],
        lambda: transformers.Gemma3ImageProcessorPil(size={"height": 896, "width": 896}),
    ),
)


# ------------------------------------------------------------------------------ sizes and counting


def meta_model(family: Family) -> torch.nn.Module:
    """The model with every weight on the meta device (buffers such as rotary frequencies are real
    and small), the unembedding tied to the embedding where the config says so."""
    with init_empty_weights():
        model: Any = family.model_class(family.config())
    model.tie_weights()
    return model


def unquantized_linears(model: Any) -> set[str]:
    """Module names transformers' bitsandbytes integration leaves unquantized: the unembedding and
    whatever is tied to it."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return set(get_keys_to_not_convert(model))


def quantizable_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    skip = unquantized_linears(model)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name not in skip
    }


@dataclass(frozen=True)
class Prompt:
    shots: int
    tokens: int


def prompts(family: Family, config: Any) -> list[Prompt]:
    image = len(family.image_block(config))
    return [
        Prompt(0, QUERY_TEXT_TOKENS + image),
        Prompt(SHOTS, (SHOTS + 1) * image + SHOTS * DEMONSTRATION_TEXT_TOKENS + QUERY_TEXT_TOKENS),
    ]


def kv_cache_bytes(text_config: Any, tokens: int) -> int:
    head_dim = (
        getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    )
    per_token_and_layer = 2 * text_config.num_key_value_heads * head_dim * 2
    window = getattr(text_config, "sliding_window", None)
    layer_types = (
        getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
    )
    held = [min(tokens, window) if kind == "sliding_attention" and window else tokens for kind in layer_types]
    return per_token_and_layer * sum(held)


@dataclass(frozen=True)
class Sizes:
    """What the estimate tables need of one family, from its meta-device model."""

    parameters: int
    quantized: int  # weights of the linears NF4 would quantize
    text_config: Any
    prompts: list[Prompt]

    @property
    def layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    def weight_bytes(self, nf4: bool) -> float:
        if not nf4:
            return self.parameters * 2
        return self.quantized * NF4_BYTES_PER_PARAMETER + (self.parameters - self.quantized) * 2

    def copy_bytes(self, prompt: Prompt) -> int:
        """One copy of the cache the one-pass sweep repeats per row: the prompt's minus its last token."""
        return kv_cache_bytes(self.text_config, prompt.tokens - 1)


def family_sizes(family: Family) -> Sizes:
    model = meta_model(family)
    config = model.config
    return Sizes(
        parameters=sum(p.numel() for p in model.parameters()),
        quantized=sum(module.weight.numel() for module in quantizable_linears(model).values()),
        text_config=config.get_text_config(),
        prompts=prompts(family, config),
    )


def estimate_row(family: Family, sizes: Sizes) -> list[str]:
    text = sizes.text_config
    bare, shots = sizes.prompts
    sweep_cache = sizes.layers * sizes.copy_bytes(shots)
    return [
        family.name,
        f"{sizes.parameters / 1e9:.2f}",
        f"{sizes.quantized / 1e9:.2f}",
        f"{sizes.weight_bytes(nf4=False) / GIB:.1f}",
        f"{sizes.weight_bytes(nf4=True) / GIB:.1f}",
        f"{bare.tokens} / {shots.tokens}",
        f"{kv_cache_bytes(text, bare.tokens) / MIB:.0f}",
        f"{kv_cache_bytes(text, shots.tokens) / MIB:.0f}",
        f"{sweep_cache / GIB:.1f} ({sizes.layers} rows)",
    ]


ESTIMATE_COLUMNS = [
    "family",
    "params (B)",
    "quantized linear (B)",
    "bf16 weights (GiB)",
    "NF4 weights (GiB)",
    "tokens bare / 5-shot",
    "KV bare (MiB)",
    "KV 5-shot (MiB)",
    "one-pass sweep cache, 5-shot (GiB)",
]


def print_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")


# ------------------------------------------------------------------- sweep chunks on real cards

# (label, card's memory, weights in NF4): the cards as CUDA reports their total, in GiB.
CARDS: tuple[tuple[str, float, bool], ...] = (
    ("24 GB bf16", 24 * GIB, False),
    ("24 GB NF4", 24 * GIB, True),
    ("80 GB bf16", 80 * GIB, False),
)
CUDA_CONTEXT_BYTES = 1 * GIB  # the CUDA context and kernels' own memory, before any tensor


def default_chunk(sizes: Sizes, prompt: Prompt, card_bytes: float, nf4: bool) -> str:
    """'rows per chunk / decode steps' that `chunk_size` would choose with no budget given.

    It decides after the prompt's forward, so the free memory it reads already lacks the weights,
    the CUDA context and the prefix's own cache (the one every chunk copies); the caching
    allocator's hold on the freed activations of that forward is left out (it only lowers free).
    """
    copy = sizes.copy_bytes(prompt)
    free = card_bytes - sizes.weight_bytes(nf4) - CUDA_CONTEXT_BYTES - copy
    if free <= 0:
        return "does not fit"
    rows = rows_per_chunk(copy, sizes.layers, int(free * DEFAULT_FREE_MEMORY_FRACTION))
    return f"{rows} / {math.ceil(sizes.layers / rows)}"


def chunk_row(family: Family, sizes: Sizes, prompt: Prompt) -> list[str]:
    copy = sizes.copy_bytes(prompt)
    return [
        family.name,
        "bare query" if prompt.shots == 0 else f"{prompt.shots}-shot",
        str(prompt.tokens),
        f"{copy / MIB:.1f}",
        f"{sizes.layers * copy / GIB:.2f} ({sizes.layers})",
        *[default_chunk(sizes, prompt, card, nf4) for _, card, nf4 in CARDS],
    ]


CHUNK_COLUMNS = [
    "family",
    "prompt",
    "tokens",
    "one copy of the prefix cache (MiB)",
    "all layers' copies (GiB, rows)",
    *[f"rows per chunk / decode steps, {label}" for label, _, _ in CARDS],
]


def estimate(families: Sequence[Family]) -> None:
    sizes = {family.name: family_sizes(family) for family in families}
    print_table(ESTIMATE_COLUMNS, [estimate_row(family, sizes[family.name]) for family in families])
    print(
        f"\nOne-pass sweep chunks with the default budget ({DEFAULT_FREE_MEMORY_FRACTION:g} of the free "
        f"memory; free = card - weights - {CUDA_CONTEXT_BYTES / GIB:g} GiB CUDA context - the prefix's "
        "cache):\n"
    )
    rows = [
        chunk_row(family, sizes[family.name], prompt)
        for family in families
        for prompt in sizes[family.name].prompts
    ]
    print_table(CHUNK_COLUMNS, rows)


# ------------------------------------------------------------------------------- the GPU benchmark


def _random_weight(shape: torch.Size, device: torch.device) -> torch.Tensor:
    # Matrices N(0, 0.02) as initialisers draw them, vectors (norm scales, biases) ones: activations
    # stay finite, which is all that speed needs.
    if len(shape) < 2:
        return torch.ones(shape, dtype=BF16, device=device)
    return torch.empty(shape, dtype=BF16, device=device).normal_(0.0, 0.02)


def _swap_in_4bit_linears(model: torch.nn.Module, device: torch.device) -> None:
    import bitsandbytes as bnb

    for name, linear in quantizable_linears(model).items():
        parent_name, _, leaf = name.rpartition(".")
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=BF16,
            compress_statistics=False,
            quant_type="nf4",
            device="meta",
        )
        # Params4bit quantizes when moved to the GPU: drawn there, each matrix exists in bf16 only
        # while it is being quantized.
        weight = bnb.nn.Params4bit(
            _random_weight(linear.weight.shape, device),
            requires_grad=False,
            compress_statistics=False,
            quant_type="nf4",
            module=quantized,
        )
        quantized.weight = weight.to(device)
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(
                _random_weight(linear.bias.shape, device), requires_grad=False
            )
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, quantized)


def _materialise(model: Any, device: torch.device) -> None:
    for name, parameter in list(model.named_parameters()):
        if parameter.is_meta:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            module._parameters[leaf] = torch.nn.Parameter(
                _random_weight(parameter.shape, device), requires_grad=False
            )
    for name, buffer in list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer.to(device)
    model.tie_weights()
    left = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    assert not left, f"weights left on the meta device: {left[:5]}"


def build_on_gpu(family: Family, quantize: bool, device: torch.device) -> tuple[Any, float]:
    """The model with random weights on the GPU, and the seconds that took."""
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    model = meta_model(family)
    if quantize:
        _swap_in_4bit_linears(model, device)
    _materialise(model, device)
    model.eval()
    torch.cuda.synchronize(device)
    return model, time.perf_counter() - start


def random_image(seed: int) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels, "RGB")


def image_token_id(config: Any) -> int:
    value = getattr(config, "image_token_id", None)
    return int(value if value is not None else config.image_token_index)


def prompt_inputs(family: Family, model: Any, shots: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Input ids (random text around the images' tokens) and the image processor's pixels."""
    config = model.config
    generator = np.random.default_rng(shots)

    def text(count: int) -> list[int]:
        return [int(i) for i in generator.integers(1000, 20000, size=count)]

    block = family.image_block(config)
    ids = [token for _ in range(shots) for token in (*block, *text(DEMONSTRATION_TEXT_TOKENS))]
    ids += [*block, *text(QUERY_TEXT_TOKENS)]
    input_ids = torch.tensor([ids], device=device)
    images = [random_image(seed) for seed in range(shots + 1)]
    pixels = family.image_processor()(
        images=[images] if family.nested_images else images, return_tensors="pt"
    )
    accepted = inspect.signature(model.forward).parameters
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    for key, value in pixels.items():
        if key in accepted:
            inputs[key] = value.to(device=device, dtype=BF16 if value.is_floating_point() else value.dtype)
    image_tokens = (input_ids == image_token_id(config)).long()
    # Gemma-3's image tokens attend to each other both ways, marked by token type 1; Qwen2-VL's
    # mrope positions follow the image tokens, marked by modality type 1.
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in accepted:
            inputs[key] = image_tokens
    return inputs


def measure(run: Callable[[], Any], repeats: int, device: torch.device) -> str:
    """'seconds / peak GiB' of the fastest of `repeats` runs after a warm-up, or why it failed."""
    try:
        run()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return f"{min(times):.2f} s / {torch.cuda.max_memory_allocated(device) / GIB:.1f} GiB"
    except torch.cuda.OutOfMemoryError:
        return "out of memory"
    except ValueError as error:  # a sweep method the family does not allow
        return f"n/a ({error})"
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def check_prompts(family: Family, handle: ModelHandle, device: torch.device) -> EncodedPrompts:
    """Random text prompts of three lengths (batched by the checks with left padding) and the bare
    image query: the model has no tokenizer to write the checks' own prompts."""
    generator = np.random.default_rng(0)
    texts = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for ids in (
            torch.tensor([generator.integers(1000, 20000, size=length).tolist()], device=device)
            for length in (QUERY_TEXT_TOKENS, QUERY_TEXT_TOKENS + 2 * DEMONSTRATION_TEXT_TOKENS, 13)
        )
    ]
    image = prompt_inputs(family, handle.model, 0, device)
    return EncodedPrompts(handle, {"text": texts}, {"text": texts[1], "image": image})


def engine_checks(family: Family, handle: ModelHandle, device: torch.device) -> str:
    """`taskvec check` on the model about to be timed: its table printed, 'n of n pass' returned."""
    checks = run_checks(handle, prompts=check_prompts(family, handle, device))
    print(format_table(checks) + "\n")
    return checks.headline().removeprefix("engine checks on this model: ")


def benchmark_family(
    family: Family, quantize: bool, repeats: int, device: torch.device, check: bool = True
) -> list[list[str]]:
    weights_kind = "nf4" if quantize else "bf16"
    before = torch.cuda.memory_allocated(device)
    try:
        model, seconds = build_on_gpu(family, quantize, device)
    except torch.cuda.OutOfMemoryError:
        return [[family.name, weights_kind, "out of memory", "", "", "", "", "", ""]]
    weights = (torch.cuda.memory_allocated(device) - before) / GIB
    handle = ModelHandle(model, None, architecture_for_class(type(model).__name__), family.name)
    checked = engine_checks(family, handle, device) if check else "not run"
    vectors = torch.randn(handle.num_layers, handle.hidden_size, generator=torch.Generator().manual_seed(0))
    rows = []
    for prompt in prompts(family, model.config):
        inputs = prompt_inputs(family, model, prompt.shots, device)
        assert inputs["input_ids"].shape[1] == prompt.tokens
        sweeps = [
            measure(functools.partial(sweep_layers, handle, inputs, vectors, method=method), repeats, device)
            for method in ("one_pass", "batched")
        ]
        label = "bare query" if prompt.shots == 0 else f"{prompt.shots}-shot"
        rows.append(
            [
                family.name,
                weights_kind,
                f"{seconds:.1f}",
                f"{weights:.1f}",
                checked,
                label,
                str(prompt.tokens),
                *sweeps,
            ]
        )
    del handle, model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


GPU_COLUMNS = [
    "family",
    "weights",
    "build (s)",
    "weights (GiB)",
    "engine checks",
    "prompt",
    "tokens",
    "one-pass sweep (s / peak)",
    "batched sweep (s / peak)",
]


def benchmark(families: Sequence[Family], repeats: int, check: bool = True) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        import bitsandbytes  # noqa: F401

        modes = [False, True]
    except ImportError:
        print("bitsandbytes is not installed: bf16 only")
        modes = [False]
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    print(f"{torch.cuda.get_device_name(device)}, {versions}")
    rows = [
        row
        for family in families
        for quantize in modes
        for row in benchmark_family(family, quantize, repeats, device, check)
    ]
    print_table(GPU_COLUMNS, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--estimate", action="store_true", help="memory from the configs, on the meta device")
    parser.add_argument("--families", nargs="+", choices=[family.name for family in FAMILIES])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per sweep (the fastest is shown)")
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="time the sweeps without running `taskvec check` on each model",
    )
    args = parser.parse_args()
    families = [family for family in FAMILIES if args.families is None or family.name in args.families]
    if not args.estimate and not torch.cuda.is_available():
        print("No CUDA device: printing the --estimate table instead.\n")
        args.estimate = True
    if args.estimate:
        estimate(families)
    else:
        benchmark(families, args.repeats, check=not args.no_check)


if __name__ == "__main__":
    main()
