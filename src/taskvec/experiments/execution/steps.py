"""The run's expensive steps for one (condition, task, seed): its vector, its sweep, its test answers.

Each step is cached (see caching.py) under a key made of what it depends on, so the runner can ask
for any step in any order and a rerun only computes what is missing.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeGuard

import torch

from taskvec.caching import StepCache, digest, task_fingerprint
from taskvec.engine import PatchMode, logit_lens
from taskvec.evaluation import (
    Answers,
    LayerPatch,
    generate_answers,
    generate_patched_answers,
    sweep_first_tokens_of_vectors,
)
from taskvec.experiments.config import RunConfig
from taskvec.experiments.execution.vector_store import (
    ModelRole,
    VectorStore,
    ensemble_of,
    exemplar_subset_vector,
)
from taskvec.experiments.protocol.conditions import Condition
from taskvec.models import ModelHandle
from taskvec.prompts import Prompt, as_template, build_icl_prompt
from taskvec.tasks import Item, Task
from taskvec.vectors import VectorSpec, sample_demonstrations

# A condition's vector on one task and seed, by names: (condition, task, seed).
VectorWork = tuple[str, str, int | None]
# Residual task vectors (Hendel et al., the paper) or function vectors (Todd et al.).
VectorKind = Literal["task-vector", "function-vector"]
# One extracted vector a condition's vector is made from: (model role, spec, seed, kind).
Extraction = tuple[ModelRole, VectorSpec, int, VectorKind]


class TestStep(NamedTuple):
    """One condition's test answers on a task: its seed, and the layer and scale it is patched at."""

    condition: Condition
    seed: int | None
    layer: int | None = None
    scale: float = 1.0  # a function vector's; a residual task vector replaces the residual as it is


def patch_mode(condition: Condition) -> PatchMode:
    """A function vector is added to the residual; a residual task vector replaces it (the paper)."""
    return "add" if condition.function_vector else "replace"


