"""The explicit table of supported architectures.

Each entry says where a model keeps its decoder layers, final norm and unembedding, and how its
processor wants images written in a prompt. We never guess by module size: on Qwen2-VL the vision
tower's ModuleList is longer than the text model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How a model numbers positions, which a hand-built decode step must reproduce:
# "rotary"/"absolute" take one index per token (absolute ones must skip left padding);
# "mrope" (Qwen2-VL) takes 3 indices per token offset by the rope deltas the prefill stored.
PositionStyle = Literal["rotary", "absolute", "mrope"]


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

    @property
    def is_vision_language(self) -> bool:
        return self.image_token is not None


def _causal_lm(family: str, model_class: str) -> Architecture:
    return Architecture(family, model_class, "model.layers", "model.norm", "lm_head")


def _vlm(
    family: str,
    model_class: str,
    image_token: str,
    text_model: str = "model.language_model",
    norm_name: str = "norm",
    multi_image: bool = True,
    notes: str = "",
    position_style: PositionStyle = "rotary",
    bidirectional_prompt: bool = False,
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
    )


QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

ARCHITECTURES: tuple[Architecture, ...] = (
    _vlm("llava", "LlavaForConditionalGeneration", "<image>"),
    _vlm("llava_next", "LlavaNextForConditionalGeneration", "<image>"),
    _vlm("llava_onevision", "LlavaOnevisionForConditionalGeneration", "<image>"),
    _vlm("idefics2", "Idefics2ForConditionalGeneration", "<image>", text_model="model.text_model"),
    _vlm("idefics3", "Idefics3ForConditionalGeneration", "<image>", text_model="model.text_model"),
    _vlm("smolvlm", "SmolVLMForConditionalGeneration", "<image>", text_model="model.text_model"),
    _vlm("qwen2_vl", "Qwen2VLForConditionalGeneration", QWEN_IMAGE, position_style="mrope"),
    _vlm("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", QWEN_IMAGE, position_style="mrope"),
    _vlm(
        "fuyu",
        "FuyuForCausalLM",
        "",
        norm_name="final_layernorm",
        multi_image=False,
        notes="FuyuProcessor takes one image per prompt and places it before the text",
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
        "gpt2", "GPT2LMHeadModel", "transformer.h", "transformer.ln_f", "lm_head", position_style="absolute"
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
