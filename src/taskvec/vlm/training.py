"""Training the embedded VLM on CPU: two seeded, resumable stages on the frozen tower's cached tokens.

1. `align` (LLaVA's pretraining, without the LM in the loop): projector only. Each image's projected
   tokens regress toward the LM's input embeddings of the entity's name (its tokens repeated over
   the image slots), with a classification term over all names. Milliseconds per batch. The LM then
   reads a picture much as it reads its name: with the projector alone, image in-context learning on
   the six paper tasks reached 0.22, and a further stage of next-token loss on captions (LM frozen)
   halved it and lost held-out styles (bench/NOTES.md), so there is no such stage.
2. `instruct` (LLaVA's instruction tuning): LoRA on the LM's attention (peft), projector frozen by
   default (`TrainConfig.instruct_trains_projector`), on image-grounded questions and captions (name,
   kind of picture) and on in-context learning with text and with image demonstrations of tasks
   that are not the evaluation tasks (`data.InstructMix`). Text steps add a KL term toward the base
   LM (adapters off) at the answer positions, so text in-context learning holds while the LM's
   weights move; image in-context steps add a KL term toward the base LM reading the same prompt
   with the entities' names in place of the pictures.

The tower (ImageNet EfficientNet-Lite0 + the picture's colours) is never trained: its tokens for every
training picture and `TrainConfig.feature_copies` augmented copies are computed once
(`cached_features`), and each step draws one view per picture.

A checkpoint (safetensors of the trained tensors and the optimizer's moments, JSON for the rest; no
pickle) is written every `checkpoint_every` steps and at the end of each stage; the end of a stage is
also kept as `after-<stage>/`, so a later stage can be retrained alone (`restart_after`). Batches and
views are drawn from (seed, step), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from taskvec.models.architectures import architecture_for_class
from taskvec.models.handle import resolve_attribute
from taskvec.progress import progress_counter
from taskvec.vlm.batches import TrainingBatch, answer_logits, answer_loss, collate, distillation_loss
from taskvec.vlm.cached_features import TowerTokens
from taskvec.vlm.data import (
    DEFAULT_HELD_OUT,
    EntityImage,
    Example,
    InstructMix,
    instruct_examples,
    training_icl_tasks,
)
from taskvec.vlm.imagenet_encoder import IMAGE_SIDE
from taskvec.vlm.vision_tower import ImagenetColourConfig

STAGES = ("align", "instruct")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_STATE_FILE = "state.json"
_TRAINED_FILE = "trained.safetensors"
_OPTIMIZER_FILE = "optimizer.safetensors"
_STAGE_END_PREFIX = "after-"
# The files of one checkpoint, the state file last (it describes the tensors before it).
_CHECKPOINT_FILES = (_TRAINED_FILE, _OPTIMIZER_FILE, _STATE_FILE)


@dataclass
class StageSettings:
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 20


@dataclass
class TowerSettings:
    """The frozen tower's shape (`vision_tower.ImagenetColourConfig`); 2 x 2 = 4 tokens per image."""

    grid: int = 2
    colour_side: int = 8
    colour_scale: float = 4.0
    image_size: int = IMAGE_SIDE

    def config(self) -> ImagenetColourConfig:
        return ImagenetColourConfig(
            grid=self.grid,
            colour_side=self.colour_side,
            colour_scale=self.colour_scale,
            image_size=self.image_size,
        )


@dataclass
class TrainConfig:
    seed: int = 0
    # Budget for <= 90 minutes on 2 cores, measured on the real model (bench/NOTES.md): align 40 s,
    # 3.2 s per instruct step, then naming every picture (about 4.5 minutes): 29 minutes in all.
    align: StageSettings = field(default_factory=lambda: StageSettings(2000, 64, 1e-3, 50))
    # batch_size counts question steps; in-context steps use `instruct_mix.icl_batch_size`.
    instruct: StageSettings = field(default_factory=lambda: StageSettings(450, 16, 4e-4, 30))
    # Weight of the align stage's regression toward the name embeddings against its classification
    # term (the from-scratch tower of the first default VLM needed 5 for the LM to read its tokens).
    align_regression_weight: float = 5.0
    lora_rank: int = 8
    lora_alpha: int = 16
    # Whether the instruct stage trains the projector beside the LoRA adapters. Frozen, the pictures
    # stay tokens the language model reads as their names, which in-context learning builds on.
    instruct_trains_projector: bool = False
    weight_decay: float = 0.05
    checkpoint_every: int = 50
    # Augmented copies of each training picture in the token cache, beside the picture itself.
    feature_copies: int = 3
    instruct_mix: InstructMix = field(default_factory=InstructMix)
    held_out: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_HELD_OUT))
    tower: TowerSettings = field(default_factory=TowerSettings)

    def stage(self, name: str) -> StageSettings:
        settings: StageSettings = getattr(self, name)
        return settings

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainState:
    stage: str = STAGES[0]
    step: int = 0  # steps done in `stage`
    finished: bool = False
    losses: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in STAGES})
    seconds: dict[str, float] = field(default_factory=lambda: {name: 0.0 for name in STAGES})