@dataclass
class StepRunner:
    handle: ModelHandle
    llm: ModelHandle | None
    config: RunConfig
    cache: StepCache
    store: VectorStore
    progress: bool = True
    # Vectors sent by a driver (see executors.py): a worker patches them instead of extracting its own.
    supplied: dict[VectorWork, tuple[torch.Tensor, str]] = field(default_factory=dict)

    # ---- vectors -------------------------------------------------------------------------------
    def vector_for(
        self, condition: Condition, task: Task, seed: int | None
    ) -> tuple[torch.Tensor, str] | None:
        """[layers, hidden] and its key, or None for an unpatched condition: the extracted vector of
        `extractions`, or for the ensemble curve arithmetic on them."""
        spec, run_seed = condition.vector, seed or 0
        if spec is None:
            return None
        if (condition.name, task.name, seed) in self.supplied:
            return self.supplied[(condition.name, task.name, seed)]
        extracted = [
            self.extracted(extraction, task) for extraction in self.extractions(condition, task, seed)
        ]
        if condition.function_vector or spec.extractable or spec is VectorSpec.LLM_TEXT_ICL:
            return extracted[0]
        (_, text_key), *instruction = extracted
        examples = condition.examples or 0
        per_prompt = self.store.per_prompt("vlm", self.handle, task, VectorSpec.TEXT_ICL, run_seed)
        exemplar = exemplar_subset_vector(per_prompt, examples, self.config.shots, run_seed)
        subset_key = digest({"exemplar_of": text_key, "examples": examples, "seed": run_seed})
        if spec is VectorSpec.EXEMPLAR_SUBSET:
            return exemplar, subset_key
        (instruction_vector, instruction_key), *_ = instruction
        return ensemble_of(exemplar, instruction_vector), digest([subset_key, instruction_key])

    def extracted(self, extraction: Extraction, task: Task) -> tuple[torch.Tensor, str]:
        """One extracted vector [layers, hidden] of the run's store, and its key."""
        role, spec, seed, kind = extraction
        model = self.model_of(role)
        if kind == "function-vector":
            vector, key = self.store.function_vector(role, model, task, spec, seed)
        else:
            vector, key = self.store.get(role, model, task, spec, seed)
        return vector.vectors, key

    def has_extracted(self, extraction: Extraction, task: Task) -> bool:
        """Whether `extracted` would read this vector from the run directory instead of computing it."""
        role, spec, seed, kind = extraction
        model = self.model_of(role)
        if kind == "function-vector":
            return self.store.has_function_vector(role, model, task, spec, seed)
        return self.store.has(role, model, task, spec, seed)

    def extractions(self, condition: Condition, task: Task, seed: int | None) -> list[Extraction]:
        """The extracted vectors `vector_for` reads for this condition (the rest is arithmetic on them)."""
        spec, run_seed = condition.vector, seed or 0
        if spec is None:
            return []
        kind: VectorKind = "function-vector" if condition.function_vector else "task-vector"
        if spec.extractable:
            return [("vlm", spec, run_seed, kind)]
        if spec is VectorSpec.LLM_TEXT_ICL:
            return [("llm", VectorSpec.TEXT_ICL, run_seed, kind)]
        if condition.function_vector:
            raise ValueError(f"condition {condition.name}: no function vector of {spec.value!r} vectors")
        text: list[Extraction] = [("vlm", VectorSpec.TEXT_ICL, run_seed, kind)]
        if spec is VectorSpec.EXEMPLAR_SUBSET:
            return text
        if spec is not VectorSpec.ENSEMBLE:
            raise ValueError(f"condition {condition.name}: no rule to make a {spec.value} vector")
        return [*text, ("vlm", VectorSpec.INSTRUCTION, 0, kind)]

    def model_of(self, role: ModelRole) -> ModelHandle:
        if role == "vlm":
            return self.handle
        if self.llm is None:
            raise ValueError("a base-LM vector asked for, but no base LM given")
        return self.llm

    def vector_token(self, condition: Condition, task: Task, seed: int | None, layer: int) -> int | None:
        """The token the patched vector decodes to by itself (final norm + unembedding), or None."""
        vector = self.vector_for(condition, task, seed)
        if vector is None:
            return None
        return int(logit_lens(self.handle, vector[0][layer]).argmax())

    # ---- prompts -------------------------------------------------------------------------------
    def prompts(self, condition: Condition, task: Task, items: list[Item], seed: int | None) -> list[Prompt]:
        style = self.config.style_for(task.name)
        template = as_template(self.config.template)
        rng = random.Random(seed or 0)
        prompts = []
        for item in items:
            demos = []
            if condition.demos is not None:
                demos = sample_demonstrations(task.split("val"), item, self.config.shots, rng)
            prompt = build_icl_prompt(
                demos,
                item,
                demo_modality=condition.demos or "text",
                query_modality=condition.query,
                style=style,
                template=template,
            )
            if condition.instruction_prompt:
                prompt = Prompt(f"{task.instruction}\n{prompt.text}", prompt.images, chat=prompt.chat)
            prompts.append(prompt)
        return prompts

    def _prompt_identity(self, condition: Condition, task: Task, seed: int | None) -> dict[str, Any]:
        uses_images = condition.query == "image" or condition.demos == "image"
        return {
            "model": self.store.fingerprint(self.handle),
            "task": task_fingerprint(task),
            "query": condition.query,
            "demos": condition.demos,
            "shots": self.config.shots if condition.demos else None,
            "seed": seed if condition.demos else None,
            "instruction": task.instruction if condition.instruction_prompt else None,
            "style": self.config.style_for(task.name) if uses_images else None,
            "template": as_template(self.config.template).cache_key(),
        }

    def prompt_group(self, condition: Condition, task: Task, seed: int | None) -> str:
        """Equal for steps asking the same prompts: those can share one pass over each batch."""
        return json.dumps(self._prompt_identity(condition, task, seed), sort_keys=True)

    # ---- layer sweep on validation -------------------------------------------------------------
    def _sweep_identity(
        self, condition: Condition, task: Task, seed: int | None, vector_key: str
    ) -> dict[str, Any]:
        identity = {
            "step": "sweep",
            **self._prompt_identity(condition, task, seed),
            "vector": vector_key,
            "val_limit": self.config.val_limit,
        }
        if condition.function_vector:
            return {**identity, "mode": "add", "scales": list(self.sweep_scales(condition))}
        return identity

    def sweep_scales(self, condition: Condition) -> tuple[float, ...]:
        """The scales a condition's sweep tries: a function vector's, or the residual vector as it is."""
        return self.config.fv_scales if condition.function_vector else (1.0,)

    def sweep_key(self, condition: Condition, task: Task, seed: int | None) -> tuple[dict[str, Any], str]:
        """The sweep's identity and cache key."""
        return self._sweep_key(condition, task, seed, self.vector_for(condition, task, seed))

    def _sweep_key(
        self, condition: Condition, task: Task, seed: int | None, vector: tuple[torch.Tensor, str] | None
    ) -> tuple[dict[str, Any], str]:
        if vector is None:
            raise ValueError(f"condition {condition.name} patches nothing: no sweep")
        identity = self._sweep_identity(condition, task, seed, vector[1])
        return identity, self.cache.key(identity)

    def cached_sweep(self, condition: Condition, task: Task, seed: int | None) -> dict[str, Any] | None:
        _, key = self.sweep_key(condition, task, seed)
        return self.cache.load("sweeps", task.name, key, self._sweep_shape(condition, task))

    def _sweep_shape(self, condition: Condition, task: Task) -> Callable[[dict[str, Any]], bool]:
        """Whether a cached entry is a whole sweep of this condition on this task's validation queries."""
        queries = len(task.split("val")[: self.config.val_limit])
        layers = self.handle.num_layers
        scales = list(self.sweep_scales(condition)) if condition.function_vector else None

        def usable(entry: dict[str, Any]) -> bool:
            whole = (
                _is_list(entry.get("inputs"), queries)
                and _is_list(entry.get("expected"), queries)
                and _is_token_grid(entry.get("tokens"), queries, layers)
            )
            if not whole or scales is None:
                return whole
            per_scale = entry.get("tokens_per_scale")
            return (
                entry.get("scales") == scales
                and _is_list(per_scale, len(scales))
                and all(_is_token_grid(grid, queries, layers) for grid in per_scale)
            )

        return usable

    def sweep(self, condition: Condition, task: Task, seed: int | None) -> dict[str, Any]:
        """First tokens per validation query and layer, with the condition's vector patched."""
        (result,) = self.sweeps(task, [(condition, seed)])
        return result

    def sweeps(self, task: Task, work: Sequence[tuple[Condition, int | None]]) -> list[dict[str, Any]]:
        """The sweeps of `work` on one task; those asking the same validation prompts (bare queries:
        every condition and seed) share one pass over each batch of prompts, a function vector with
        one vector set per scale.

        A result's "tokens" are [query][layer] at its first scale; a function vector's result also
        has "scales" and "tokens_per_scale", [scale][query][layer]."""
        items = task.split("val")[: self.config.val_limit]
        results: dict[int, dict[str, Any]] = {}
        missing: dict[str, list[tuple[int, dict[str, Any], str, torch.Tensor]]] = {}
        for index, (condition, seed) in enumerate(work):
            vector = self.vector_for(condition, task, seed)
            identity, key = self._sweep_key(condition, task, seed, vector)
            assert vector is not None  # _sweep_key raised otherwise
            cached = self.cache.load("sweeps", task.name, key, self._sweep_shape(condition, task))
            if cached is not None:
                results[index] = cached
                continue
            prompts_key = self.prompt_group(condition, task, seed)
            missing.setdefault(prompts_key, []).append((index, identity, key, vector[0]))
        for group in missing.values():
            condition, seed = work[group[0][0]]
            names = sorted({work[index][0].name for index, *_ in group})
            label = f"sweep {', '.join(names)} {task.name}" if self.progress else None
            sets: list[torch.Tensor] = []
            set_modes: list[tuple[PatchMode, float]] = []
            for row, *_, vectors in group:
                row_condition = work[row][0]
                for scale in self.sweep_scales(row_condition):
                    sets.append(vectors)
                    set_modes.append((patch_mode(row_condition), scale))
            tokens = iter(
                sweep_first_tokens_of_vectors(
                    self.handle,
                    self.prompts(condition, task, items, seed),
                    sets,
                    progress=label,
                    marker=self._marker(),
                    memory_budget=self.config.sweep_memory,
                    set_modes=set_modes,
                )
            )
            for row, row_identity, row_key, _ in group:
                row_condition = work[row][0]
                scales = self.sweep_scales(row_condition)
                per_scale = [next(tokens) for _ in scales]
                results[row] = {
                    "key": row_identity,
                    "inputs": [item.input for item in items],
                    "expected": [list(item.answers()) for item in items],
                    "tokens": per_scale[0],
                }
                if row_condition.function_vector:
                    results[row].update({"scales": list(scales), "tokens_per_scale": per_scale})
                self.cache.store("sweeps", task.name, row_key, results[row])
        return [results[index] for index in range(len(work))]

    def _marker(self) -> str:
        return as_template(self.config.template).marker

    # ---- test generations ----------------------------------------------------------------------
    def _test_identity(self, step: TestStep, task: Task, vector_key: str | None) -> dict[str, Any]:
        identity = {
            "step": "test",
            **self._prompt_identity(step.condition, task, step.seed),
            "vector": vector_key,
            "layer": step.layer if vector_key is not None else None,
            "test_limit": self.config.test_limit,
            "max_new_tokens": self.config.max_new_tokens,
        }
        if step.condition.function_vector:
            return {**identity, "mode": "add", "scale": step.scale}
        return identity

    def test_key(self, step: TestStep, task: Task) -> tuple[dict[str, Any], str]:
        """The test step's identity and cache key."""
        return self._test_key(step, task, self.vector_for(step.condition, task, step.seed))

    def _test_key(
        self, step: TestStep, task: Task, vector: tuple[torch.Tensor, str] | None
    ) -> tuple[dict[str, Any], str]:
        identity = self._test_identity(step, task, vector[1] if vector else None)
        return identity, self.cache.key(identity)

    def cached_test(self, step: TestStep, task: Task) -> dict[str, Any] | None:
        _, key = self.test_key(step, task)
        return self.cache.load("test", task.name, key, self._test_shape(task))

    def _test_shape(self, task: Task) -> Callable[[dict[str, Any]], bool]:
        """Whether a cached entry holds whole test answers to this task's test queries."""
        queries = len(task.split("test")[: self.config.test_limit])

        def usable(entry: dict[str, Any]) -> bool:
            generated, first_tokens = entry.get("generated"), entry.get("first_tokens")
            return (
                all(_is_list(entry.get(name), queries) for name in ("inputs", "images", "expected"))
                and isinstance(entry.get("prompts"), list)
                and _is_list(generated, queries)
                and all(isinstance(text, str) for text in generated)
                and _is_list(first_tokens, queries)
                and all(_is_int(token) for token in first_tokens)
            )

        return usable

    def test(self, step: TestStep, task: Task) -> dict[str, Any]:
        """Greedy answers to the test queries (under the patch at the step's layer if it patches)."""
        (result,) = self.tests(task, [step])
        return result

    def tests(self, task: Task, work: Sequence[TestStep]) -> list[dict[str, Any]]:
        """The test answers of `work` on one task; patched conditions asking the same test prompts
        (bare queries: every condition and seed) share one pass over each batch of prompts."""
        items = task.split("test")[: self.config.test_limit]
        results: dict[int, dict[str, Any]] = {}
        missing: dict[str, list[tuple[int, dict[str, Any], str, LayerPatch | None]]] = {}
        for index, step in enumerate(work):
            condition, seed, layer, scale = step
            vector = self.vector_for(condition, task, seed)
            identity, key = self._test_key(step, task, vector)
            cached = self.cache.load("test", task.name, key, self._test_shape(task))
            if cached is not None:
                results[index] = cached
                continue
            patch = None
            if vector is not None and layer is not None:
                patch = LayerPatch(vector[0][layer], layer, patch_mode(condition), scale)
            # Unpatched conditions each have prompts of their own (or nothing to share a pass with).
            prompts_key = self.prompt_group(condition, task, seed)
            group_key = prompts_key if patch is not None else f"unpatched {index}"
            missing.setdefault(group_key, []).append((index, identity, key, patch))
        for group in missing.values():
            condition, seed, *_ = work[group[0][0]]
            prompts = self.prompts(condition, task, items, seed)
            names = sorted({work[index][0].name for index, *_ in group})
            label = f"test {', '.join(names)} {task.name}" if self.progress else None
            batch_size = self.config.batch_size if condition.demos else self.config.query_batch_size
            patches = [patch for *_, patch in group if patch is not None]
            if patches:
                answers = generate_patched_answers(
                    self.handle,
                    prompts,
                    patches,
                    max_new_tokens=self.config.max_new_tokens,
                    batch_size=batch_size,
                    progress=label,
                    marker=self._marker(),
                    memory_budget=self.config.sweep_memory,
                )
            else:
                first_tokens: list[int] = []
                texts = generate_answers(
                    self.handle,
                    prompts,
                    max_new_tokens=self.config.max_new_tokens,
                    batch_size=batch_size,
                    progress=label,
                    first_tokens=first_tokens,
                )
                answers = [Answers(texts, first_tokens)]
            style = self.config.style_for(task.name)
            for (row, row_identity, row_key, _), answer in zip(group, answers, strict=True):
                results[row] = {
                    "key": row_identity,
                    "inputs": [item.input for item in items],
                    "images": [
                        str(item.image(style)) if condition.query == "image" else None for item in items
                    ],
                    "prompts": [prompt.text for prompt in prompts[:2]],
                    "expected": [list(item.answers()) for item in items],
                    "generated": answer.texts,
                    "first_tokens": answer.first_tokens,
                }
                self.cache.store("test", task.name, row_key, results[row])
        return [results[index] for index in range(len(work))]


def _is_list(value: Any, length: int) -> TypeGuard[list[Any]]:
    return isinstance(value, list) and len(value) == length


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_grid(value: Any, rows: int, columns: int) -> bool:
    """[rows][columns] decoded tokens."""
    return _is_list(value, rows) and all(
        _is_list(row, columns) and all(isinstance(token, str) for token in row) for row in value
    )
