"""The explicit table of supported architectures.

Each entry says where a model keeps its decoder layers, final norm, unembedding, text model, vision
tower and projector, and how its processor wants images written in a prompt and passed in a batch.
Code outside this module asks the entry and never tests a family's name. We never guess by module
size: on Qwen2-VL the vision tower's ModuleList is longer than the text model's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

# How a model numbers positions, which a hand-built decode step must reproduce:
# "rotary"/"absolute" take one index per token (absolute ones must skip left padding);
# "mrope" (Qwen2-VL) takes 3 indices per token, which text after an image continues from the image's
# grid; only the model's rope index method over the whole prompt numbers them exactly.
PositionStyle = Literal["rotary", "absolute", "mrope"]

# How a processor wants a batch's images: "per_prompt" one list of images per prompt (most
# processors); "single" exactly one image per prompt, passed as a flat list (FuyuProcessor).
ImageBatching = Literal["per_prompt", "single"]


class UnsupportedArchitectureError(ValueError):
    """Raised for a model class that has no entry in the architecture table."""


# Text models whose activations exceed fp16's range (Gemma 2-4: scaled embeddings and norms), by the
# model_type of their config. A VLM of any family built on one (a LLaVA, PaliGemma or Idefics around
# a Gemma) overflows as well, so the fp16 check reads the text config, not only the outer class.
FP16_OVERFLOWING_TEXT_MODELS = frozenset({"gemma2", "gemma3_text", "gemma4_text"})


@dataclass(frozen=True)
class AttentionOutputNorm:
    """A norm applied to the attention block's output before it joins the residual stream.

    `path` names it relative to a decoder layer. `only_with` names a sibling module whose presence
    tells that layout apart: Llama, Qwen and Gemma 1 call their pre-MLP norm
    `post_attention_layernorm` too, and only the Gemma 2-4 layers, which normalise the attention
    output, also have `pre_feedforward_layernorm`. The rule reads the decoder layer itself because
    a VLM class says nothing of its language model: LLaVA, PaliGemma or Idefics may wrap a Gemma 2/3.
    """

    path: str
    only_with: str | None = None


POST_ATTENTION_NORM = AttentionOutputNorm("post_attention_layernorm", only_with="pre_feedforward_layernorm")


@dataclass(frozen=True)
class Architecture:
    family: str
    model_class: str
    layers_path: str
    norm_path: str
    unembed_path: str
    # Text the model's processor expands into image tokens; None for text-only models.
    image_token: str | None = None
    # Whether the processor accepts several images in one prompt (image ICL needs it).
    multi_image: bool = True
    notes: str = ""
    position_style: PositionStyle = "rotary"
    # Prefix LMs (PaliGemma) let prompt tokens attend to later prompt tokens, so patching the last
    # token changes earlier ones too and the one-pass sweep's shortcut does not apply.
    bidirectional_prompt: bool = False
    # The text model (the decoder stack without the LM head), where LoRA adapters go.
    text_model_path: str | None = None
    # The vision encoder and the module mapping its features into the text model's embedding space;
    # a projector may live inside the tower (Qwen2-VL's merger), and Fuyu has a projector only.
    vision_tower_path: str | None = None
    projector_path: str | None = None
    image_batching: ImageBatching = "per_prompt"
    # Extra keyword arguments the processor needs whenever it is given images.
    processor_kwargs: tuple[tuple[str, object], ...] = ()
    # A mrope model's method numbering a whole prompt's positions from its input_ids and image grids
    # (Qwen's get_rope_index), returning (position_ids [3, batch, length], deltas).
    rope_index_path: str | None = None
    # False when a hand-built decode step on a prefix's KV cache cannot reproduce a full forward
    # exactly; sweeps then use the batched path. (Every entry's step is exact today, tests/test_positions.py.)
    cached_step: bool = True
    # Processor keyword arguments that make image handling match the paper (e.g. SmolVLM without
    # image splitting); a user's processor_kwargs override them.
    image_defaults: tuple[tuple[str, object], ...] = ()
    # The same, for settings a processor reads only from its image processor's attributes, so they
    # must be set there once the processor is loaded: Idefics2Processor counts an image's tokens from
    # `image_processor.do_image_splitting`, and a call argument would change the pixels only.
    image_processor_defaults: tuple[tuple[str, object], ...] = ()
    # Activations exceed fp16's range (Gemma's scaled embeddings and norms): fp16 is refused.
    fp16_overflows: bool = False
    # The position id of a prompt's first token: PaliGemma's forward and generation number from 1.
    first_position: int = 0
    # Whether the forward takes a prefix LM's prefix from token_type_ids (0: the prompt, attended both
    # ways; 1: the causal suffix generation appends), which the processor writes only with images
    # (PaliGemma's refuses text alone). Prompts the tokenizer encodes get zeros: without them the
    # mask depends on whether the forward builds one at all, causal for a padded batch or under eager
    # attention, bidirectional for an unpadded prompt under sdpa.
    prefix_token_types: bool = False
    # Whether a decode row that replaces the residual of its only recomputed token at layer l may skip
    # layers 0..l, whose outputs the patch overwrites. False where a later layer reads an earlier
    # layer's keys and values of that token (Gemma 4's num_kv_shared_layers).
    skips_lower_layers: bool = True
    # Where, relative to one decoder layer, the attention output projection sits: its input is the
    # heads' outputs side by side, where function vectors read and replace one head (engine/heads.py).
    # The first path a layer has is taken; Mllama's cross-attention layers have another name for it.
    attention_output_paths: tuple[str, ...] = ("self_attn.o_proj",)
    # What lies between the attention block's output and the residual stream, relative to a decoder
    # layer: a norm (Gemma 2-4 layers, in whichever class wraps them), or a scalar whose tanh scales
    # it (Mllama's cross-attention layers). Function vectors map head outputs through them
    # (engine/attention_residual.py).
    attention_output_norm: AttentionOutputNorm | None = POST_ATTENTION_NORM
    attention_output_gate_path: str | None = None
    # The first transformers release whose model class runs (Llama 4's forward fails before 5.25):
    # an older one is refused when the model loads, with what to install.
    min_transformers: str | None = None

    def __post_init__(self) -> None:
        if self.position_style == "mrope" and self.rope_index_path is None:
            raise ValueError(f"{self.family}: a mrope architecture needs rope_index_path")

    @property
    def is_vision_language(self) -> bool:
        return self.image_token is not None

    @property
    def vision_paths(self) -> tuple[str, ...]:
        """The vision tower and projector paths that are set, the modules vision training updates."""
        return tuple(path for path in (self.vision_tower_path, self.projector_path) if path is not None)


def _causal_lm(family: str, model_class: str, fp16_overflows: bool = False) -> Architecture:
    return Architecture(
        family,
        model_class,
        "model.layers",
        "model.norm",
        "lm_head",
        text_model_path="model",
        fp16_overflows=fp16_overflows,
    )


def _vlm(
    family: str,
    model_class: str,
    image_token: str,
    text_model: str = "model.language_model",
    norm_name: str = "norm",
    unembed: str = "lm_head",
    vision_tower: str | None = "model.vision_tower",
    projector: str | None = "model.multi_modal_projector",
    multi_image: bool = True,
    notes: str = "",
    position_style: PositionStyle = "rotary",
    bidirectional_prompt: bool = False,
    image_batching: ImageBatching = "per_prompt",
    processor_kwargs: tuple[tuple[str, object], ...] = (),
    rope_index_path: str | None = None,
    cached_step: bool = True,
    image_defaults: tuple[tuple[str, object], ...] = (),
) -> Architecture:
    return Architecture(
        family,
        model_class,
        f"{text_model}.layers",
        f"{text_model}.{norm_name}",
        unembed,
        image_token,
        multi_image,
        notes,
        position_style,
        bidirectional_prompt,
        text_model_path=text_model,
        vision_tower_path=vision_tower,
        projector_path=projector,
        image_batching=image_batching,
        processor_kwargs=processor_kwargs,
        rope_index_path=rope_index_path,
        cached_step=cached_step,
        image_defaults=image_defaults,
    )


# The checkpoints' processors split each image into tiles plus the whole image; the paper's code
# turns that off for Idefics2 (64 tokens per image instead of 320). Idefics3 and SmolVLM take the
# same option (the whole image at their `max_image_size` instead of a grid of tiles plus it).
WITHOUT_IMAGE_SPLITTING: tuple[tuple[str, object], ...] = (("do_image_splitting", False),)


def _idefics(family: str, model_class: str, image_splitting_by_attribute: bool = False) -> Architecture:
    """Idefics-style: a `vision_model` tower, then a `connector` (perceiver or pixel shuffle)."""
    architecture = _vlm(
        family,
        model_class,
        "<image>",
        text_model="model.text_model",
        vision_tower="model.vision_model",
        projector="model.connector",
    )
    if image_splitting_by_attribute:
        return replace(architecture, image_processor_defaults=WITHOUT_IMAGE_SPLITTING)
    return replace(architecture, image_defaults=WITHOUT_IMAGE_SPLITTING)


QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# Qwen's processors resize each image to any pixel count within [shortest_edge, longest_edge] (the
# checkpoints allow up to ~1M pixels, so a large photo costs >1k tokens); pinning both to 224x224
# gives every image about as many tokens as a 224x224 one: 64 on Qwen2-VL and Qwen2.5-VL (28-pixel
# merged patches), 49 on Qwen3-VL (32-pixel).
QWEN_PIXELS = 224 * 224
QWEN_IMAGE_DEFAULTS: tuple[tuple[str, object], ...] = (
    ("size", {"shortest_edge": QWEN_PIXELS, "longest_edge": QWEN_PIXELS}),
)


def _qwen_vl(family: str, model_class: str, notes: str = "") -> Architecture:
    """Qwen2-VL-style: the `visual` tower ends in its own `merger`, which projects into the LM."""
    return _vlm(
        family,
        model_class,
        QWEN_IMAGE,
        vision_tower="model.visual",
        projector="model.visual.merger",
        notes=notes,
        position_style="mrope",
        rope_index_path="model.get_rope_index",
        image_defaults=QWEN_IMAGE_DEFAULTS,
    )


ARCHITECTURES: tuple[Architecture, ...] = (
    _vlm("llava", "LlavaForConditionalGeneration", "<image>"),
    _vlm(
        "llava_next",
        "LlavaNextForConditionalGeneration",
        "<image>",
        notes="anyres tiling gives ~1.2k tokens per 224px image (1176 for 224x224 with LLaVA-1.6's "
        "pinpoints) and no processor keyword lowers it: the model derives the tile grid from "
        "config.image_grid_pinpoints, so a processor given other pinpoints sends tiles it misreads",
    ),
    _vlm("llava_onevision", "LlavaOnevisionForConditionalGeneration", "<image>"),
    _idefics("idefics2", "Idefics2ForConditionalGeneration", image_splitting_by_attribute=True),
    _idefics("idefics3", "Idefics3ForConditionalGeneration"),
    _idefics("smolvlm", "SmolVLMForConditionalGeneration"),
    _qwen_vl("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    _qwen_vl("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    _qwen_vl(
        "qwen3_vl",
        "Qwen3VLForConditionalGeneration",
        notes="DeepStack adds vision features to the first decoder layers' outputs at image positions "
        "after the layers' forward hooks: recorded residuals (like transformers' hidden_states) omit them",
    ),
    _vlm("internvl", "InternVLForConditionalGeneration", "<IMG_CONTEXT>"),
    _vlm(
        "mistral3",
        "Mistral3ForConditionalGeneration",
        "[IMG]",
        notes="its processor (PixtralProcessor) needs torchvision",
    ),
    replace(
        _vlm(
            "llama4",
            "Llama4ForConditionalGeneration",
            "<|image|>",
            # No inner `model`: the text model is a whole Llama4ForCausalLM, with its own lm_head.
            text_model="language_model.model",
            unembed="language_model.lm_head",
            vision_tower="vision_model",
            projector="multi_modal_projector",
            notes="its image processor (Llama4ImageProcessor) needs torchvision",
        ),
        min_transformers="5.25",
    ),
    replace(
        _vlm(
            "mllama",
            "MllamaForConditionalGeneration",
            "<|image|>",
            vision_tower="model.vision_model",
            notes="images enter through cross-attention decoder layers, which a forward without images "
            "skips; a decode step needs the last row of cross_attention_mask",
        ),
        attention_output_paths=("self_attn.o_proj", "cross_attn.o_proj"),
        attention_output_gate_path="cross_attn_attn_gate",
        # A patch on a cross-attention layer, which a text-only forward skips, overwrites nothing.
        skips_lower_layers=False,
    ),
    replace(
        _vlm(
            "fuyu",
            "FuyuForCausalLM",
            "",
            norm_name="final_layernorm",
            # Fuyu has no vision encoder: one linear layer embeds the raw image patches.
            vision_tower=None,
            projector="model.vision_embed_tokens",
            multi_image=False,
            notes="FuyuProcessor takes one image per prompt and places it before the text",
            image_batching="single",
            processor_kwargs=(("return_legacy_image_output", False),),
        ),
        # The text model is a Persimmon, whose attention calls its output projection `dense`.
        attention_output_paths=("self_attn.dense",),
    ),
    replace(_vlm("gemma3", "Gemma3ForConditionalGeneration", "<start_of_image>"), fp16_overflows=True),
    replace(
        _vlm(
            "gemma4",
            "Gemma4ForConditionalGeneration",
            "<|image|>",
            # The soft tokens go through `embed_vision` (a norm and one linear map) into the text model.
            projector="model.embed_vision",
            notes="images enter as soft tokens that attend to each other bidirectionally; the last "
            "decoder layers may reuse earlier layers' keys and values (num_kv_shared_layers)",
        ),
        fp16_overflows=True,
        skips_lower_layers=False,
    ),
    replace(
        _vlm(
            "paligemma",
            "PaliGemmaForConditionalGeneration",
            "<image>",
            bidirectional_prompt=True,
            notes="a prefix LM: prompt tokens attend to the whole prompt, so sweeps use the batched path",
        ),
        # PaliGemma 2 (the same class) is built on Gemma 2.
        fp16_overflows=True,
        first_position=1,
        prefix_token_types=True,
    ),
    _causal_lm("gemma3_text", "Gemma3ForCausalLM", fp16_overflows=True),
    _causal_lm("gemma", "GemmaForCausalLM"),
    _causal_lm("gemma2", "Gemma2ForCausalLM", fp16_overflows=True),
    _causal_lm("llama", "LlamaForCausalLM"),
    _causal_lm("mistral", "MistralForCausalLM"),
    _causal_lm("qwen2", "Qwen2ForCausalLM"),
    _causal_lm("qwen3", "Qwen3ForCausalLM"),
    _causal_lm("qwen3_moe", "Qwen3MoeForCausalLM"),
    Architecture(
        "gpt2",
        "GPT2LMHeadModel",
        "transformer.h",
        "transformer.ln_f",
        "lm_head",
        position_style="absolute",
        text_model_path="transformer",
        # A Conv1D (a linear layer with its weight transposed), not an nn.Linear.
        attention_output_paths=("attn.c_proj",),
    ),
)

_BY_CLASS = {entry.model_class: entry for entry in ARCHITECTURES}


def supported_classes() -> list[str]:
    return [entry.model_class for entry in ARCHITECTURES]


def architecture_for_class(model_class: str) -> Architecture:
    try:
        return _BY_CLASS[model_class]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_class!r}; supported: {', '.join(supported_classes())}"
        ) from None
