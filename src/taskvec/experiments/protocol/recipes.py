"""Vector recipes: one object per kind of vector a condition patches.

A recipe says what it needs (images, several images, an instruction, the base LM), how its vector is
made (read from prompts of one model, or arithmetic on other recipes' vectors), its cache identity,
how it is patched (replacing the residual or added to it) and at which scales its layer sweep tries
it. The run's store, its executors (local and Ray) and its layer choice read recipes only, so a new
kind of vector is one recipe and a condition that holds it (see tests/test_vector_recipes.py).

Stored recipes (`stored = True`) are read from prompts and kept under DIR/vectors; the others are
made from their inputs whenever they are asked for (cheap arithmetic, nothing written).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import ClassVar, Literal, Protocol

import torch

from taskvec.caching import task_fingerprint
from taskvec.engine import PatchMode
from taskvec.experiments.config import RunConfig
from taskvec.function_vectors import find_function_vector
from taskvec.models import ModelHandle
from taskvec.prompts import as_template
from taskvec.prompts.settings import PromptSettings
from taskvec.tasks import Task
from taskvec.vectors import TaskVector, VectorSpec, extract_vector

# Which model of the run a vector is read from: the model under study, or its base language model.
ModelRole = Literal["vlm", "llm"]
# What a vector depends on: a JSON object (stored recipes: the step cache's identity) or list.
Identity = dict[str, object] | list[object]
# A recipe's input: another recipe's vector at a seed.
RecipeInput = tuple["VectorRecipe", int]


@dataclass(frozen=True)
class Needs:
    """What a recipe needs of the model and the tasks; a condition the run cannot meet is skipped
    (a recipe of the base LM's vectors, `role="llm"`, needs the base LM too)."""

    images: bool = False
    several_images: bool = False
    instruction: bool = False


@dataclass
class MadeVector:
    """A recipe's vector [layers, hidden] with its metadata, and the per-prompt residuals it is the
    mean of when it has them ([prompts, layers, hidden]: the ensemble curve averages subsets)."""

    vector: TaskVector
    per_prompt: torch.Tensor | None = None


class RecipeContext(Protocol):
    """What a recipe reads while it makes a vector; the run's vector store provides it."""

    config: RunConfig
    progress: bool

    def model(self, role: ModelRole) -> ModelHandle: ...

    def fingerprint(self, handle: ModelHandle) -> str: ...

    def per_prompt(self, recipe: VectorRecipe, task: Task, seed: int) -> torch.Tensor: ...


def heads_used(handle: ModelHandle, k: int) -> int:
    """The run's top-k, or every head of a model that has fewer (a tiny test model)."""
    return min(k, handle.num_layers * int(handle.text_config.num_attention_heads))


class VectorRecipe(ABC):
    """How one kind of vector is made, identified, patched and swept; frozen dataclasses below."""

    role: ModelRole = "vlm"
    stored: ClassVar[bool] = False
    patch_mode: ClassVar[PatchMode] = "replace"

    @property
    @abstractmethod
    def name(self) -> str:
        """Unique per role: the vector's file name under DIR/vectors/<role>/<task>/ (stored recipes)."""

    @property
    @abstractmethod
    def label(self) -> str:
        """What tables and the report call the vector."""

    @property
    def id(self) -> str:
        """The recipe's name among every model's recipes."""
        return f"{self.role}:{self.name}"

    @abstractmethod
    def needs(self) -> Needs: ...

    def inputs(self, seed: int) -> list[RecipeInput]:
        """The other recipes' vectors this one is made from (none for a stored recipe)."""
        return []

    @abstractmethod
    def identity(self, context: RecipeContext, task: Task, seed: int, inputs: list[str]) -> Identity:
        """What the vector depends on (its cache key is a digest of it); `inputs` are the keys of
        `self.inputs(seed)`'s vectors."""

    @abstractmethod
    def make(self, context: RecipeContext, task: Task, seed: int, inputs: list[torch.Tensor]) -> MadeVector:
        """The vector, from prompts (a stored recipe) or from its inputs' vectors."""

    def seed_of(self, seed: int) -> int:
        """The seed the vector is made with (an instruction's vector has no demonstrations to sample)."""
        return seed

    def seeds(self, config: RunConfig) -> tuple[int, ...]:
        """The run's seeds a condition patching this vector is tested on."""
        return config.seeds

    def scales(self, config: RunConfig) -> tuple[float, ...]:
        """The scales the layer sweep tries (a replacing vector: as it is)."""
        return (1.0,)

    @property
    def scaled(self) -> bool:
        """Whether the layer choice picks a scale too (an added vector's size is a choice)."""
        return self.patch_mode == "add"

    def enabled(self, config: RunConfig) -> bool:
        """Whether the run's options ask for conditions patching this vector."""
        return True

    def plan_note(self, handle: ModelHandle, config: RunConfig) -> str | None:
        """A note for the results when the model changes what the recipe does."""
        return None


def _style(config: RunConfig, task: Task, spec: VectorSpec) -> str | None:
    return config.style_for(task.name) if spec is VectorSpec.IMAGE_ICL else None


def _prompt_settings(config: RunConfig, task: Task, spec: VectorSpec, seed: int) -> PromptSettings:
    """The run's prompt settings for one task and seed."""
    return replace(config.prompts, seed=seed, style=_style(config, task, spec))


def _spec_needs(spec: VectorSpec) -> Needs:
    image = spec is VectorSpec.IMAGE_ICL
    return Needs(images=image, several_images=image, instruction=spec.uses_instruction)


@dataclass(frozen=True)
class ResidualVector(VectorRecipe):
    """The paper's task vector: the residual at the answer marker, mean over validation prompts of
    text ICL, image ICL or the instruction (taskvec.vectors.extract_vector)."""

    spec: VectorSpec
    role: ModelRole = "vlm"
    stored: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not self.spec.extractable:
            raise ValueError(f"{self.spec.value!r} vectors are not read from prompts")

    @property
    def name(self) -> str:
        return self.spec.value

    @property
    def label(self) -> str:
        return "base-LM text ICL" if self.role == "llm" else self.spec.label

    def needs(self) -> Needs:
        return _spec_needs(self.spec)

    def seed_of(self, seed: int) -> int:
        return 0 if self.spec is VectorSpec.INSTRUCTION else seed

    def identity(self, context: RecipeContext, task: Task, seed: int, inputs: list[str]) -> Identity:
        config = context.config
        identity: dict[str, object] = {
            "step": "vector",
            "model": context.fingerprint(context.model(self.role)),
            "task": task_fingerprint(task),
            "spec": self.spec.value,
        }
        template = as_template(config.prompts.template)
        if self.spec is VectorSpec.INSTRUCTION:
            # The chat template changes the instruction's tokens; qa keys stay what they were.
            return {**identity, "template": template.cache_key()} if template.chat else identity
        return {
            **identity,
            "shots": config.prompts.shots,
            "seed": seed,
            "val_limit": config.val_limit,
            "style": _style(config, task, self.spec),
            "template": template.cache_key(),
        }

    def make(self, context: RecipeContext, task: Task, seed: int, inputs: list[torch.Tensor]) -> MadeVector:
        config = context.config
        label = f"{self.role} {self.spec.value} {task.name} seed {seed}" if context.progress else None
        extraction = extract_vector(
            context.model(self.role),
            task,
            self.spec,
            settings=_prompt_settings(config, task, self.spec, seed),
            split="val",
            limit=config.val_limit,
            progress=label,
        )
        return MadeVector(extraction.vector, extraction.per_prompt)


@dataclass(frozen=True)
class FunctionVector(VectorRecipe):
    """Todd et al.'s function vector of `spec`'s demonstrations: the summed mean outputs of the top
    heads by indirect effect, added to the residual at a layer and scale chosen on validation."""

    spec: VectorSpec
    role: ModelRole = "vlm"
    stored: ClassVar[bool] = True
    patch_mode: ClassVar[PatchMode] = "add"

    def __post_init__(self) -> None:
        if self.spec not in (VectorSpec.TEXT_ICL, VectorSpec.IMAGE_ICL):
            raise ValueError(
                f"function vectors come from demonstrations (text-icl or image-icl), not {self.spec.value!r}"
            )

    @property
    def name(self) -> str:
        return f"fv-{self.spec.value}"

    @property
    def label(self) -> str:
        return "base-LM text ICL" if self.role == "llm" else self.spec.label

    def needs(self) -> Needs:
        return _spec_needs(self.spec)

    def seeds(self, config: RunConfig) -> tuple[int, ...]:
        return config.seeds[: config.fv_seeds]

    def scales(self, config: RunConfig) -> tuple[float, ...]:
        return config.function_vector.scales

    def enabled(self, config: RunConfig) -> bool:
        return config.function_vectors

    def plan_note(self, handle: ModelHandle, config: RunConfig) -> str | None:
        heads = heads_used(handle, config.function_vector.heads)
        if heads < config.function_vector.heads:
            return f"{handle.name} has {heads} attention heads: function vectors sum all of them"
        return None

    def identity(self, context: RecipeContext, task: Task, seed: int, inputs: list[str]) -> Identity:
        config = context.config
        handle = context.model(self.role)
        return {
            "step": "function-vector",
            "model": context.fingerprint(handle),
            "task": task_fingerprint(task),
            "spec": self.spec.value,
            "shots": config.function_vector.shots,
            "mean_prompts": config.function_vector.mean_prompts,
            "effect_prompts": config.function_vector.effect_prompts,
            "k": heads_used(handle, config.function_vector.heads),
            "seed": seed,
            "style": _style(config, task, self.spec),
            "template": as_template(config.prompts.template).cache_key(),
        }

    def make(self, context: RecipeContext, task: Task, seed: int, inputs: list[torch.Tensor]) -> MadeVector:
        config = context.config
        handle = context.model(self.role)
        found = find_function_vector(
            handle,
            task,
            self.spec,
            settings=replace(config.function_vector, heads=heads_used(handle, config.function_vector.heads)),
            prompts=_prompt_settings(config, task, self.spec, seed),
            split="val",
            memory_budget=config.sweep_memory,
            progress=context.progress,
        )
        vector = found.as_task_vector(handle.num_layers)
        vector.metadata["effects"] = found.effects.tolist()
        return MadeVector(vector)


def exemplar_subset_vector(per_prompt: torch.Tensor, examples: int, shots: int, seed: int) -> torch.Tensor:
    """The exemplar vector of the ensemble curve built from `examples` demonstrations.

    What "n examples" means, read from the reference code (experiment_ensemble.sh and
    `postprocess_feats` in src/xpatch_evaluate.py of g-luo/task_vectors_are_cross_modal): the
    text-ICL residual of every validation prompt (each `shots` demonstrations + a query) is kept,
    and for n = shots * r the mean over r prompts drawn at random (seeded by the run's seed) is the
    exemplar vector. So n counts demonstrations over r separate 5-shot prompts (a demonstration may
    recur in two prompts), not one n-shot prompt; n=30 is 6 prompts. We draw the r prompts with
    `random.Random(seed).sample`, the same rule with Python's generator instead of numpy's.
    """
    if examples % shots:
        raise ValueError(f"{examples} examples is not a whole number of {shots}-shot prompts")
    count = examples // shots
    if not 1 <= count <= per_prompt.shape[0]:
        raise ValueError(
            f"{examples} examples need {count} prompts of {shots} shots; {per_prompt.shape[0]} were extracted"
        )
    chosen = random.Random(seed).sample(range(per_prompt.shape[0]), count)
    return per_prompt[chosen].mean(dim=0)


def ensemble_of(exemplar: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
    """The paper's ensemble: the mean of an exemplar vector and an instruction vector."""
    return (exemplar + instruction) / 2


TEXT_ICL = ResidualVector(VectorSpec.TEXT_ICL)
IMAGE_ICL = ResidualVector(VectorSpec.IMAGE_ICL)
INSTRUCTION = ResidualVector(VectorSpec.INSTRUCTION)
LLM_TEXT_ICL = ResidualVector(VectorSpec.TEXT_ICL, role="llm")


@dataclass(frozen=True)
class _CurvePoint(VectorRecipe):
    """A point of the ensemble curve: a vector made from `examples` demonstrations' residuals."""

    examples: int
    spec: ClassVar[VectorSpec]

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def name(self) -> str:
        return f"{self.spec.value}-{self.examples}"

    def _made(self, vectors: torch.Tensor) -> MadeVector:
        return MadeVector(TaskVector(vectors, {"spec": self.spec.value, "examples": self.examples}))


@dataclass(frozen=True)
class ExemplarSubset(_CurvePoint):
    """The ensemble curve's exemplar vector: the mean text-ICL residual of `examples` demonstrations
    (`exemplar_subset_vector`)."""

    spec: ClassVar[VectorSpec] = VectorSpec.EXEMPLAR_SUBSET

    def needs(self) -> Needs:
        return Needs()

    def inputs(self, seed: int) -> list[RecipeInput]:
        return [(TEXT_ICL, seed)]

    def identity(self, context: RecipeContext, task: Task, seed: int, inputs: list[str]) -> Identity:
        return {"exemplar_of": inputs[0], "examples": self.examples, "seed": seed}

    def make(self, context: RecipeContext, task: Task, seed: int, inputs: list[torch.Tensor]) -> MadeVector:
        per_prompt = context.per_prompt(TEXT_ICL, task, seed)
        return self._made(
            exemplar_subset_vector(per_prompt, self.examples, context.config.prompts.shots, seed)
        )


@dataclass(frozen=True)
class Ensemble(_CurvePoint):
    """The paper's ensemble: (exemplar subset of `examples` + instruction vector) / 2."""

    spec: ClassVar[VectorSpec] = VectorSpec.ENSEMBLE

    def needs(self) -> Needs:
        return Needs(instruction=True)

    def inputs(self, seed: int) -> list[RecipeInput]:
        return [(ExemplarSubset(self.examples), seed), (INSTRUCTION, 0)]

    def identity(self, context: RecipeContext, task: Task, seed: int, inputs: list[str]) -> Identity:
        keys: list[object] = [*inputs]
        return keys

    def make(self, context: RecipeContext, task: Task, seed: int, inputs: list[torch.Tensor]) -> MadeVector:
        exemplar, instruction = inputs
        return self._made(ensemble_of(exemplar, instruction))