def learning_rate(settings: StageSettings, step: int) -> float:
    """Linear warmup, then cosine decay to a tenth."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ------------------------------------------------------------------------------------ parameters


def add_lora(model: torch.nn.Module, rank: int, alpha: int, seed: int) -> None:
    """Inject LoRA adapters (peft) into the text model's attention projections, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, resolve_attribute(model, _text_model_path(model)))


def has_lora(model: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def _text_model_path(model: torch.nn.Module) -> str:
    path = architecture_for_class(type(model).__name__).text_model_path
    if path is None:
        raise ValueError(f"the architecture table has no text model path for {type(model).__name__}")
    return path


def _projector_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    path = architecture_for_class(type(model).__name__).projector_path
    return () if path is None else (f"{path}.",)


def trainable_names(model: torch.nn.Module, stage: str, *, projector_in_instruct: bool) -> list[str]:
    projector = _projector_prefixes(model)

    def wanted(name: str) -> bool:
        if stage == "instruct":
            return "lora_" in name or (projector_in_instruct and name.startswith(projector))
        return name.startswith(projector)

    return [name for name, _ in model.named_parameters() if wanted(name)]


def trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor training may change: the projector and the LoRA adapters (if injected)."""
    projector = _projector_prefixes(model)
    return {
        name: parameter.detach().clone().contiguous()
        for name, parameter in model.named_parameters()
        if name.startswith(projector) or "lora_" in name
    }


# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    names: Sequence[str],
    state: TrainState,
    config: TrainConfig,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(trained_tensors(model), str(directory / f"{_TRAINED_FILE}.tmp"))
    moments: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        parameters = dict(model.named_parameters())
        for name in names:
            for key, value in optimizer.state.get(parameters[name], {}).items():
                if isinstance(value, torch.Tensor):
                    moments[f"{name}::{key}"] = value.detach().clone().contiguous()
    save_file(moments, str(directory / f"{_OPTIMIZER_FILE}.tmp"))
    record = {"state": asdict(state), "config": config.to_json()}
    (directory / f"{_STATE_FILE}.tmp").write_text(json.dumps(record, indent=1))
    # Renames last, the state file after the tensors it describes: a crash leaves the old set whole.
    for name in _CHECKPOINT_FILES:
        (directory / f"{name}.tmp").replace(directory / name)


def _copy_checkpoint(source: Path, target: Path) -> None:
    for name in _CHECKPOINT_FILES:
        shutil.copyfile(source / name, target / name)


def keep_stage_end(directory: Path, stage: str) -> None:
    """Copy the checkpoint just written at the end of `stage` to `after-<stage>/`."""
    kept = directory / f"{_STAGE_END_PREFIX}{stage}"
    kept.mkdir(exist_ok=True)
    _copy_checkpoint(directory, kept)


def restore_stage_end(directory: Path, stage: str) -> None:
    """Make the end of `stage` the current checkpoint again, so training continues with the next stage."""
    kept = directory / f"{_STAGE_END_PREFIX}{stage}"
    if not (kept / _STATE_FILE).is_file():
        raise FileNotFoundError(
            f"no checkpoint of the end of stage {stage!r} in {kept}: train through {stage!r} first"
        )
    _copy_checkpoint(kept, directory)


def load_state(directory: Path) -> TrainState | None:
    path = directory / _STATE_FILE
    if not path.is_file():
        return None
    return TrainState(**json.loads(path.read_text())["state"])


def load_trained(model: torch.nn.Module, directory: Path) -> None:
    tensors = load_file(str(directory / _TRAINED_FILE))
    parameters = dict(model.named_parameters())
    missing = [name for name in tensors if name not in parameters]
    if missing:
        raise KeyError(f"checkpoint tensors not in the model: {missing[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            parameters[name].copy_(value)


def load_moments(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, directory: Path, step: int
) -> None:
    moments = load_file(str(directory / _OPTIMIZER_FILE))
    parameters = dict(model.named_parameters())
    for key, value in moments.items():
        name, moment = key.split("::")
        slot = optimizer.state[parameters[name]]
        slot[moment] = value
        slot.setdefault("step", torch.tensor(float(step)))


# ------------------------------------------------------------------------------------ losses


@dataclass
class AlignTargets:
    """Per entity: its name's input embeddings repeated over the image slots, and their mean direction."""

    index: dict[str, int]
    tiled: torch.Tensor  # (entities, tokens_per_image, hidden)
    prototypes: torch.Tensor  # (entities, hidden), unit length


def name_embedding_targets(
    model: torch.nn.Module, tokenizer: Any, entities: Sequence[str], tokens_per_image: int
) -> AlignTargets:
    """The LM's input embeddings (with Gemma's sqrt(hidden) scaling, as the LM sees them) of each
    entity's name as it is written after "Q:" (no leading space), repeated over the image slots."""
    embed = model.get_input_embeddings()  # type: ignore[operator]
    tiled = []
    with torch.no_grad():
        for entity in entities:
            name = entity.split("/", 1)[1]
            ids = torch.tensor(tokenizer(name, add_special_tokens=False).input_ids)
            tiled.append(embed(ids)[torch.arange(tokens_per_image) % len(ids)])
    stacked = torch.stack(tiled).float()
    prototypes = torch.nn.functional.normalize(stacked.mean(1), dim=-1)
    return AlignTargets({entity: i for i, entity in enumerate(entities)}, stacked, prototypes)


def align_batch(
    pool: Sequence[EntityImage], tower_tokens: TowerTokens, batch_size: int, seed: int, step: int
) -> tuple[torch.Tensor, list[str]]:
    """The align stage's batch of `step`: one random view of each drawn picture, and its entity."""
    rng = np.random.default_rng([seed, step, 0])
    chosen = rng.choice(len(pool), size=batch_size, replace=len(pool) < batch_size)
    views = rng.integers(tower_tokens.views, size=batch_size)
    tokens = torch.stack(
        [tower_tokens.of(pool[int(index)], int(view)) for index, view in zip(chosen, views, strict=True)]
    )
    return tokens, [pool[int(index)].entity for index in chosen]


def align_loss(
    model: torch.nn.Module,
    image_tokens: torch.Tensor,
    entities: Sequence[str],
    targets: AlignTargets,
    temperature: float = 0.05,
    regression_weight: float = 1.0,
) -> torch.Tensor:
    """Classification of the mean projected token among all entities' name directions (cosine
    softmax), plus squared distance of the projected tokens to their targets relative to the
    targets' size. The regression alone settles near the mean of all names first; the
    classification term makes the projector discriminate from the first steps."""
    projector: Any = model.model.multi_modal_projector  # type: ignore[union-attr]
    predicted = projector(image_tokens.to(next(projector.parameters()).dtype)).float()
    labels = torch.tensor([targets.index[entity] for entity in entities])
    wanted = targets.tiled[labels]
    direction = torch.nn.functional.normalize(predicted.mean(1), dim=-1)
    classification = torch.nn.functional.cross_entropy(direction @ targets.prototypes.T / temperature, labels)
    regression = ((predicted - wanted) ** 2).sum(-1).mean() / (wanted**2).sum(-1).mean()
    return classification + regression_weight * regression


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base language model: every LoRA adapter off, trainability restored afterwards (peft's
    re-enabling would make adapters trainable whatever they were before)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])


