"""The run's expensive steps for one (condition, task, seed): its vector, its sweep, its test answers.

Each step is cached (see caching.py) under a key made of what it depends on, so the runner can ask
for any step in any order and a rerun only computes what is missing. Steps return typed records
(experiments/results/step_results.py); a condition's vector is whatever its recipe makes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from taskvec.caching import StepCache, task_fingerprint
from taskvec.engine import PatchMode, logit_lens
from taskvec.evaluation import (
    Answers,
    LayerPatch,
    generate_answers,
    generate_patched_answers,
    sweep_first_tokens_of_vectors,
)
from taskvec.experiments.config import RunConfig
from taskvec.experiments.execution.vector_store import VectorStore
from taskvec.experiments.protocol.conditions import Condition
from taskvec.experiments.results.step_results import StepIdentity, SweepResult, TestAnswers
from taskvec.models import ModelHandle
from taskvec.prompts import Prompt, as_template, build_icl_prompt
from taskvec.tasks import Item, Task
from taskvec.vectors import sample_demonstrations

# A condition's vector on one task and seed, by names: (condition, task, seed).
VectorWork = tuple[str, str, int | None]


class TestStep(NamedTuple):
    """One condition's test answers on a task: its seed, and the layer and scale it is patched at
    (no layer: the queries are asked unpatched, as for a condition no layer helped)."""

    condition: Condition
    seed: int | None
    layer: int | None = None
    scale: float = 1.0  # an added vector's; a replacing one is patched as it is


def _patch_mode(condition: Condition) -> PatchMode:
    return condition.vector.patch_mode if condition.vector is not None else "replace"


@dataclass
class StepRunner:
    handle: ModelHandle
    llm: ModelHandle | None
    config: RunConfig
    cache: StepCache
    store: VectorStore
    progress: bool = True
    # Vectors sent by a driver (see executors.py): a worker patches them instead of making its own.
    supplied: dict[VectorWork, tuple[torch.Tensor, str]] = field(default_factory=dict)

    # ---- vectors -------------------------------------------------------------------------------
    def vector_for(
        self, condition: Condition, task: Task, seed: int | None
    ) -> tuple[torch.Tensor, str] | None:
        """[layers, hidden] and its key, or None for an unpatched condition."""
        if condition.vector is None:
            return None
        if (condition.name, task.name, seed) in self.supplied:
            return self.supplied[(condition.name, task.name, seed)]
        vector, key = self.store.get(condition.vector, task, seed or 0)
        return vector.vectors, key

    def vector_token(self, condition: Condition, task: Task, seed: int | None, layer: int) -> int | None:
        """The token the patched vector decodes to by itself (final norm + unembedding), or None."""
        vector = self.vector_for(condition, task, seed)
        if vector is None:
            return None
        return int(logit_lens(self.handle, vector[0][layer]).argmax())

    # ---- prompts -------------------------------------------------------------------------------
    def prompts(self, condition: Condition, task: Task, items: list[Item], seed: int | None) -> list[Prompt]:
        style = self.config.style_for(task.name)
        template = as_template(self.config.prompts.template)
        rng = random.Random(seed or 0)
        prompts = []
        for item in items:
            demos = []
            if condition.demos is not None:
                demos = sample_demonstrations(task.split("val"), item, self.config.prompts.shots, rng)
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

    def _prompt_identity(self, condition: Condition, task: Task, seed: int | None) -> StepIdentity:
        uses_images = condition.query == "image" or condition.demos == "image"
        return {
            "model": self.store.fingerprint(self.handle),
            "task": task_fingerprint(task),
            "query": condition.query,
            "demos": condition.demos,
            "shots": self.config.prompts.shots if condition.demos else None,
            "seed": seed if condition.demos else None,
            "instruction": task.instruction if condition.instruction_prompt else None,
            "style": self.config.style_for(task.name) if uses_images else None,
            "template": as_template(self.config.prompts.template).cache_key(),
        }

    def prompt_group(self, condition: Condition, task: Task, seed: int | None) -> str:
        """Equal for steps asking the same prompts: those can share one pass over each batch."""
        return json.dumps(self._prompt_identity(condition, task, seed), sort_keys=True)

    # ---- layer sweep on validation -------------------------------------------------------------
    def sweep_scales(self, condition: Condition) -> tuple[float, ...]:
        """The scales a condition's sweep tries."""
        return condition.vector.scales(self.config) if condition.vector is not None else (1.0,)

    def _sweep_identity(
        self, condition: Condition, task: Task, seed: int | None, vector_key: str
    ) -> StepIdentity:
        identity: StepIdentity = {
            "step": "sweep",
            **self._prompt_identity(condition, task, seed),
            "vector": vector_key,
            "val_limit": self.config.val_limit,
            "unpatched": True,
        }
        if condition.vector is not None and condition.vector.scaled:
            scales = list(self.sweep_scales(condition))
            return {**identity, "mode": condition.vector.patch_mode, "scales": scales}
        return identity

    def sweep_key(self, condition: Condition, task: Task, seed: int | None) -> tuple[StepIdentity, str]:
        """The sweep's identity and cache key."""
        return self._sweep_key(condition, task, seed, self.vector_for(condition, task, seed))

    def _sweep_key(
        self, condition: Condition, task: Task, seed: int | None, vector: tuple[torch.Tensor, str] | None
    ) -> tuple[StepIdentity, str]:
        if vector is None:
            raise ValueError(f"condition {condition.name} patches nothing: no sweep")
        identity = self._sweep_identity(condition, task, seed, vector[1])
        return identity, self.cache.key(identity)

    def _load_sweep(self, condition: Condition, task: Task, key: str) -> SweepResult | None:
        queries = len(task.split("val")[: self.config.val_limit])
        scales = self.sweep_scales(condition)
        layers = self.handle.num_layers
        return self.cache.load_typed(
            "sweeps", task.name, key, SweepResult, lambda result: result.fits(queries, layers, scales)
        )

    def cached_sweep(self, condition: Condition, task: Task, seed: int | None) -> SweepResult | None:
        _, key = self.sweep_key(condition, task, seed)
        return self._load_sweep(condition, task, key)

    def sweep(self, condition: Condition, task: Task, seed: int | None) -> SweepResult:
        """First tokens per validation query and layer, with the condition's vector patched."""
        (result,) = self.sweeps(task, [(condition, seed)])
        return result

    def sweeps(self, task: Task, work: Sequence[tuple[Condition, int | None]]) -> list[SweepResult]:
        """The sweeps of `work` on one task; those asking the same validation prompts (bare queries:
        every condition and seed) share one pass over each batch of prompts, an added vector with
        one vector set per scale, and one unpatched pass over the prompts."""
        items = task.split("val")[: self.config.val_limit]
        results: dict[int, SweepResult] = {}
        missing: dict[str, list[tuple[int, StepIdentity, str, torch.Tensor]]] = {}
        for index, (condition, seed) in enumerate(work):
            vector = self.vector_for(condition, task, seed)
            identity, key = self._sweep_key(condition, task, seed, vector)
            assert vector is not None  # _sweep_key raised otherwise
            cached = self._load_sweep(condition, task, key)
            if cached is not None:
                results[index] = cached
                continue
            prompts_key = self.prompt_group(condition, task, seed)
            missing.setdefault(prompts_key, []).append((index, identity, key, vector[0]))
        for group in missing.values():
            condition, seed = work[group[0][0]]
            prompts = self.prompts(condition, task, items, seed)
            names = sorted({work[index][0].name for index, *_ in group})
            label = f"sweep {', '.join(names)} {task.name}" if self.progress else None
            sets: list[torch.Tensor] = []
            set_modes: list[tuple[PatchMode, float]] = []
            for row, *_, vectors in group:
                row_condition = work[row][0]
                for scale in self.sweep_scales(row_condition):
                    sets.append(vectors)
                    set_modes.append((_patch_mode(row_condition), scale))
            tokens = iter(
                sweep_first_tokens_of_vectors(
                    self.handle,
                    prompts,
                    sets,
                    progress=label,
                    marker=self._marker(),
                    memory_budget=self.config.sweep_memory,
                    set_modes=set_modes,
                )
            )
            unpatched = self._unpatched_first_tokens(prompts)
            for row, row_identity, row_key, _ in group:
                scales = self.sweep_scales(work[row][0])
                per_scale = [next(tokens) for _ in scales]
                results[row] = SweepResult(
                    key=row_identity,
                    inputs=[item.input for item in items],
                    expected=[list(item.answers()) for item in items],
                    tokens=per_scale[0],
                    unpatched=unpatched,
                    scales=list(scales),
                    tokens_per_scale=per_scale,
                )
                self.cache.store_typed("sweeps", task.name, row_key, results[row])
        return [results[index] for index in range(len(work))]

    def _unpatched_first_tokens(self, prompts: list[Prompt]) -> list[str]:
        """Each prompt's greedy first token with nothing patched, decoded as a sweep decodes its tokens."""
        ids: list[int] = []
        generate_answers(
            self.handle, prompts, max_new_tokens=1, batch_size=self.config.query_batch_size, first_tokens=ids
        )
        return list(self.handle.tokenizer.batch_decode([[token] for token in ids]))

    def _marker(self) -> str:
        return as_template(self.config.prompts.template).marker

    # ---- test generations ----------------------------------------------------------------------
    def _test_identity(self, step: TestStep, task: Task, vector_key: str | None) -> StepIdentity:
        patched = vector_key is not None and step.layer is not None
        identity: StepIdentity = {
            "step": "test",
            **self._prompt_identity(step.condition, task, step.seed),
            "vector": vector_key if patched else None,
            "layer": step.layer if patched else None,
            "test_limit": self.config.test_limit,
            "max_new_tokens": self.config.max_new_tokens,
        }
        vector = step.condition.vector
        if patched and vector is not None and vector.scaled:
            return {**identity, "mode": vector.patch_mode, "scale": step.scale}
        return identity

    def test_key(self, step: TestStep, task: Task) -> tuple[StepIdentity, str]:
        """The test step's identity and cache key (a step without a layer patches nothing, so its key
        needs no vector)."""
        vector = self.vector_for(step.condition, task, step.seed) if step.layer is not None else None
        return self._test_key(step, task, vector)

    def _test_key(
        self, step: TestStep, task: Task, vector: tuple[torch.Tensor, str] | None
    ) -> tuple[StepIdentity, str]:
        identity = self._test_identity(step, task, vector[1] if vector else None)
        return identity, self.cache.key(identity)

    def _load_test(self, task: Task, key: str) -> TestAnswers | None:
        queries = len(task.split("test")[: self.config.test_limit])
        return self.cache.load_typed(
            "test", task.name, key, TestAnswers, lambda answers: answers.fits(queries)
        )

    def cached_test(self, step: TestStep, task: Task) -> TestAnswers | None:
        _, key = self.test_key(step, task)
        return self._load_test(task, key)

    def test(self, step: TestStep, task: Task) -> TestAnswers:
        """Greedy answers to the test queries (under the patch at the step's layer if it patches)."""
        (result,) = self.tests(task, [step])
        return result

    def tests(self, task: Task, work: Sequence[TestStep]) -> list[TestAnswers]:
        """The test answers of `work` on one task; patched conditions asking the same test prompts
        (bare queries: every condition and seed) share one pass over each batch of prompts."""
        items = task.split("test")[: self.config.test_limit]
        results: dict[int, TestAnswers] = {}
        missing: dict[str, list[tuple[int, StepIdentity, str, LayerPatch | None]]] = {}
        for index, step in enumerate(work):
            condition, seed, layer, scale = step
            vector = self.vector_for(condition, task, seed) if layer is not None else None
            identity, key = self._test_key(step, task, vector)
            cached = self._load_test(task, key)
            if cached is not None:
                results[index] = cached
                continue
            patch = None
            if vector is not None and layer is not None:
                patch = LayerPatch(vector[0][layer], layer, _patch_mode(condition), scale)
            # Patched steps asking the same prompts share a pass; an unpatched step shares it only
            # with steps of the same key (no-context and a condition no layer helped ask the same).
            group_key = self.prompt_group(condition, task, seed) if patch is not None else f"unpatched {key}"
            missing.setdefault(group_key, []).append((index, identity, key, patch))
        for group in missing.values():
            condition, seed, *_ = work[group[0][0]]
            prompts = self.prompts(condition, task, items, seed)
            names = sorted({work[index][0].name for index, *_ in group})
            label = f"test {', '.join(names)} {task.name}" if self.progress else None
            batch_size = self.config.prompts.batch_size if condition.demos else self.config.query_batch_size
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
                answers = [Answers(texts, first_tokens)] * len(group)
            style = self.config.style_for(task.name)
            for (row, row_identity, row_key, _), answer in zip(group, answers, strict=True):
                results[row] = TestAnswers(
                    key=row_identity,
                    inputs=[item.input for item in items],
                    images=[str(item.image(style)) if condition.query == "image" else None for item in items],
                    prompts=[prompt.text for prompt in prompts[:2]],
                    expected=[list(item.answers()) for item in items],
                    generated=answer.texts,
                    first_tokens=answer.first_tokens,
                )
                self.cache.store_typed("test", task.name, row_key, results[row])
        return [results[index] for index in range(len(work))]
