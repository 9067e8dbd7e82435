"""The shipped form of the trained VLM: only what is not the base LM's, and how to rebuild the model.

A parts directory holds
    vision.safetensors  the vision tower and projector (Llava state-dict names: model.vision_tower.*,
                        model.multi_modal_projector.*)
    lora.safetensors    per adapted projection `<module>.lora_A` (rank x in) and `<module>.lora_B`
                        (out x rank), module named as in LlavaForConditionalGeneration
    vlm.json            format, tower shape, LoRA rank/alpha, base LM and the training record
Rebuilding = assemble the Llava around the base LM, load the vision tensors and add
`alpha / rank * B @ A` to each adapted weight. peft is needed to train, never to load: the result is
an ordinary LlavaForConditionalGeneration that `save_pretrained` exports as a plain HF checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from taskvec.models.architectures import architecture_for_class
from taskvec.vlm.architecture import IMAGE_TOKEN, VisionTowerShape, assemble_llava
from taskvec.vlm.processor import build_processor

PARTS_FORMAT = 1
VISION_FILE = "vision.safetensors"
LORA_FILE = "lora.safetensors"
CARD_FILE = "vlm.json"


class PartsError(ValueError):
    """A parts directory that does not fit the model it is applied to."""


def _vision_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the vision tower and projector, from the architecture table."""
    return tuple(f"{path}." for path in architecture_for_class(type(model).__name__).vision_paths)


def vision_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    prefixes = _vision_prefixes(model)
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
    tower: VisionTowerShape,
    *,
    lora_rank: int,
    lora_alpha: int,
    base_model: str,
    record: dict[str, Any] | None = None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(vision_tensors(model), str(directory / VISION_FILE), metadata={"format": str(PARTS_FORMAT)})
    lora = lora_tensors(model)
    if lora:
        save_file(lora, str(directory / LORA_FILE), metadata={"format": str(PARTS_FORMAT)})
    config: Any = model.config
    card = {
        "format": PARTS_FORMAT,
        "architecture": "LlavaForConditionalGeneration",
        "base_model": base_model,
        "image_token": IMAGE_TOKEN,
        "tower": tower.__dict__,
        "vision_feature_layer": config.vision_feature_layer,
        "lora": {"rank": lora_rank, "alpha": lora_alpha, "modules": len(lora) // 2} if lora else None,
        "training": record or {},
    }
    (directory / CARD_FILE).write_text(json.dumps(card, indent=1))


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
    """Load the vision tower and projector and merge the LoRA deltas into `model`, in place."""
    card = read_card(directory)
    vision = load_file(str(directory / VISION_FILE))
    state = model.state_dict()
    unexpected = [name for name in vision if name not in state]
    prefixes = _vision_prefixes(model)
    missing = [name for name in state if name.startswith(prefixes) and name not in vision]
    if unexpected or missing:
        raise PartsError(f"vision tensors do not fit: unexpected {unexpected[:3]}, missing {missing[:3]}")
    for name, value in vision.items():
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
    tower = VisionTowerShape(**card["tower"])
    model = assemble_llava(language_model, tokenizer, tower)
    if model.config.vision_feature_layer != card["vision_feature_layer"]:
        raise PartsError(f"parts use vision_feature_layer {card['vision_feature_layer']}")
    apply_parts(model, directory)
    return model.eval(), build_processor(tokenizer, tower)


def export_checkpoint(model: torch.nn.Module, processor: Any, directory: Path) -> Path:
    """An ordinary HF checkpoint directory (LlavaForConditionalGeneration + LlavaProcessor)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # type: ignore[operator]
    processor.save_pretrained(directory)
    return directory