def text_step_loss(model: torch.nn.Module, batch: TrainingBatch, distill_weight: float) -> torch.Tensor:
    """Cross-entropy on the answers plus `distill_weight` x KL from the base LM (adapters off) at the
    answer positions: text in-context learning is trained without drifting from the base LM."""
    student = answer_logits(model, batch)
    loss = torch.nn.functional.cross_entropy(student, batch.targets)
    if distill_weight > 0 and has_lora(model):
        with torch.no_grad(), adapters_disabled(model):
            teacher = answer_logits(model, batch)
        loss = loss + distill_weight * distillation_loss(student, teacher)
    return loss


def image_step_loss(
    model: torch.nn.Module, batch: TrainingBatch, named: TrainingBatch, distill_weight: float
) -> torch.Tensor:
    """Cross-entropy on the answers plus `distill_weight` x KL from the base LM (adapters off)
    reading `named`, the same prompts with the entities' names in place of the pictures."""
    student = answer_logits(model, batch)
    loss = torch.nn.functional.cross_entropy(student, batch.targets)
    if distill_weight > 0:
        with torch.no_grad(), adapters_disabled(model):
            teacher = answer_logits(model, named)
        loss = loss + distill_weight * distillation_loss(student, teacher)
    return loss


def _named_twins(examples: Sequence[Example]) -> list[Example]:
    return [Example(example.text_prompt or "", example.answer, ()) for example in examples]


# ------------------------------------------------------------------------------------ the loop


@dataclass
class TrainResult:
    state: TrainState
    stopped_early: bool


