"""Architectures outside the table that follow transformers' common layout.

Most image-text models in transformers share one layout: `model.language_model` holds the decoder
`layers` and final `norm`, `lm_head` sits on top, `model.vision_tower` and
`model.multi_modal_projector` bring the images in, and the processor names its `image_token`.
Text-only `*ForCausalLM` models keep `model.layers` and `model.norm`. A model whose class is not in
the table but passes every check of that layout gets an entry built from it, with a warning: the
layout says where the modules are, not that every step of the engine is exact for the family (the
table's entries are tested on tiny models, such an entry is not).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from taskvec.models.architectures import (
    Architecture,
    UnsupportedArchitectureError,
    architecture_for_class,
    supported_classes,
)

TEXT_MODEL = "model.language_model"
CAUSAL_LM_TEXT_MODEL = "model"
VISION_TOWER = "model.vision_tower"
PROJECTOR = "model.multi_modal_projector"
UNEMBEDDING = "lm_head"


class ConventionArchitectureWarning(UserWarning):
    """A model is used through transformers' common layout because its class is not in the table."""


def resolve_architecture(model: torch.nn.Module, processor: Any) -> Architecture:
    """The table's entry for the model's class, else one built from transformers' common layout
    (with a ConventionArchitectureWarning); raises UnsupportedArchitectureError, naming every check
    that failed, for a model that has neither."""
    model_class = type(model).__name__
    try:
        return architecture_for_class(model_class)
    except UnsupportedArchitectureError:
        pass
    architecture = architecture_by_convention(model, processor)
    warnings.warn(
        ConventionArchitectureWarning(
            f"{model_class} (family {architecture.family!r}) is used by convention, not in the table: "
            f"layers at {architecture.layers_path}, final norm at {architecture.norm_path}, "
            f"unembedding at {architecture.unembed_path}"
        ),
        stacklevel=2,
    )
    return architecture


def architecture_by_convention(model: torch.nn.Module, processor: Any) -> Architecture:
    """The entry transformers' common layout gives the model; raises UnsupportedArchitectureError."""
    if module_at(model, TEXT_MODEL) is not None:
        return _image_text_architecture(model, processor)
    is_causal_lm = type(model).__name__.endswith("ForCausalLM")
    if is_causal_lm and module_at(model, f"{CAUSAL_LM_TEXT_MODEL}.layers") is not None:
        return _causal_lm_architecture(model)
    causal_lm_problem = f"no {CAUSAL_LM_TEXT_MODEL}.layers" if is_causal_lm else "not a *ForCausalLM"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {type(model).__name__!r}: not in the table, and it follows neither "
        f"of transformers' common layouts: no {TEXT_MODEL} (image-text layout); "
        f"{causal_lm_problem} (causal-LM layout); {_table_classes()}"
    )


def _image_text_architecture(model: torch.nn.Module, processor: Any) -> Architecture:
    problems = _text_stack_problems(model, TEXT_MODEL)
    vision_tower = VISION_TOWER if module_at(model, VISION_TOWER) is not None else None
    projector = PROJECTOR if module_at(model, PROJECTOR) is not None else None
    if vision_tower is None and projector is None:
        problems.append(f"no {VISION_TOWER} nor {PROJECTOR} (nothing brings images into the text model)")
    image_token = getattr(processor, "image_token", None)
    if not isinstance(image_token, str) or not image_token:
        problems.append(
            f"the processor ({type(processor).__name__}) has no image_token string (found {image_token!r})"
        )
    _raise_if_any(model, problems)
    assert isinstance(image_token, str)
    return Architecture(
        _family(model),
        type(model).__name__,
        f"{TEXT_MODEL}.layers",
        f"{TEXT_MODEL}.norm",
        UNEMBEDDING,
        image_token,
        notes="by convention, not in the table: transformers' common image-text layout",
        bidirectional_prompt=_attends_bidirectionally(model),
        text_model_path=TEXT_MODEL,
        vision_tower_path=vision_tower,
        projector_path=projector,
    )


def _causal_lm_architecture(model: torch.nn.Module) -> Architecture:
    _raise_if_any(model, _text_stack_problems(model, CAUSAL_LM_TEXT_MODEL))
    return Architecture(
        _family(model),
        type(model).__name__,
        f"{CAUSAL_LM_TEXT_MODEL}.layers",
        f"{CAUSAL_LM_TEXT_MODEL}.norm",
        UNEMBEDDING,
        notes="by convention, not in the table: transformers' common causal-LM layout",
        bidirectional_prompt=_attends_bidirectionally(model),
        text_model_path=CAUSAL_LM_TEXT_MODEL,
    )


def _text_stack_problems(model: torch.nn.Module, text_model: str) -> list[str]:
    """What keeps the decoder stack at `text_model` from being used as the table's entries are."""
    problems: list[str] = []
    layers = module_at(model, f"{text_model}.layers")
    expected = getattr(_text_config(model), "num_hidden_layers", None)
    if layers is None:
        problems.append(f"no {text_model}.layers")
    elif not isinstance(layers, torch.nn.ModuleList):
        problems.append(f"{text_model}.layers is a {type(layers).__name__}, not a ModuleList")
    elif expected != len(layers):
        problems.append(f"{text_model}.layers has {len(layers)} layers but the text config says {expected}")
    if module_at(model, f"{text_model}.norm") is None:
        problems.append(f"no {text_model}.norm")
    if module_at(model, UNEMBEDDING) is None:
        problems.append(f"no {UNEMBEDDING}")
    # A decode step and left-padded batches are exact only for positions that shift with the padding
    # (rotary); learned absolute positions or Qwen's 3-D M-RoPE need an entry saying so.
    if module_at(model, f"{text_model}.rotary_emb") is None:
        problems.append(f"no {text_model}.rotary_emb (the convention assumes rotary positions)")
    inner = module_at(model, "model")
    if inner is not None and hasattr(inner, "rope_deltas"):
        problems.append("model.rope_deltas: 3-D M-RoPE positions need a table entry")
    return problems


def _raise_if_any(model: torch.nn.Module, problems: list[str]) -> None:
    if problems:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {type(model).__name__!r}: not in the table, and it does not "
            f"follow transformers' common layout: {'; '.join(problems)}; {_table_classes()}"
        )


def _table_classes() -> str:
    return f"the table's classes: {', '.join(supported_classes())}"


def module_at(root: torch.nn.Module, dotted_path: str) -> torch.nn.Module | None:
    target: Any = root
    for name in dotted_path.split("."):
        target = getattr(target, name, None)
        if target is None:
            return None
    return target if isinstance(target, torch.nn.Module) else None


def _text_config(model: torch.nn.Module) -> Any:
    config: Any = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _family(model: torch.nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return str(model_type) if model_type else type(model).__name__


def _attends_bidirectionally(model: torch.nn.Module) -> bool:
    # PaliGemma-style prefix LMs set this on their text config: prompt tokens see later prompt tokens.
    # Gemma 4's "vision" makes only each image's own tokens see each other, which keeps text causal.
    setting = getattr(_text_config(model), "use_bidirectional_attention", None)
    return setting is True or setting == "all"
