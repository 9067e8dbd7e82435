"""The run's vectors, one store for every recipe: made once, stored recipes saved under DIR/vectors
(and read again on a rerun), the others made from their inputs when asked for.

A stored recipe's per-prompt residuals, when it has them, are kept too (DIR/cache/residuals): the
ensemble curve averages subsets of prompts (see `ExemplarSubset`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from taskvec.atomic_files import write_tensors_atomically
from taskvec.caching import (
    StepCache,
    digest,
    model_fingerprint,
    read_tensors,
    tensors_readable,
    warn_unusable,
)
from taskvec.experiments.config import RunConfig
from taskvec.experiments.protocol.recipes import MadeVector, ModelRole, VectorRecipe
from taskvec.models import ModelHandle
from taskvec.tasks import Task
from taskvec.vectors import TaskVector, VectorFileError, load_task_vector
from taskvec.vectors.task_vector import save_task_vector

# One vector of the store: (recipe, task, seed); recipes are frozen, so equal recipes are one vector.
VectorId = tuple[VectorRecipe, str, int]


def run_models(handle: ModelHandle, llm: ModelHandle | None) -> dict[ModelRole, ModelHandle]:
    """The models a run's vectors are read from, by role."""
    models: dict[ModelRole, ModelHandle] = {"vlm": handle}
    if llm is not None:
        models["llm"] = llm
    return models