def train_vlm(
    model: torch.nn.Module,
    processor: Any,
    pool: Sequence[EntityImage],
    tower_tokens: TowerTokens,
    config: TrainConfig,
    checkpoint_dir: Path,
    *,
    stages: Sequence[str] = STAGES,
    resume: bool = True,
    progress: bool = True,
    time_limit_seconds: float | None = None,
    on_step: Callable[[str, int, float], None] | None = None,
    restart_after: str | None = None,
) -> TrainResult:
    """Run (or resume) the stages on `model` in place; returns the final state.

    `pool` is the training pictures (held-out styles already removed) and `tower_tokens` their
    cached tower tokens. `time_limit_seconds` stops after the step that crosses it, with a
    checkpoint, so a later call resumes. `restart_after="align"` discards what came after the align
    stage's end and trains the instruct stage again, e.g. with a changed recipe.
    """
    if restart_after is not None:
        if restart_after not in STAGES[:-1]:
            raise ValueError(f"restart_after must be one of {STAGES[:-1]}, got {restart_after!r}")
        restore_stage_end(checkpoint_dir, restart_after)
    state = load_state(checkpoint_dir) if resume or restart_after is not None else None
    if state is not None:
        if STAGES.index(state.stage) >= STAGES.index("instruct") and not has_lora(model):
            add_lora(model, config.lora_rank, config.lora_alpha, config.seed)
        load_trained(model, checkpoint_dir)
    else:
        state = TrainState(stage=stages[0])
    tokens = config.tower.config().tokens_per_image
    started = time.monotonic()
    for stage in stages:
        if STAGES.index(stage) < STAGES.index(state.stage) or (stage == state.stage and state.finished):
            continue
        if stage != state.stage:
            state.stage, state.step, state.finished = stage, 0, False
        if stage == "instruct" and not has_lora(model):
            add_lora(model, config.lora_rank, config.lora_alpha, config.seed)
        settings = config.stage(stage)
        names = trainable_names(model, stage, projector_in_instruct=config.instruct_trains_projector)
        parameters = dict(model.named_parameters())
        for name, parameter in parameters.items():
            parameter.requires_grad_(name in names)
        optimizer = torch.optim.AdamW(
            [parameters[name] for name in names], lr=settings.learning_rate, weight_decay=config.weight_decay
        )
        if state.step > 0:
            load_moments(optimizer, model, checkpoint_dir, state.step)
        targets = (
            name_embedding_targets(model, processor.tokenizer, sorted({i.entity for i in pool}), tokens)
            if stage == "align"
            else None
        )
        mix = config.instruct_mix
        icl_tasks = training_icl_tasks(formats=mix.format_tasks) if stage == "instruct" else []
        bar = progress_counter(
            f"train-vlm {stage}", total=settings.steps, initial=state.step, enabled=progress, unit="steps"
        )
        while state.step < settings.steps:
            stage_clock = time.monotonic()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(settings, state.step)
            if targets is not None:
                image_tokens, entities = align_batch(
                    pool, tower_tokens, settings.batch_size, config.seed, state.step
                )
                loss = align_loss(
                    model, image_tokens, entities, targets, regression_weight=config.align_regression_weight
                )
            else:
                examples, rng = instruct_examples(
                    pool, icl_tasks, mix, settings.batch_size, config.seed, state.step
                )
                batch = collate(examples, processor, tokens, tower_tokens, rng)
                if batch.image_tokens is None:
                    loss = text_step_loss(model, batch, mix.text_distill_weight)
                elif all(example.text_prompt for example in examples):
                    named = collate(_named_twins(examples), processor, tokens, tower_tokens, None)
                    loss = image_step_loss(model, batch, named, mix.image_distill_weight)
                else:
                    loss = answer_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([parameters[name] for name in names], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.losses[stage].append(round(loss.item(), 5))
            state.seconds[stage] += time.monotonic() - stage_clock
            bar.update(1)
            bar.set_postfix(loss=f"{state.losses[stage][-1]:.3f}")
            if on_step is not None:
                on_step(stage, state.step, state.losses[stage][-1])
            out_of_time = time_limit_seconds is not None and time.monotonic() - started > time_limit_seconds
            if state.step == settings.steps:
                state.finished = True
            if state.finished or out_of_time or state.step % config.checkpoint_every == 0:
                save_checkpoint(checkpoint_dir, model, optimizer, names, state, config)
            if state.finished:
                keep_stage_end(checkpoint_dir, stage)
            if out_of_time and not state.finished:
                bar.close()
                return TrainResult(state, stopped_early=True)
        bar.close()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return TrainResult(state, stopped_early=False)
