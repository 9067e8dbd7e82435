"""The explicit table of supported architectures.

Each entry says where a model keeps its decoder layers, final norm, unembedding, text model, vision
tower and projector, and how its processor wants images written in a prompt and passed in a batch.
Code outside this module asks the entry and never tests a family's name. We never guess by module
size: on Qwen2-VL the vision tower's ModuleList is longer than the text model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How a model numbers positions, which a hand-built decode step must reproduce:
# "rotary"/"absolute" take one index per token (absolute ones must skip left padding);
# "mrope" (Qwen2-VL) takes 3 indices per token offset by the rope deltas the prefill stored.
PositionStyle = Literal["rotary", "absolute", "mrope"]

# How a processor wants a batch's images: "per_prompt" one list of images per prompt (most
# processors); "single" exactly one image per prompt, passed as a flat list (FuyuProcessor).
ImageBatching = Literal["per_prompt", "single"]


class UnsupportedArchitectureError(ValueError):
    """Raised for a model class that has no entry in the architecture table."""


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
    # Where a mrope model keeps the per-row position offsets its last prefill computed.
    rope_deltas_path: str | None = None

    def __post_init__(self) -> None:
        if self.position_style == "mrope" and self.rope_deltas_path is None:
            raise ValueError(f"{self.family}: a mrope architecture needs rope_deltas_path")

    @property
    def is_vision_language(self) -> bool:
        return self.image_token is not None

    @property
    def vision_paths(self) -> tuple[str, ...]:
        """The vision tower and projector paths that are set, the modules vision training updates."""
        return tuple(path for path in (self.vision_tower_path, self.projector_path) if path is not None)


def _causal_lm(family: str, model_class: str) -> Architecture:
    return Architecture(family, model_class, "model.layers", "model.norm", "lm_head", text_model_path="model")


def _vlm(
    family: str,
    model_class: str,
    image_token: str,
    text_model: str = "model.language_model",
    norm_name: str = "norm",
    vision_tower: str | None = "model.vision_tower",
    projector: str | None = "model.multi_modal_projector",
    multi_image: bool = True,
    notes: str = "",
    position_style: PositionStyle = "rotary",
    bidirectional_prompt: bool = False,
    image_batching: ImageBatching = "per_prompt",
    processor_kwargs: tuple[tuple[str, object], ...] = (),
    rope_deltas_path: str | None = None,
) -> Architecture:
    return Architecture(
        family,
        model_class,
        f"{text_model}.layers",
        f"{text_model}.{norm_name}",
        "lm_head",
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
        rope_deltas_path=rope_deltas_path,
    )


def _idefics(family: str, model_class: str) -> Architecture:
    """Idefics-style: a `vision_model` tower, then a `connector` (perceiver or pixel shuffle)."""
    return _vlm(
        family,
        model_class,
        "<image>",
        text_model="model.text_model",
        vision_tower="model.vision_model",
        projector="model.connector",
    )


QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _qwen_vl(family: str, model_class: str) -> Architecture:
    """Qwen2-VL-style: the `visual` tower ends in its own `merger`, which projects into the LM."""
    return _vlm(
        family,
        model_class,
        QWEN_IMAGE,
        vision_tower="model.visual",
        projector="model.visual.merger",
        position_style="mrope",
        rope_deltas_path="model.rope_deltas",
    )


ARCHITECTURES: tuple[Architecture, ...] = (
    _vlm("llava", "LlavaForConditionalGeneration", "<image>"),
    _vlm("llava_next", "LlavaNextForConditionalGeneration", "<image>"),
    _vlm("llava_onevision", "LlavaOnevisionForConditionalGeneration", "<image>"),
    _idefics("idefics2", "Idefics2ForConditionalGeneration"),
    _idefics("idefics3", "Idefics3ForConditionalGeneration"),
    _idefics("smolvlm", "SmolVLMForConditionalGeneration"),
    _qwen_vl("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    _qwen_vl("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
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
    _vlm("gemma3", "Gemma3ForConditionalGeneration", "<start_of_image>"),
    _vlm(
        "paligemma",
        "PaliGemmaForConditionalGeneration",
        "<image>",
        bidirectional_prompt=True,
        notes="a prefix LM: prompt tokens attend to the whole prompt, so sweeps use the batched path",
    ),
    _causal_lm("gemma3_text", "Gemma3ForCausalLM"),
    _causal_lm("gemma", "GemmaForCausalLM"),
    _causal_lm("gemma2", "Gemma2ForCausalLM"),
    _causal_lm("llama", "LlamaForCausalLM"),
    _causal_lm("mistral", "MistralForCausalLM"),
    _causal_lm("qwen2", "Qwen2ForCausalLM"),
    _causal_lm("qwen3", "Qwen3ForCausalLM"),
    Architecture(
        "gpt2",
        "GPT2LMHeadModel",
        "transformer.h",
        "transformer.ln_f",
        "lm_head",
        position_style="absolute",
        text_model_path="transformer",
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