class VectorStore:
    """Vectors of one run, by recipe, task and seed; resumable from DIR/vectors. It is the
    `RecipeContext` its recipes read their models, settings and other vectors from."""

    def __init__(
        self,
        out_dir: Path,
        config: RunConfig,
        cache: StepCache,
        models: dict[ModelRole, ModelHandle],
        progress: bool = True,
    ) -> None:
        self.out_dir = out_dir
        self.config = config
        self.cache = cache
        self.models = models
        self.progress = progress
        self.extracted = 0  # stored vectors computed (not loaded) in this process, for tests and logs
        self._fingerprints: dict[int, str] = {}
        self._memory: dict[VectorId, tuple[TaskVector, str]] = {}

    # ---- the recipes' context ------------------------------------------------------------------
    def model(self, role: ModelRole) -> ModelHandle:
        if role not in self.models:
            raise ValueError("a base-LM vector asked for, but no base LM given")
        return self.models[role]

    def fingerprint(self, handle: ModelHandle) -> str:
        if id(handle) not in self._fingerprints:
            self._fingerprints[id(handle)] = model_fingerprint(handle)
        return self._fingerprints[id(handle)]

    def per_prompt(self, recipe: VectorRecipe, task: Task, seed: int) -> torch.Tensor:
        """[prompts, layers, hidden]: the residuals a stored vector is the mean of (made again when
        their file cannot be read)."""
        seed = recipe.seed_of(seed)
        _, key = self.get(recipe, task, seed)
        path = self.residuals_path(recipe, task, seed, key)
        stored = read_tensors(path)
        if stored is not None and "residuals" not in stored:
            warn_unusable(path, "no 'residuals' tensor")
        if stored is None or "residuals" not in stored:
            self._memory[(recipe, task.name, seed)] = (self._make_stored(recipe, task, seed, key), key)
            stored = read_tensors(path)
            if stored is None or "residuals" not in stored:
                raise ValueError(f"{recipe.name} vectors keep no per-prompt residuals")
        return stored["residuals"]

    # ---- files ---------------------------------------------------------------------------------
    def vector_path(self, recipe: VectorRecipe, task: Task, seed: int) -> Path:
        seed = recipe.seed_of(seed)
        return self.out_dir / "vectors" / recipe.role / task.name / f"{recipe.name}-seed{seed}.safetensors"

    def residuals_path(self, recipe: VectorRecipe, task: Task, seed: int, key: str) -> Path:
        seed = recipe.seed_of(seed)
        name = f"{recipe.name}-seed{seed}-{key}.safetensors"
        return self.cache.root / "residuals" / recipe.role / task.name / name

    # ---- one get / has / add -------------------------------------------------------------------
    def key(self, recipe: VectorRecipe, task: Task, seed: int) -> str:
        """The vector's key (which later steps fold into theirs), without making the vector."""
        seed = recipe.seed_of(seed)
        inputs = [self.key(source, task, source_seed) for source, source_seed in recipe.inputs(seed)]
        identity = recipe.identity(self, task, seed, inputs)
        if recipe.stored:
            if not isinstance(identity, dict):
                raise TypeError(f"a stored recipe's identity is a JSON object, not {type(identity).__name__}")
            return self.cache.key(identity)
        return digest(identity)

    def get(self, recipe: VectorRecipe, task: Task, seed: int) -> tuple[TaskVector, str]:
        """The vector [layers, hidden] with its metadata, and its key."""
        seed = recipe.seed_of(seed)
        memo = (recipe, task.name, seed)
        if memo in self._memory:
            return self._memory[memo]
        key = self.key(recipe, task, seed)
        if recipe.stored:
            cached = self._cached(recipe, task, seed, key)
            vector = cached if cached is not None else self._make_stored(recipe, task, seed, key)
        else:
            inputs = [
                self.get(source, task, source_seed)[0].vectors for source, source_seed in recipe.inputs(seed)
            ]
            vector = recipe.make(self, task, seed, inputs).vector
            vector.metadata.update({"cache_key": key, "role": recipe.role, "seed": seed})
        self._memory[memo] = (vector, key)
        return vector, key

    def has(self, recipe: VectorRecipe, task: Task, seed: int) -> bool:
        """Whether `get` would read this vector (and every vector it is made from) instead of making it."""
        return not self.missing(recipe, task, seed)

    def missing(self, recipe: VectorRecipe, task: Task, seed: int) -> list[tuple[VectorRecipe, int]]:
        """The stored vectors `get` would have to make first: (recipe, seed), each once."""
        seed = recipe.seed_of(seed)
        if (recipe, task.name, seed) in self._memory:
            return []
        if recipe.stored:
            cached = self._cached(recipe, task, seed, self.key(recipe, task, seed))
            return [] if cached is not None else [(recipe, seed)]
        found: dict[tuple[str, int], tuple[VectorRecipe, int]] = {}
        for source, source_seed in recipe.inputs(seed):
            for entry in self.missing(source, task, source_seed):
                found.setdefault((entry[0].id, entry[1]), entry)
        return list(found.values())

    def add(self, recipe: VectorRecipe, task: Task, seed: int, made: MadeVector) -> None:
        """Keep a stored vector made elsewhere (a Ray worker) as if `get` had made it here."""
        seed = recipe.seed_of(seed)
        self._save(recipe, task, seed, made.vector.metadata["cache_key"], made)

    def made(self, recipe: VectorRecipe, task: Task, seed: int) -> MadeVector:
        """A stored vector with its per-prompt residuals (what a Ray worker sends back)."""
        vector, key = self.get(recipe, task, seed)
        per_prompt = None
        if tensors_readable(self.residuals_path(recipe, task, seed, key)):
            per_prompt = self.per_prompt(recipe, task, seed).cpu()
        return MadeVector(TaskVector(vector.vectors.cpu(), dict(vector.metadata)), per_prompt)

    # ---- stored recipes ------------------------------------------------------------------------
    def _make_stored(self, recipe: VectorRecipe, task: Task, seed: int, key: str) -> TaskVector:
        self.extracted += 1
        made = recipe.make(self, task, seed, [])
        self._save(recipe, task, seed, key, made)
        return made.vector

    def _save(self, recipe: VectorRecipe, task: Task, seed: int, key: str, made: MadeVector) -> None:
        keeps = made.per_prompt is not None
        made.vector.metadata.update(
            {"cache_key": key, "role": recipe.role, "seed": seed, "per_prompt": keeps}
        )
        if made.per_prompt is not None:
            write_tensors_atomically(
                self.residuals_path(recipe, task, seed, key), {"residuals": made.per_prompt}
            )
        save_task_vector(made.vector, self.vector_path(recipe, task, seed))

    def _cached(self, recipe: VectorRecipe, task: Task, seed: int, key: str) -> TaskVector | None:
        """The vector file of this step, if it exists, reads and was made for it (with its residuals
        when the recipe keeps them); a stale file (an old key) is made again, and so is an unreadable
        one, with a warning naming it."""
        path = self.vector_path(recipe, task, seed)
        if not path.is_file():
            return None
        try:
            vector = load_task_vector(path)
        except VectorFileError as error:
            warn_unusable(path, str(error).removeprefix(f"{path}: "))
            return None
        if vector.metadata.get("cache_key") != key:
            return None
        if vector.metadata.get("per_prompt") and not tensors_readable(
            self.residuals_path(recipe, task, seed, key)
        ):
            return None
        return vector
