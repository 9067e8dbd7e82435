"""The embedded VLM's architecture: a genuine LlavaForConditionalGeneration around a causal LM.

The text model and unembedding are the causal LM's own modules (Gemma-3-270M for the default VLM,
a tiny Gemma3 in tests); the vision tower is `vision_tower.ImagenetColourTower` (frozen ImageNet
EfficientNet-Lite0 features and the picture's colours, 4 tokens per image) and the projector is LLaVA's
two-layer MLP. Nothing here is specific to Gemma except the defaults.

Image token: Gemma-3-270M's tokenizer has `<start_of_image>` (255999) but no `<image_soft_token>`
(the 270M text checkpoint stops at id 262143), and the handle writes images as "<image>" for every
LLaVA, so "<image>" is added as a special token (id 262144, the slot the multimodal Gemma-3
checkpoints give `<image_soft_token>`) and the embedding matrix grows by one zero row. A zero row
means the token's tied logit is exactly 0: it is never generated in practice, and the row carries no
trained weight (its input embedding is always overwritten by image features).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from tokenizers import AddedToken
from transformers import LlavaConfig, LlavaForConditionalGeneration

from taskvec.vlm.vision_tower import ImagenetColourConfig, ImagenetColourTower

IMAGE_TOKEN = "<image>"


def add_image_token(tokenizer: Any) -> int:
    """Add IMAGE_TOKEN as a special token (a no-op when present) and return its id."""
    existing = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if existing is None or existing == tokenizer.unk_token_id:
        token = AddedToken(IMAGE_TOKEN, special=True, normalized=False, lstrip=False, rstrip=False)
        tokenizer.add_special_tokens({"additional_special_tokens": [token]})
        existing = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False) != [existing]:
        raise ValueError(f"{IMAGE_TOKEN} does not encode to a single token in {type(tokenizer).__name__}")
    return int(existing)


def grow_vocabulary(language_model: Any, vocab_size: int) -> None:
    """Give the (tied) embedding `vocab_size` rows, new rows zero: deterministic, never predicted."""
    embeddings: Any = language_model.get_input_embeddings()
    old_size = int(embeddings.weight.shape[0])
    if vocab_size == old_size:
        return
    if vocab_size < old_size:
        raise ValueError(f"cannot shrink the vocabulary from {old_size} to {vocab_size}")
    language_model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        grown: Any = language_model.get_input_embeddings()
        grown.weight[old_size:] = 0.0
        output: Any = language_model.get_output_embeddings()
        if output is not None and output.weight.shape[0] == vocab_size:
            output.weight[old_size:] = 0.0


def llava_config(
    text_config: transformers.PreTrainedConfig, tower: ImagenetColourConfig, image_token_id: int
) -> LlavaConfig:
    config = LlavaConfig(
        text_config=text_config.to_dict(),
        vision_config=tower.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=tower.tokens_per_image,
        # The tower returns one state, its tokens, and has no CLS token to drop.
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", True)),
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def assemble_llava(
    language_model: torch.nn.Module,
    tokenizer: Any,
    tower: ImagenetColourConfig | None = None,
    seed: int = 0,
    *,
    imagenet_weights: bool = True,
) -> LlavaForConditionalGeneration:
    """A LlavaForConditionalGeneration whose text model and LM head ARE `language_model`'s modules.

    `language_model` is a *ForCausalLM (e.g. Gemma3ForCausalLM); its embeddings grow to the tokenizer
    (after IMAGE_TOKEN is added). The tower gets the installed ImageNet weights (random ones with
    `imagenet_weights=False`, for tests of the plumbing) and stays frozen; the projector is freshly
    initialised from `seed`. The Llava shell is built on the meta device and given the real modules,
    so the LM's weights are neither copied nor re-initialised.
    """
    tower = tower or ImagenetColourConfig()
    image_token_id = add_image_token(tokenizer)
    grow_vocabulary(language_model, len(tokenizer))
    text: Any = language_model
    text_config = text.config
    text_config.vocab_size = len(tokenizer)
    config = llava_config(text_config, tower, image_token_id)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.language_model = text.model
    model.lm_head = text.lm_head
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision_tower = ImagenetColourTower(tower)
        projector = transformers.models.llava.modeling_llava.LlavaMultiModalProjector(config)
    if imagenet_weights:
        vision_tower.load_imagenet_weights()
    vision_tower.requires_grad_(False)
    model.model.vision_tower = vision_tower
    model.model.multi_modal_projector = projector
    meta = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if meta:
        raise RuntimeError(f"assembled Llava still has meta tensors: {meta[:5]}")
    model.generation_config = text.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Same dtype as the LM (to() is annotated oddly in transformers, hence the plain Module call).
    torch.nn.Module.to(model, dtype=next(language_model.parameters()).dtype)
    model.eval()
    return model


def count_parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())
